"""Turn engine KV event batches (and worker notices) into index writes: in order per worker, in
batches, exactly once.

One flush takes everything queued (up to ``apply_batch`` items) and sends one Redis round trip
of script calls: per worker and model namespace one ``apply_engine_events`` call holding every
store, removal and clear of that worker in the flush, in event order, together with the seq of
the last batch it covers (written atomically with the effects: the resume point after a
restart, see ``WorkerState``). A round trip that fails is retried whole: calls that had run
are skipped by the script (same epoch, seq not above the stored one), so nothing is applied
twice. A worker's run longer than ``max_ops`` ops goes as several calls in successive round
trips (sub-batches), so no one script holds Redis for a whole large flush; each stores how
many ops of the run it has applied, and a retry or a new owner's replay skips those.

Mapping BlockStored to router keys (docs/notices.md "Engine events" has the operator's view):

* keys are the router's own chain (``extend_chain``) over the event's token ids, from the
  parent block's router key: parent None -> ``BlockHasher.root(lora_name, cache_salt)``;
  otherwise the worker's local cache (engine hash -> router key), else one batched
  ``resolve_engine_blocks`` round trip per flush; still unknown -> the blocks cannot be linked
  to a chain the router could look up: counted as orphans and skipped (so are their
  descendants in later events).
* LoRA: an event with ``lora_name`` is written under the model namespace ``lora_name`` (the
  router treats an adapter as its own model) with the adapter folded into the root seed.
* Block sizes: an event's ``block_size`` equal to the worker's configured engine block size
  (default the router's) is indexed; an engine block of k router blocks becomes k router
  blocks (k - 1 synthetic engine hashes, removed with it). A single block smaller than that
  is an SGLang partial page: never indexed. Anything else is refused: counted as
  ``block_size_mismatch`` and logged with what to change.
* Blocks on another ``medium`` (offloaded to CPU memory, disk) go to that medium's tier, not
  to the GPU records (``eviction_listener/tiers.py``).
* Only ``medium`` GPU (or None, older engines), KV-cache group 0 (or None), blocks with token
  ids, and blocks whose extra keys hold nothing but the LoRA name and vLLM's cache salt are
  indexed. vLLM puts a request's ``cache_salt`` in the extra keys of its first block only (the
  block starting at token 0, so a BlockStored without parent): the one string there that is
  not the LoRA name is the salt, folded into the chain's root exactly as the router folds the
  request's ``cache_salt``; later blocks inherit it through their parent. Other extra keys
  the router's hash cannot fold (multimodal items, prompt embeddings) would make a plain-text
  key claim a block the engine would not hit: skipped and counted. (A first block whose only
  extra key is one multimodal identifier string is read as a salt: its keys then hang off a
  root no router request produces, so it is never matched, never matched wrongly.)
"""

from __future__ import annotations

import itertools
import logging
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import xxhash
from redis.exceptions import RedisError, ResponseError

from eviction_listener.events import AllBlocksCleared, BlockRemoved, BlockStored
from eviction_listener.metrics import ListenerMetrics, LogLimiter
from eviction_listener.notices import Notice
from eviction_listener.tiers import TierFlush, lower_tier
from eviction_listener.zmq_source import Delivered, Resync, SourceItem
from kvrouter.backoff import Backoff
from kvrouter.index.hashing import BlockHasher, extend_chain, tokens_to_bytes
from kvrouter.index.scripts import (
    ALREADY_APPLIED,
    FENCED,
    ApplyResult,
    RecordCall,
    ResidencyIndex,
    ScriptCall,
    pack_u64,
)

logger = logging.getLogger(__name__)

IDLE_REFRESH_S: Final = 1.0
"""An adapter namespace of a worker that saw no ops in a flush still has its stream position
advanced this often, so a restart resumes near the head of the stream instead of where that
namespace last moved. The model's own namespace is advanced at every flush."""
_LITTLE: Final = sys.byteorder == "little"

# Skip reasons (metric label values).
SKIP_MEDIUM: Final = "medium"
SKIP_GROUP: Final = "group"
SKIP_TOKENLESS: Final = "tokenless"
SKIP_PARTIAL_PAGE: Final = "partial_page"
SKIP_BLOCK_SIZE: Final = "block_size_mismatch"
SKIP_EXTRA_KEYS: Final = "extra_keys"
SKIP_ORPHAN: Final = "orphan"
SKIP_REASONS: Final = (
    SKIP_MEDIUM,
    SKIP_GROUP,
    SKIP_TOKENLESS,
    SKIP_PARTIAL_PAGE,
    SKIP_BLOCK_SIZE,
    SKIP_EXTRA_KEYS,
    SKIP_ORPHAN,
)


