"""The index's scripts as typed Python calls: ``ResidencyIndex``.

``ResidencyIndex`` is the only Python that calls the Lua scripts. For each script it has a
``*_call`` method that checks the arguments (raising ``ScriptArgumentError`` naming the
argument), packs them and says how to decode the reply, and a one-line wrapper that runs it.
The rest lives beside it, one concern per module:

* ``script_loader``: the scripts from package data, ``_lib.lua`` spliced in;
* ``arguments``: checking and packing arguments;
* ``results``: the decoded replies;
* ``transport``: EVALSHA, NOSCRIPT reload, pipelines, Cluster and fakeredis differences;
* ``clock``: the Redis server's clock.

The names below are re-exported so callers import from one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

from kvrouter.index.arguments import (
    MAX_CHAIN_BLOCKS,
    MAX_LEASE_TTL_MS,
    MAX_TTL_MS,
    OPS,
    U64,
    candidates_arg,
    lease_id_arg,
    medium_arg,
    nonneg,
    pack_keys,
    pack_u64,
    text,
    worker_arg,
)
from kvrouter.index.clock import CLOCK_REFRESH_S
from kvrouter.index.errors import ScriptArgumentError
from kvrouter.index.hashing import key_hex
from kvrouter.index.keys import KeyNameError, KeySchema, ModelKeys
from kvrouter.index.results import (
    ALREADY_APPLIED,
    APPLIED,
    FENCED,
    ApplyResult,
    ClaimResult,
    EngineBlock,
    LookupResult,
    OwnerLease,
    RecordResult,
    ReleaseResult,
    StoreResult,
    TierResult,
    WorkerLoad,
)
from kvrouter.index.script_loader import LuaScript, load_scripts
from kvrouter.index.transport import RecordCall, ScriptCall, ScriptTransport, ServerTraits

__all__ = [
    "ALREADY_APPLIED",
    "APPLIED",
    "CLOCK_REFRESH_S",
    "FENCED",
    "MAX_CHAIN_BLOCKS",
    "MAX_LEASE_TTL_MS",
    "MAX_TTL_MS",
    "ApplyResult",
    "ClaimResult",
    "EngineBlock",
    "LookupResult",
    "LuaScript",
    "OwnerLease",
    "RecordCall",
    "RecordResult",
    "ReleaseResult",
    "ResidencyIndex",
    "ScriptCall",
    "ServerTraits",
    "StoreResult",
    "TierResult",
    "WorkerLoad",
    "load_scripts",
    "pack_u64",
]


OPS_TIER = re.compile(r"^[SDC]*\Z")


def _parse_load(flat: Sequence[Any]) -> dict[str, WorkerLoad]:
    req: dict[str, int] = {}
    pf: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        name, value = text(flat[i]), int(flat[i + 1])
        if name.endswith("|pf"):
            pf[name[:-3]] = value
        else:
            req[name] = value
    return {w: WorkerLoad(req.get(w, 0), pf.get(w, 0)) for w in req.keys() | pf.keys()}


def _decode_lookup(reply: Any) -> LookupResult:
    flat, load, probes = reply
    depths = {text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    return LookupResult(depths, _parse_load(load), int(probes))


def _decode_tiers(reply: Any) -> dict[str, dict[str, tuple[int, int]]]:
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for i in range(0, len(reply), 4):
        run = (int(reply[i + 2]), int(reply[i + 3]))
        out.setdefault(text(reply[i]), {})[text(reply[i + 1])] = run
    return out


def _decode_pair(r: Any) -> tuple[int, int]:
    return int(r[0]), int(r[1])


def _decode_owner(r: Any) -> OwnerLease:
    return OwnerLease(
        int(r[0]) == 1, int(r[1]), text(r[2]), int(r[3]), tuple(text(m) for m in r[4:])
    )


def _decode_router_keys(reply: Any) -> list[int | None]:
    return [int(text(v), 16) if v else None for v in reply]


class ResidencyIndex:
    """Typed access to the shared residency index, leases and engine maps in Redis.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``. Every method is
    one round trip; ``run_pipeline`` sends several prepared calls in one.
    """

    def __init__(self, client: Any, schema: KeySchema | None = None) -> None:
        self.client = client
        self.schema = schema or KeySchema()
        self.transport = ScriptTransport(client, load_scripts())

    @property
    def scripts(self) -> dict[str, LuaScript]:
        """The scripts as this server runs them (see ``ScriptTransport``)."""
        return self.transport.scripts

    def keys(self, model: str) -> ModelKeys:
        try:
            return self.schema.model(model)
        except KeyNameError as exc:
            raise ScriptArgumentError("model", str(exc)) from None

    # -- transport ---------------------------------------------------------------------------
    async def load(self) -> None:
        """SCRIPT LOAD every script (on a Cluster, on every primary)."""
        await self.transport.load()

    async def call(self, call: ScriptCall) -> Any:
        """Run one prepared call (EVALSHA, NOSCRIPT reload) and decode its reply."""
        return await self.transport.run(call)

    _call = call

    async def run_pipeline(
        self, calls: Sequence[ScriptCall | RecordCall], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Send prepared calls in one round trip (see ``ScriptTransport.run_pipeline``)."""
        return await self.transport.run_pipeline(calls, return_exceptions=return_exceptions)

    async def server_now_us(self) -> int:
        """Now on the Redis server's clock, in us (see ``ServerClock``)."""
        return await self.transport.clock.now_us()

    # -- residency ---------------------------------------------------------------------------
    def lookup_call(
        self,
        model: str,
        chain: Sequence[int],
        candidates: Iterable[str] | None = None,
        now_ms: int = 0,
    ) -> ScriptCall:
        k = self.keys(model)
        cand = candidates_arg(candidates)
        packed = pack_keys("chain", chain)
        now = nonneg("now_ms", now_ms)
        return ScriptCall(
            self.scripts["lookup_chain"],
            [k.worker_prefix, k.cut_prefix, k.load, k.head_prefix],
            [now, packed, cand],
            _decode_lookup,
        )

    async def lookup(
        self,
        model: str,
        chain: Sequence[int],
        candidates: Iterable[str] | None = None,
        now_ms: int = 0,
    ) -> LookupResult:
        """Each worker's consecutive matched depth for `chain`, plus shared load."""
        return cast(
            LookupResult, await self._call(self.lookup_call(model, chain, candidates, now_ms))
        )

    def lookup_tiers_call(
        self,
        model: str,
        chain: Sequence[int],
        media: Sequence[str],
        candidates: Iterable[str] | None = None,
        now_ms: int = 0,
    ) -> ScriptCall:
        """How far the chain continues on the lower tiers `media` past each candidate's GPU
        prefix (decoded to medium -> worker -> (GPU depth seen, run of tier blocks))."""
        k = self.keys(model)
        cand = candidates_arg(candidates)
        return ScriptCall(
            self.scripts["lookup_tiers"],
            [k.tier_prefix, k.tier_workers_prefix, k.worker_prefix],
            [
                nonneg("now_ms", now_ms),
                pack_keys("chain", chain),
                cand,
                "\n".join(medium_arg(m) for m in media),
            ],
            _decode_tiers,
        )

    async def lookup_with_tiers(
        self,
        model: str,
        chain: Sequence[int],
        media: Sequence[str],
        candidates: Iterable[str] | None = None,
        now_ms: int = 0,
    ) -> LookupResult:
        """``lookup`` plus which chain blocks each worker holds on the lower tiers `media`,
        both scripts in one pipeline (one round trip). Without media, exactly ``lookup``."""
        if not media:
            return await self.lookup(model, chain, candidates, now_ms)
        cand = list(candidates) if candidates is not None else None
        gpu, tiers = await self.run_pipeline(
            [
                self.lookup_call(model, chain, cand, now_ms),
                self.lookup_tiers_call(model, chain, media, cand, now_ms),
            ]
        )
        return replace(
            cast(LookupResult, gpu), tiers=cast(dict[str, dict[str, tuple[int, int]]], tiers)
        )

    def store_tier_blocks_call(
        self,
        model: str,
        worker: str,
        medium: str,
        ops: str,
        fields: str,
        *,
        ttl_ms: int,
        capacity: int = 0,
        now_ms: int = 0,
    ) -> ScriptCall:
        """Stores (op S: engine hash, block key), removals (op D: engine hash) and clears (op
        C) of one worker's blocks on the lower tier `medium`, in order; `fields` packed by
        pack_u64."""
        k = self.keys(model)
        w = worker_arg(worker)
        m = medium_arg(medium)
        if not OPS_TIER.match(ops):
            raise ScriptArgumentError("ops", "expected letters S, D and C")
        return ScriptCall(
            self.scripts["store_tier_blocks"],
            [k.tier(m, w), k.tier_map(m, w), k.tier_workers(m)],
            [
                w,
                ops,
                fields,
                nonneg("now_ms", now_ms),
                nonneg("ttl_ms", ttl_ms, minimum=1, maximum=MAX_TTL_MS),
                nonneg("capacity", capacity),
            ],
            lambda r: TierResult(*(int(x) for x in r)),
        )

    async def store_tier_blocks(
        self,
        model: str,
        worker: str,
        medium: str,
        ops: str,
        fields: str,
        *,
        ttl_ms: int,
        capacity: int = 0,
        now_ms: int = 0,
    ) -> TierResult:
        """Apply tier stores and removals (see ``store_tier_blocks_call``)."""
        return cast(
            TierResult,
            await self._call(
                self.store_tier_blocks_call(
                    model,
                    worker,
                    medium,
                    ops,
                    fields,
                    ttl_ms=ttl_ms,
                    capacity=capacity,
                    now_ms=now_ms,
                )
            ),
        )

    def record_call(
        self,
        model: str,
        worker: str,
        chain: Sequence[int],
        *,
        ttl_new_ms: int,
        ttl_held_ms: int = 0,
        held: int = 0,
        capacity: int = 0,
        now_ms: int = 0,
        limit: int | None = None,
    ) -> RecordCall:
        """Prepare a record of `chain` for `worker` (sent by ``run_pipeline`` or ``record``).

        The first `held` blocks live `ttl_held_ms` (0 = `ttl_new_ms`), the rest `ttl_new_ms`,
        from `now_ms` (0 = the Redis server's clock, as ``server_now_us`` tracks it); each block
        scores 1 us below its parent. The worker is then trimmed to `capacity` blocks (0 = no
        limit), at most `limit` in this call (default: twice the chain, at least 1,000, so a
        worker recorded with long chains stays at its capacity and one that shrank catches
        up). Every argument is checked here, before anything is sent.
        """
        k = self.keys(model)
        w = worker_arg(worker)
        return RecordCall(
            script=self.scripts["record_chain"],
            keys=[k.worker(w), k.cut(w), k.workers, k.head_prefix, k.lru(w)],
            worker=w,
            packed=pack_keys("chain", chain),
            now_ms=nonneg("now_ms", now_ms),
            ttl_new_us=nonneg("ttl_new_ms", ttl_new_ms, minimum=1, maximum=MAX_TTL_MS) * 1000,
            ttl_held_us=nonneg("ttl_held_ms", ttl_held_ms, maximum=MAX_TTL_MS) * 1000,
            held=nonneg("held", held),
            capacity=nonneg("capacity", capacity),
            limit=max(1000, 2 * len(chain)) if limit is None else nonneg("limit", limit, minimum=1),
            encoded=self.transport.traits.packed_args,
        )

    async def record(
        self, model: str, worker: str, chain: Sequence[int], **kw: int
    ) -> RecordResult:
        """Record `worker` as holding `chain` (arguments as for ``record_call``)."""
        return cast(
            RecordResult,
            (await self.run_pipeline([self.record_call(model, worker, chain, **kw)]))[0],
        )

    def evict_call(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        mark_holes: bool = True,
        now_ms: int = 0,
    ) -> ScriptCall:
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["evict_blocks"],
            [k.worker(w), k.cut(w), k.lru(w)],
            [w, pack_keys("keys", keys), nonneg("now_ms", now_ms), 1 if mark_holes else 0],
            int,
        )

    async def evict(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        mark_holes: bool = True,
        now_ms: int = 0,
    ) -> int:
        """Remove blocks from a worker; returns how many records it had."""
        return cast(
            int,
            await self._call(
                self.evict_call(model, worker, keys, mark_holes=mark_holes, now_ms=now_ms)
            ),
        )

    def correct_chain_call(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        now_ms: int = 0,
        cut_us: int = 0,
        limit: int = 1024,
    ) -> ScriptCall:
        """The call behind `correct_chain` (`cut_us`: absolute, 0 = none)."""
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["correct_chain"],
            [k.worker(w), k.cut(w), k.lru(w)],
            [
                w,
                pack_keys("keys", keys),
                nonneg("now_ms", now_ms),
                nonneg("cut_us", cut_us),
                nonneg("limit", limit, minimum=1),
            ],
            _decode_pair,
        )

    async def correct_chain(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        now_ms: int = 0,
        cut_us: int = 0,
        limit: int = 1024,
    ) -> tuple[int, int]:
        """Drop `keys` (a chain's blocks from the first one the engine reported it did not
        have) from `worker`, marking the first as a hole; with `cut_us` > 0 (us on the clock
        the records were written with, ``server_now_us``) also drop up to `limit` of the
        worker's records last accessed before it (see correct_chain-3.lua). Returns (chain
        records removed, older records removed)."""
        call = self.correct_chain_call(
            model, worker, keys, now_ms=now_ms, cut_us=cut_us, limit=limit
        )
        return cast(tuple[int, int], await self._call(call))

    async def used_since(self, model: str, worker: str, since_us: int) -> int:
        """How many of `worker`'s records were last accessed at or after `since_us` (us on the
        clock the records' last accesses were written with, ``server_now_us``): the blocks
        the router has seen that worker's engine use since then (one ZCOUNT)."""
        k = self.keys(model)
        since = nonneg("since_us", since_us)
        return int(await self.transport.client.zcount(k.lru(worker_arg(worker)), since, "+inf"))

    def clear_worker_call(self, model: str, worker: str) -> ScriptCall:
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["clear_worker"],
            [k.worker(w), k.cut(w), k.engine_map(w), k.workers, k.head_prefix, k.lru(w)],
            [w],
            int,
        )

    async def clear_worker(self, model: str, worker: str) -> int:
        """Forget everything `worker` holds for `model`, atomically; returns records dropped."""
        return cast(int, await self._call(self.clear_worker_call(model, worker)))

    # -- engine maps ---------------------------------------------------------------------
    def store_engine_blocks_call(
        self,
        model: str,
        worker: str,
        blocks: Sequence[EngineBlock],
        *,
        ttl_ms: int,
        capacity: int = 0,
        now_ms: int = 0,
        limit: int = 1000,
    ) -> ScriptCall:
        k = self.keys(model)
        w = worker_arg(worker)
        if len(blocks) > MAX_CHAIN_BLOCKS:
            raise ScriptArgumentError("blocks", f"at most {MAX_CHAIN_BLOCKS} per call")
        parts: list[str] = []
        roots: list[str] = []
        for b in blocks:
            for name, v in (("engine_hash", b.engine_hash), ("router_key", b.router_key)):
                if not isinstance(v, int) or not 0 <= v <= U64:
                    raise ScriptArgumentError(name, "must be an unsigned 64-bit integer")
            p = b.parent_hash
            if p is not None and (not isinstance(p, int) or not 0 <= p <= U64):
                raise ScriptArgumentError(
                    "parent_hash", "must be an unsigned 64-bit integer or None"
                )
            parts.append(key_hex(b.engine_hash) + key_hex(p or 0) + key_hex(b.router_key))
            roots.append("1" if p is None else "0")
        return ScriptCall(
            self.scripts["store_engine_blocks"],
            [k.engine_map(w), k.worker(w), k.cut(w), k.workers, k.head_prefix, k.lru(w)],
            [
                w,
                "".join(parts),
                "".join(roots),
                nonneg("now_ms", now_ms),
                nonneg("ttl_ms", ttl_ms, minimum=1),
                nonneg("capacity", capacity),
                nonneg("limit", limit, minimum=1),
            ],
            lambda r: StoreResult(*(int(x) for x in r)),
        )

    async def store_engine_blocks(
        self, model: str, worker: str, blocks: Sequence[EngineBlock], **kw: int
    ) -> StoreResult:
        """Map engine hashes to router keys and record them as confirmed residency
        (arguments as for ``store_engine_blocks_call``)."""
        return cast(
            StoreResult,
            await self._call(self.store_engine_blocks_call(model, worker, blocks, **kw)),
        )

    def release_engine_blocks_call(
        self, model: str, worker: str, engine_hashes: Sequence[int], *, now_ms: int = 0
    ) -> ScriptCall:
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["release_engine_blocks"],
            [k.engine_map(w), k.worker(w), k.cut(w), k.lru(w)],
            [w, pack_keys("engine_hashes", engine_hashes), nonneg("now_ms", now_ms)],
            lambda r: ReleaseResult(*(int(x) for x in r)),
        )

    async def release_engine_blocks(
        self, model: str, worker: str, engine_hashes: Sequence[int], *, now_ms: int = 0
    ) -> ReleaseResult:
        """Drop one reference per engine hash; remove residency at zero."""
        return cast(
            ReleaseResult,
            await self._call(
                self.release_engine_blocks_call(model, worker, engine_hashes, now_ms=now_ms)
            ),
        )

    def resolve_engine_blocks_call(
        self, model: str, worker: str, engine_hashes: Sequence[int]
    ) -> ScriptCall:
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["resolve_engine_blocks"],
            [k.engine_map(w)],
            [pack_keys("engine_hashes", engine_hashes)],
            _decode_router_keys,
        )

    async def resolve_engine_blocks(
        self, model: str, worker: str, engine_hashes: Sequence[int]
    ) -> list[int | None]:
        """Router keys for engine hashes (None where unknown)."""
        return cast(
            list[int | None],
            await self._call(self.resolve_engine_blocks_call(model, worker, engine_hashes)),
        )

    def apply_engine_events_call(
        self,
        model: str,
        worker: str,
        ops: str,
        fields: str,
        *,
        epoch: int,
        seq: int,
        ttl_ms: int,
        capacity: int = 0,
        now_ms: int = 0,
        limit: int = 1000,
        base: int | None = None,
        offset: int = 0,
        final: bool = True,
    ) -> ScriptCall:
        """One worker's engine events for one model, in order (see apply_engine_events-7.lua).

        ``ops`` is one character per op (R, S, D, C); ``fields`` the packed hex fields
        (``pack_u64``). The script validates the fields; this checks the rest. A run of ops
        sent as several calls (sub-batches) gives each its ``base`` (the stored seq the run
        started from), ``offset`` (ops of the run in earlier calls) and ``final`` (this call
        ends the run); ``base`` None sends the call as a whole run.
        """
        k = self.keys(model)
        w = worker_arg(worker)
        if not isinstance(ops, str) or not OPS.match(ops):
            raise ScriptArgumentError("ops", "must be characters R, S, D or C")
        if len(ops) > 4 * MAX_CHAIN_BLOCKS:
            raise ScriptArgumentError("ops", f"at most {4 * MAX_CHAIN_BLOCKS} per call")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < -1 or seq > U64:
            raise ScriptArgumentError("seq", f"must be an integer >= -1, got {seq!r}")
        return ScriptCall(
            self.scripts["apply_engine_events"],
            [
                k.engine_map(w),
                k.worker(w),
                k.cut(w),
                k.workers,
                k.head_prefix,
                k.listener_seq,
                k.lru(w),
            ],
            [
                w,
                ops,
                fields,
                nonneg("now_ms", now_ms),
                nonneg("ttl_ms", ttl_ms, minimum=1),
                nonneg("capacity", capacity),
                nonneg("limit", limit, minimum=1),
                nonneg("epoch", epoch),
                seq,
                *self._sub_batch_args(base, offset, final),
            ],
            lambda r: ApplyResult(*(int(x) for x in r)),
        )

    @staticmethod
    def _sub_batch_args(base: int | None, offset: int, final: bool) -> list[Any]:
        if base is None:
            return []
        if isinstance(base, bool) or not isinstance(base, int) or base < -1 or base > U64:
            raise ScriptArgumentError("base", f"must be an integer >= -1, got {base!r}")
        return [base, nonneg("offset", offset), "1" if final else "0"]

    def claim_worker_call(self, model: str, worker: str, *, epoch: int, ttl_ms: int) -> ScriptCall:
        """Fence older owners out of ``model`` for ``worker`` and read its stream position."""
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["claim_worker"],
            [k.listener_seq],
            [w, nonneg("epoch", epoch), nonneg("ttl_ms", ttl_ms, minimum=1)],
            lambda r: ClaimResult(int(r[0]) == 1, int(r[1])),
        )

    def own_worker_call(
        self, worker: str, listener_id: str, *, release: bool = False, lease_ms: int = 1
    ) -> ScriptCall:
        """Acquire or renew (or release) the lease on applying ``worker``'s events."""
        w = worker_arg(worker)
        if (
            not isinstance(listener_id, str)
            or not 0 < len(listener_id) <= 256
            or any(c.isspace() for c in listener_id)
        ):
            raise ScriptArgumentError("listener", "must be 1-256 characters without whitespace")
        return ScriptCall(
            self.scripts["own_worker"],
            [self.schema.listener_owner(w)],
            [
                listener_id,
                "release" if release else "acquire",
                nonneg("lease_ms", lease_ms, minimum=1),
            ],
            _decode_owner,
        )

    # -- leases ------------------------------------------------------------------------------
    def acquire_lease_call(
        self,
        model: str,
        worker: str,
        lease_id: str,
        *,
        prefill_tokens: int,
        ttl_ms: int,
        now_ms: int = 0,
        report: bool = False,
    ) -> ScriptCall:
        """Count an in-flight request against `worker`; decodes to its load afterwards. With
        `report`, a reservation: every worker's load is read in the same atomic step (the
        caller re-scores its decision with them) and the call decodes to that load map, this
        lease included. Taking the same lease again with the full ttl adopts it."""
        k = self.keys(model)
        args: list[str | int] = [
            worker_arg(worker),
            lease_id_arg(lease_id),
            nonneg("prefill_tokens", prefill_tokens),
            nonneg("ttl_ms", ttl_ms, minimum=1, maximum=MAX_LEASE_TTL_MS),
            nonneg("now_ms", now_ms),
        ]
        if report:
            args.append("all")
            return ScriptCall(
                self.scripts["acquire_lease"], [k.leases, k.load], args, lambda r: _parse_load(r[3])
            )
        return ScriptCall(
            self.scripts["acquire_lease"],
            [k.leases, k.load],
            args,
            lambda r: WorkerLoad(int(r[0]), int(r[1])),
        )

    async def reserve_lease(
        self, model: str, worker: str, lease_id: str, **kw: int
    ) -> dict[str, WorkerLoad]:
        """Take a lease on `worker` and return every worker's load after it, atomically."""
        return cast(
            dict[str, WorkerLoad],
            await self._call(self.acquire_lease_call(model, worker, lease_id, report=True, **kw)),
        )

    async def acquire_lease(
        self,
        model: str,
        worker: str,
        lease_id: str,
        *,
        prefill_tokens: int,
        ttl_ms: int,
        now_ms: int = 0,
    ) -> WorkerLoad:
        """Count an in-flight request against `worker`; returns its load afterwards."""
        call = self.acquire_lease_call(
            model, worker, lease_id, prefill_tokens=prefill_tokens, ttl_ms=ttl_ms, now_ms=now_ms
        )
        return cast(WorkerLoad, await self._call(call))

    def release_lease_call(
        self,
        model: str,
        worker: str,
        lease_id: str,
        *,
        prefill_tokens: int,
        prefilled_only: bool = False,
    ) -> ScriptCall:
        k = self.keys(model)
        w = worker_arg(worker)
        return ScriptCall(
            self.scripts["release_lease"],
            [k.leases, k.load],
            [
                w,
                lease_id_arg(lease_id),
                nonneg("prefill_tokens", prefill_tokens),
                "prefilled" if prefilled_only else "end",
            ],
            lambda r: bool(int(r)),
        )

    async def release_lease(
        self,
        model: str,
        worker: str,
        lease_id: str,
        *,
        prefill_tokens: int,
        prefilled_only: bool = False,
    ) -> bool:
        """Give a lease back (or only its prefill tokens once the first token arrived)."""
        return cast(
            bool,
            await self._call(
                self.release_lease_call(
                    model,
                    worker,
                    lease_id,
                    prefill_tokens=prefill_tokens,
                    prefilled_only=prefilled_only,
                )
            ),
        )