class KeyCache:
    """A bounded map engine hash -> value with two generations: inserts go to the young one;
    when it holds ``size // 2`` entries it becomes the old one and the previous old one is
    dropped. Hits in the old generation are promoted. O(1), all dict operations in C."""

    __slots__ = ("_half", "_old", "_young")

    def __init__(self, size: int) -> None:
        self._half = max(1, size // 2)
        self._young: dict[int, Any] = {}
        self._old: dict[int, Any] = {}

    def get(self, h: int) -> Any:
        v = self._young.get(h)
        if v is None:
            v = self._old.get(h)
            if v is not None:
                self._young[h] = v
        return v

    def __contains__(self, h: int) -> bool:
        return h in self._young or h in self._old

    def update(self, pairs: Any) -> None:
        self._young.update(pairs)
        if len(self._young) >= self._half:
            self._old = self._young
            self._young = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


@dataclass(eq=False, slots=True)
class WorkerState:
    """What the listener knows about one worker (one engine DP rank) it owns.

    ``applied`` maps each model namespace the worker's events were written under to the seq of
    the last batch applied there (-1: none since the stream was reset). The resume point
    handed to the ZMQ source is the lowest of them; batches at or below a namespace's own
    position are not applied to it again.
    """

    worker_id: str
    epoch: int
    engine_block_size: int
    applied: dict[str, int] = field(default_factory=dict)
    namespaces: set[str] = field(default_factory=set)
    last_write: dict[str, float] = field(default_factory=dict)
    keys: KeyCache = field(default_factory=lambda: KeyCache(65_536))
    lora_ns: KeyCache = field(default_factory=lambda: KeyCache(65_536))
    """Engine hash -> adapter namespace, for removals (BlockRemoved names no adapter)."""
    active: bool = True
    """False once the listener gave the worker up: its queued items are dropped."""
    mismatch_logged: bool = False
    tiers: set[tuple[str, str]] = field(default_factory=set)
    """(namespace, medium) of every lower tier the worker's events wrote (cleared on a
    resync: removals may have been lost)."""

    def resume_seq(self) -> int | None:
        """Where the event stream can continue from, or None (no resume point)."""
        seqs = [s for s in self.applied.values() if s >= 0]
        return min(seqs) if seqs else None


InboxItem = tuple[WorkerState | None, SourceItem | Notice]


@dataclass(slots=True)
class _Ops:
    ops: list[str] = field(default_factory=list)
    fields: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Call:
    call: ScriptCall | RecordCall
    state: WorkerState | None = None
    namespace: str = ""
    seq: int = -1
    final: bool = True
    """False for a sub-batch that does not end its run: the position stays partial."""
    cut: bool = False
    """The call is one of several sub-batches of its run."""


MAX_OPS_PER_CALL: Final = 512
"""Ops per apply_engine_events call: bounds how long one call holds Redis (issue #17 item 9;
docs/benchmarks.md has the longest call before and after)."""


def _cut(b: _Ops, max_ops: int, seq: int) -> list[tuple[int, str, list[int]]]:
    """A builder's run as (offset, ops, fields) calls of at most ``max_ops`` ops; one call
    (possibly empty) when it fits. A run without a resume point (``seq`` -1, after a resync)
    goes whole: its position could not say where a replay of it stands."""
    ops = "".join(b.ops)
    if len(ops) <= max_ops or seq < 0:
        return [(0, ops, b.fields)]
    out = []
    pos = 0
    for start in range(0, len(ops), max_ops):
        part = ops[start : start + max_ops]
        n = 2 * part.count("R") + 3 * part.count("S") + part.count("D")
        out.append((start, part, b.fields[pos : pos + n]))
        pos += n
    return out


def _sub_hash(h: int, i: int) -> int:
    """Synthetic engine hash of router sub-block ``i`` of engine block ``h`` (k > 1)."""
    return int(xxhash.xxh3_64_intdigest(struct.pack("<QI", h, i)))


_NOT_INDEXABLE: Final = object()


def _extras_salt(extra: tuple[Any, ...], lora: str | None, rooted: bool) -> Any:
    """vLLM's cache salt from a BlockStored's extra keys: None if there is none, the salt,
    or _NOT_INDEXABLE when the extra keys hold anything but the LoRA name and (in the first
    block of a chain, `rooted`) one salt string."""
    if extra.count(None) == len(extra):
        return None
    salt: str | None = None
    for i, e in enumerate(extra):
        if e is None:
            continue
        if type(e) is not tuple:
            return _NOT_INDEXABLE
        rest = [x for x in e if lora is None or x != lora]
        if not rest:
            continue
        if i == 0 and rooted and len(rest) == 1 and type(rest[0]) is str:
            salt = rest[0]
            continue
        return _NOT_INDEXABLE
    return salt


class Applier:
    """Applies inbox items to the index. One instance per listener; not reentrant."""

    def __init__(
        self,
        index: ResidencyIndex,
        *,
        model: str,
        block_size: int,
        hash_seed: str,
        ttl_ms: int,
        capacity: int,
        metrics: ListenerMetrics,
        register_namespace: Callable[[WorkerState, str], Awaitable[None]],
        on_fenced: Callable[[WorkerState], None] = lambda st: None,
        stopping: Callable[[], bool] = lambda: False,
        max_ops: int = MAX_OPS_PER_CALL,
    ) -> None:
        self.index = index
        self.max_ops = max_ops
        self.model = model
        self.block_size = block_size
        self.hasher = BlockHasher(model, block_size, hash_seed)
        self.ttl_ms = ttl_ms
        self.capacity = capacity
        self.metrics = metrics
        self._register = register_namespace
        self._on_fenced = on_fenced
        self._stopping = stopping
        self._roots: dict[tuple[str | None, str | None], int] = {}
        self._log = LogLimiter(10.0)

    # -- helpers -------------------------------------------------------------------------

    def root(self, lora: str | None, salt: str | None) -> int:
        r = self._roots.get((lora, salt))
        if r is None:
            if len(self._roots) > 10_000:
                self._roots.clear()
            r = self._roots[(lora, salt)] = self.hasher.root(lora_name=lora, cache_salt=salt)
        return r

    def _k(self, st: WorkerState, ev: BlockStored) -> tuple[int, str | None]:
        """Router blocks per engine block for an event, or (0, skip reason)."""
        n = len(ev.block_hashes)
        if ev.medium is not None and ev.medium != "GPU":
            return 0, SKIP_MEDIUM
        if ev.group_idx:
            return 0, SKIP_GROUP
        if not ev.token_ids:
            return 0, SKIP_TOKENLESS
        bs = ev.block_size
        if bs != st.engine_block_size:
            if bs < st.engine_block_size and n == 1:
                return 0, SKIP_PARTIAL_PAGE
            return 0, SKIP_BLOCK_SIZE
        if (
            ev.extra_keys is not None
            and _extras_salt(ev.extra_keys, ev.lora_name, ev.parent_hash is None) is _NOT_INDEXABLE
        ):
            return 0, SKIP_EXTRA_KEYS
        return bs // self.block_size, None

    # -- the flush -------------------------------------------------------------------------

    async def apply(self, items: Sequence[InboxItem]) -> None:
        """Apply a run of inbox items (in inbox order) in one round trip, retrying until it
        succeeded or the listener is stopping."""
        m = self.metrics
        now = time.time()
        live = [(st, it) for st, it in items if st is None or st.active]
        m.dropped_items += len(items) - len(live)
        await self._resolve_parents(live)
        builders: dict[tuple[WorkerState, str], _Ops] = {}
        floors: dict[WorkerState, dict[str, int]] = {}
        seqs: dict[WorkerState, int] = {}
        calls: list[_Call] = []
        tiers = TierFlush()
        for st, it in live:
            if st is None:
                assert isinstance(it, Notice)
                call = self._notice_call(it, now)
                if call is not None:
                    calls.append(_Call(call))
                continue
            fl = floors.get(st)
            if fl is None:
                fl = floors[st] = dict(st.applied)
            if type(it) is Resync:
                for ns in self._namespaces(st, builders):
                    self._builder(builders, st, ns).ops.append("C")
                for ns, medium in st.tiers:
                    tiers.clear(st.worker_id, ns, medium)
                fl.clear()
                fl.update(dict.fromkeys(self._namespaces(st, builders), -1))
                seqs[st] = -1
                m.clears["resync"] += 1
                continue
            assert isinstance(it, Delivered)
            seqs[st] = it.seq
            m.batches += 1
            if it.replayed:
                m.replayed_batches += 1
            m.observe_lag(now - it.batch.ts)
            self._translate(st, it, fl, builders, tiers)

        # Namespaces met for the first time are recorded with the worker's lease first, so a
        # new owner knows every namespace it must claim and resume from.
        for st, ns in list(builders):
            if ns not in st.namespaces:
                await self._register(st, ns)
                st.namespaces.add(ns)
        mono = time.monotonic()
        for st, seq in seqs.items():
            if seq < 0:
                continue
            for ns in st.namespaces:
                if (st, ns) in builders or st.applied.get(ns, -1) >= seq:
                    continue
                if ns == self.model or mono - st.last_write.get(ns, 0.0) >= IDLE_REFRESH_S:
                    builders[(st, ns)] = _Ops()
        # Each worker's run of ops goes out in calls of at most max_ops ops, one round trip per
        # round of calls, so no single script holds Redis for the whole flush.
        runs = []
        for (st, ns), b in builders.items():
            seq = seqs.get(st, -1)
            runs.append((st, ns, seq, st.applied.get(ns, -1), _cut(b, self.max_ops, seq)))
        rounds = max((len(r[4]) for r in runs), default=0)
        for k in range(max(rounds, 1)):
            for st, ns, seq, base, parts in runs:
                if k >= len(parts):
                    continue
                offset, ops, fields = parts[k]
                final = k == len(parts) - 1
                call = self.index.apply_engine_events_call(
                    ns,
                    st.worker_id,
                    ops,
                    pack_u64(fields),
                    epoch=st.epoch,
                    seq=seq,
                    ttl_ms=self.ttl_ms,
                    capacity=self.capacity,
                    base=base,
                    offset=offset,
                    final=final,
                )
                calls.append(_Call(call, st, ns, seq, final, cut=len(parts) > 1))
            if k == max(rounds, 1) - 1:
                # Tier calls go in the last round, after every GPU op of the flush. They carry
                # no seq or epoch: replaying them (a retried round trip) leaves the same state.
                calls += [
                    _Call(c)
                    for c in tiers.calls(self.index, ttl_ms=self.ttl_ms, capacity=self.capacity)
                ]
            if calls:
                await self._execute(calls)
            calls = []

    def _namespaces(
        self, st: WorkerState, builders: dict[tuple[WorkerState, str], _Ops]
    ) -> set[str]:
        out = set(st.namespaces)
        out.add(self.model)
        out.update(ns for (s, ns) in builders if s is st)
        return out

    @staticmethod
    def _builder(builders: dict[tuple[WorkerState, str], _Ops], st: WorkerState, ns: str) -> _Ops:
        b = builders.get((st, ns))
        if b is None:
            b = builders[(st, ns)] = _Ops()
        return b

    async def _resolve_parents(self, items: Sequence[InboxItem]) -> None:
        """One round trip for every parent hash that neither the cache nor an earlier event
        of the same flush can map: the mapping may be in Redis (a restart, a takeover, or a
        cache that dropped it)."""
        need: dict[tuple[WorkerState, str], set[int]] = {}
        produced: dict[WorkerState, set[int]] = {}
        for st, it in items:
            if st is None or type(it) is not Delivered:
                continue
            made = produced.get(st)
            if made is None:
                made = produced[st] = set()
            for ev in it.batch.events:
                if type(ev) is not BlockStored:
                    continue
                p = ev.parent_hash
                if p is not None and p not in made and p not in st.keys and self._k(st, ev)[0]:
                    need.setdefault((st, ev.lora_name or self.model), set()).add(p)
                made.update(ev.block_hashes)
        if not need:
            return
        pairs = [(st, ns, list(hs)) for (st, ns), hs in need.items()]
        calls = [
            _Call(self.index.resolve_engine_blocks_call(ns, st.worker_id, hs), st, ns)
            for st, ns, hs in pairs
        ]
        self.metrics.resolve_round_trips += 1
        results = await self._run(calls, retry=True)
        for (st, ns, hs), found in zip(pairs, results, strict=True):
            if not isinstance(found, list):
                continue
            hits = [(h, k) for h, k in zip(hs, found, strict=True) if k is not None]
            self.metrics.resolved_parents += len(hits)
            st.keys.update(hits)
            if ns != self.model:
                st.lora_ns.update((h, ns) for h, _ in hits)

    def _translate(
        self,
        st: WorkerState,
        it: Delivered,
        floors: dict[str, int],
        builders: dict[tuple[WorkerState, str], _Ops],
        tiers: TierFlush,
    ) -> None:
        m = self.metrics
        seq = it.seq
        model = self.model
        for ev in it.batch.events:
            t = type(ev)
            if t is BlockStored:
                assert isinstance(ev, BlockStored)
                if ev.medium is not None and ev.medium != "GPU":
                    self._tier_stored(st, ev, seq, floors, tiers)
                    continue
                n = len(ev.block_hashes)
                k, reason = self._k(st, ev)
                if reason is not None:
                    m.skipped_blocks[reason] += n
                    if reason == SKIP_BLOCK_SIZE:
                        self._mismatch(st, ev)
                    continue
                ns = ev.lora_name or model
                if seq <= floors.get(ns, -1):
                    continue
                hashes = ev.block_hashes
                parent = ev.parent_hash
                if parent is None:
                    salt = ev.cache_salt
                    if salt is None and ev.extra_keys is not None:
                        salt = _extras_salt(ev.extra_keys, ev.lora_name, True)
                    pk = self.root(ev.lora_name, salt)
                else:
                    pk = st.keys.get(parent)
                    if pk is None:
                        m.skipped_blocks[SKIP_ORPHAN] += n
                        continue
                tokens = ev.token_ids
                buf = tokens.tobytes() if _LITTLE else tokens_to_bytes(tokens.tolist())
                keys = extend_chain(pk, buf, self.block_size)
                b = self._builder(builders, st, ns)
                if k == 1:
                    if parent is None:
                        b.ops.append("R" + "S" * (n - 1))
                        b.fields += (hashes[0], keys[0])
                        b.fields += itertools.chain.from_iterable(
                            zip(hashes[1:], hashes, keys[1:], strict=False)
                        )
                    else:
                        b.ops.append("S" * n)
                        b.fields += itertools.chain.from_iterable(
                            zip(hashes, (parent, *hashes), keys, strict=False)
                        )
                    st.keys.update(zip(hashes, keys, strict=True))
                else:
                    prev = parent
                    for j, h in enumerate(hashes):
                        subs = [_sub_hash(h, i) for i in range(k - 1)] + [h]
                        for i, sh in enumerate(subs):
                            rk = keys[j * k + i]
                            if prev is None:
                                b.ops.append("R")
                                b.fields += (sh, rk)
                            else:
                                b.ops.append("S")
                                b.fields += (sh, prev, rk)
                            prev = sh
                    st.keys.update(zip(hashes, keys[k - 1 :: k], strict=True))
                if ns != model:
                    st.lora_ns.update((h, ns) for h in hashes)
                m.blocks_stored += n
            elif t is BlockRemoved:
                assert isinstance(ev, BlockRemoved)
                n = len(ev.block_hashes)
                if ev.medium is not None and ev.medium != "GPU":
                    self._tier_removed(st, ev, seq, floors, tiers)
                    continue
                if ev.group_idx:
                    m.skipped_blocks[SKIP_GROUP] += n
                    continue
                self._removed(st, ev.block_hashes, seq, floors, builders)
                m.blocks_removed += n
            elif t is AllBlocksCleared:
                for ns in self._namespaces(st, builders):
                    if seq > floors.get(ns, -1):
                        self._builder(builders, st, ns).ops.append("C")
                m.clears["all_blocks_cleared"] += 1

    def _tier_stored(
        self, st: WorkerState, ev: BlockStored, seq: int, floors: dict[str, int], tiers: TierFlush
    ) -> None:
        """A store on a lower tier: the blocks' router keys from the event's tokens when it
        has them, else from the GPU event that stored the same engine hashes."""
        m = self.metrics
        hashes = ev.block_hashes
        n = len(hashes)
        medium = lower_tier(ev.medium)
        if medium is None:
            m.skipped_blocks[SKIP_MEDIUM] += n
            return
        if ev.group_idx:
            m.skipped_blocks[SKIP_GROUP] += n
            return
        if st.engine_block_size != self.block_size:
            # An engine block of several router blocks would need every sub-block's key;
            # the tiers index engines whose blocks are router blocks.
            m.skipped_blocks[SKIP_BLOCK_SIZE] += n
            return
        keys: list[int | None]
        parent_key = None
        if ev.token_ids is not None and len(ev.token_ids) == n * self.block_size:
            if ev.parent_hash is None:
                salt = ev.cache_salt
                if salt is None and ev.extra_keys is not None:
                    salt = _extras_salt(ev.extra_keys, ev.lora_name, True)
                if salt is not _NOT_INDEXABLE:
                    parent_key = self.root(ev.lora_name, salt)
            else:
                parent_key = st.keys.get(ev.parent_hash)
        if parent_key is not None:
            tokens = ev.token_ids
            assert tokens is not None
            buf = tokens.tobytes() if _LITTLE else tokens_to_bytes(tokens.tolist())
            keys = list(extend_chain(parent_key, buf, self.block_size))
        else:
            keys = [st.keys.get(h) for h in hashes]
        ns = ev.lora_name or st.lora_ns.get(hashes[0]) or self.model if hashes else self.model
        if seq <= floors.get(ns, -1):
            return
        pairs = [(h, k) for h, k in zip(hashes, keys, strict=True) if k is not None]
        if len(pairs) < n:
            m.skipped_blocks[SKIP_ORPHAN] += n - len(pairs)
        if pairs:
            tiers.store(st.worker_id, ns, medium, pairs)
            st.tiers.add((ns, medium))
            m.tier_blocks["stored"] += len(pairs)

    def _tier_removed(
        self, st: WorkerState, ev: BlockRemoved, seq: int, floors: dict[str, int], tiers: TierFlush
    ) -> None:
        """A removal on a lower tier drops that tier's records only."""
        m = self.metrics
        medium = lower_tier(ev.medium)
        if medium is None or ev.group_idx:
            m.skipped_blocks[SKIP_MEDIUM if medium is None else SKIP_GROUP] += len(ev.block_hashes)
            return
        by_ns: dict[str, list[int]] = {}
        for h in ev.block_hashes:
            by_ns.setdefault(st.lora_ns.get(h) or self.model, []).append(h)
        for ns, hs in by_ns.items():
            if seq > floors.get(ns, -1):
                tiers.remove(st.worker_id, ns, medium, hs)
                m.tier_blocks["removed"] += len(hs)

    def _removed(
        self,
        st: WorkerState,
        hashes: tuple[int, ...],
        seq: int,
        floors: dict[str, int],
        builders: dict[tuple[WorkerState, str], _Ops],
    ) -> None:
        k = st.engine_block_size // self.block_size
        model = self.model
        if k == 1:
            expanded: Sequence[int] = hashes
        else:  # the engine block and its sub-blocks, tail first
            expanded = [
                x for h in hashes for x in (h, *(_sub_hash(h, i) for i in range(k - 2, -1, -1)))
            ]
        only_base = not st.namespaces or st.namespaces == {model}
        if only_base:
            if seq > floors.get(model, -1):
                b = self._builder(builders, st, model)
                b.ops.append("D" * len(expanded))
                b.fields += expanded
            return
        by_ns: dict[str, list[int]] = {}
        for h in hashes:
            ns = st.lora_ns.get(h)
            targets = [ns] if ns is not None else sorted(self._namespaces(st, builders))
            part = [h] if k == 1 else [h, *(_sub_hash(h, i) for i in range(k - 2, -1, -1))]
            for t in targets:
                by_ns.setdefault(t, []).extend(part)
        for ns, hs in by_ns.items():
            if seq > floors.get(ns, -1):
                b = self._builder(builders, st, ns)
                b.ops.append("D" * len(hs))
                b.fields += hs

    def _mismatch(self, st: WorkerState, ev: BlockStored) -> None:
        if st.mismatch_logged:
            return
        st.mismatch_logged = True
        logger.error(
            "worker %s publishes blocks of %d tokens but is configured for %d (router "
            "KVR_BLOCK_SIZE=%d): its blocks are not indexed. Run the engine with "
            "--block-size %d, or declare block=%d on its --engine entry if that is a "
            "multiple of %d.",
            st.worker_id,
            ev.block_size,
            st.engine_block_size,
            self.block_size,
            self.block_size,
            ev.block_size,
            self.block_size,
        )

    def _notice_call(self, n: Notice, now: float) -> ScriptCall | RecordCall | None:
        m = self.metrics
        m.notices[n.op] += 1
        if n.ts is not None:
            m.observe_notice_lag(now - n.ts)
        ns = n.lora_name or self.model
        if n.op == "clear":
            return self.index.clear_worker_call(ns, n.worker)
        keys: Sequence[int]
        if n.keys is not None:
            keys = n.keys
        else:
            assert n.tokens is not None
            keys = self.hasher.keys(
                n.tokens.tobytes() if _LITTLE else n.tokens.tolist(),
                lora_name=n.lora_name,
                cache_salt=n.cache_salt,
            )
        if n.op == "evict":
            keys = keys[n.from_block :]
            if not keys:
                return None
            return self.index.evict_call(ns, n.worker, keys, mark_holes=True)
        if not keys:
            return None
        return self.index.record_call(
            ns, n.worker, keys, ttl_new_ms=self.ttl_ms, capacity=self.capacity
        )

    # -- Redis -------------------------------------------------------------------------------

    async def _execute(self, calls: list[_Call]) -> None:
        results = await self._run(calls, retry=True)
        m = self.metrics
        mono = time.monotonic()
        for c, r in zip(calls, results, strict=True):
            if not isinstance(r, ApplyResult):
                if isinstance(r, Exception) and c.cut and c.final and c.state is not None:
                    # The run's last call failed for good: its ops are lost (as a whole call's
                    # were), but Redis keeps the run's partial position on the old base. The
                    # next run must not start from that base, or the script would skip the
                    # new run's first ops as if they were this run's.
                    c.state.applied[c.namespace] = c.seq
                continue
            st = c.state
            assert st is not None
            if r.status == FENCED:
                m.fenced += 1
                if st.active:
                    logger.warning("worker %s: another listener took it over", st.worker_id)
                    st.active = False
                    self._on_fenced(st)
                continue
            if c.final:
                st.applied[c.namespace] = c.seq
            st.last_write[c.namespace] = mono
            if r.status == ALREADY_APPLIED:
                m.already_applied += 1
                continue
            m.flush_calls += 1
            m.applied.update(
                stored=r.stored,
                duplicates=r.duplicates,
                released=r.released,
                removed=r.removed,
                unknown=r.unknown,
                holes=r.holes,
                added=r.added,
                evicted=r.evicted,
                expired=r.expired,
            )

    async def _run(self, calls: list[_Call], *, retry: bool) -> list[Any]:
        """Per-call results (an exception object where a call failed for good). Connection
        trouble retries the calls still owned, with backoff, until the listener stops."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        backoff = Backoff(0.05, 2.0)
        while todo:
            todo = [i for i in todo if calls[i].state is None or calls[i].state.active]  # type: ignore[union-attr]
            if not todo:
                break
            try:
                replies = await self._send([calls[i].call for i in todo])
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors[type(exc).__name__] += 1
                self._log.warning("redis", "Redis round trip failed (%s); retrying", exc)
                if not retry or self._stopping():
                    for i in todo:
                        results[i] = exc
                    break
                await backoff.sleep()
                continue
            again: list[int] = []
            for i, r in zip(todo, replies, strict=True):
                if isinstance(r, (ConnectionError, OSError, TimeoutError)) or (
                    isinstance(r, RedisError) and not isinstance(r, ResponseError)
                ):
                    self.metrics.redis_errors[type(r).__name__] += 1
                    again.append(i)
                elif isinstance(r, BaseException):
                    self.metrics.redis_errors[type(r).__name__] += 1
                    self._log.warning("script", "script call failed for good: %s", r)
                    results[i] = r
                else:
                    results[i] = r
            todo = again
            if todo:
                if not retry or self._stopping():
                    break
                await backoff.sleep()
        return results

    async def _send(self, calls: list[ScriptCall | RecordCall]) -> list[Any]:
        """One round trip; per-call decoded replies or exceptions (NOSCRIPT reloads)."""
        return await self.index.run_pipeline(calls, return_exceptions=True)
