"""A simulated GPU KV cache with vLLM v1's prefix-caching semantics.

The cache is a pool of `num_blocks` physical blocks. A block is *hashed* once it is full and
registered; hashed blocks can be hit by later requests whose prompt starts with the same
tokens. The rules mirror vLLM's `BlockPool` / `KVCacheManager`:

- Only full blocks are hashed and hit; a request's trailing partial block is private.
- A hit is capped so at least one prompt token is computed: at most `num_tokens - 1` tokens,
  rounded down to whole blocks.
- Blocks referenced by a running request are never evicted. Free hashed blocks sit in an
  LRU queue; allocation evicts from its front (and announces a BlockRemoved for each).
- A finishing request frees its blocks tail first, so a chain's tail is evicted before its
  head and "block i is cached" keeps implying "blocks before i are cached".
- Identical blocks computed concurrently by two requests are not de-duplicated: both are
  registered, each announces its own BlockStored and later its own BlockRemoved.

An optional CPU tier (``cpu_blocks`` > 0) models vLLM's CPU offloading: a cached block the
GPU evicts is offloaded to a host-memory LRU of its own capacity (announced as
``BlockStored(medium="CPU")`` with hashes only, no tokens, as the offloading connector sends
it), and the tier's own evictions as ``BlockRemoved(medium="CPU")``. A request whose prompt
continues past its GPU hit on CPU blocks loads them instead of recomputing them
(``match_tier``; the scheduler charges the reload time). The real connector offloads as blocks
are stored rather than as they are evicted; what the router sees is the same once the GPU has
let the block go, which is when the tier matters.

One deliberate simplification: free blocks that hold no hash (partial blocks of finished
requests, never-used blocks) are handed out before any cached block is evicted. vLLM keeps
them in the same queue in free order; the difference only delays evictions slightly.

Engine block hashes are this simulator's own: a sha256 chain over the parent digest and the
block's tokens as uint32 little-endian, published as the digest's last 8 bytes read
big-endian (vLLM's int form). The router never reproduces them; it maps them from the token
ids carried by BlockStored events.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrouter.sim.events import MEDIUM_CPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_MASK64 = (1 << 64) - 1


def root_digest(model: str, seed: int = 0) -> bytes:
    """The digest every chain starts from; equal on every worker serving the same model.

    It plays the role of vLLM's NONE_HASH under a fleet-wide fixed PYTHONHASHSEED.
    """
    return hashlib.sha256(f"kvrouter-sim/1\0{model}\0{seed}".encode()).digest()


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids packed as uint32 little-endian."""
    arr = tokens if isinstance(tokens, array) and tokens.typecode == "I" else array("I", tokens)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr = array("I", arr)
        arr.byteswap()
    return arr.tobytes()


def chain_hashes(parent: bytes, packed_tokens: bytes, block_size: int) -> tuple[list[int], bytes]:
    """Engine hashes of every full block in `packed_tokens`, chained from digest `parent`.

    Returns the 64-bit hashes and the digest of the last block (or `parent` if no block is
    full), so a chain can be extended as a sequence grows.
    """
    stride = 4 * block_size
    view = memoryview(packed_tokens)
    out: list[int] = []
    digest = parent
    sha = hashlib.sha256
    for start in range(0, len(packed_tokens) - stride + 1, stride):
        digest = sha(digest + view[start : start + stride]).digest()
        out.append(int.from_bytes(digest[24:], "big") & _MASK64)
    return out, digest


@dataclass(slots=True)
class BlockTable:
    """The physical blocks one sequence holds, in token order."""

    block_ids: list[int] = field(default_factory=list)
    num_registered: int = 0
    """How many leading blocks are hashed in the cache (registered by this sequence or hit)."""


class CacheFullError(RuntimeError):
    """An allocation asked for more blocks than are free or evictable."""


class KVCache:
    """The block pool of one worker. Not thread-safe; one engine loop drives it."""

    __slots__ = (
        "_block_hash",
        "_cpu",
        "_events",
        "_free_cached",
        "_free_plain",
        "_hash_to_blocks",
        "_num_hashed",
        "_ref",
        "block_size",
        "cpu_blocks",
        "num_blocks",
    )

    def __init__(self, num_blocks: int, block_size: int, cpu_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1 or cpu_blocks < 0:
            raise ValueError("num_blocks and block_size must be >= 1, cpu_blocks >= 0")
        self.cpu_blocks = cpu_blocks
        # The CPU tier: engine hash -> None, front = evicted first.
        self._cpu: OrderedDict[int, None] = OrderedDict()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_blocks: dict[int, list[int]] = {}
        # Front = evicted first. Values unused; OrderedDict gives O(1) removal from the middle
        # when a free cached block is hit again.
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        # Popped from the end; reversed so block 0 is handed out first (easier to read).
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        self._events: list[KVEvent] = []
        self._num_hashed = 0

    # -- queries -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks no request holds (empty ones plus evictable cached ones)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        """Hashed blocks, held or free (duplicates counted per physical block)."""
        return self._num_hashed

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests: vLLM's `kv_cache_usage_perc` (0..1)."""
        return 1.0 - self.num_free / self.num_blocks

    def is_cached(self, block_hash: int) -> bool:
        """Whether a block with this engine hash is resident (hittable)."""
        return block_hash in self._hash_to_blocks

    def cached_hashes(self) -> set[int]:
        """Every resident engine hash (for tests and debugging)."""
        return set(self._hash_to_blocks)

    def eviction_order(self) -> list[int]:
        """Hashes of free cached blocks, next to be evicted first."""
        out: list[int] = []
        for b in self._free_cached:
            h = self._block_hash[b]
            assert h is not None
            out.append(h)
        return out

    def match_prefix(self, block_hashes: Sequence[int], num_tokens: int) -> list[int]:
        """Physical blocks of the longest cached prefix, capped at `num_tokens - 1` tokens.

        `block_hashes` are the hashes of the sequence's full blocks in order. Nothing is
        changed; `allocate` takes the result.
        """
        limit = min(len(block_hashes), max(num_tokens - 1, 0) // self.block_size)
        hit: list[int] = []
        for i in range(limit):
            ids = self._hash_to_blocks.get(block_hashes[i])
            if ids is None:
                break
            hit.append(ids[0])
        return hit

    def match_tier(self, block_hashes: Sequence[int], start: int, num_tokens: int) -> int:
        """How many blocks from position `start` on are held by the CPU tier, consecutively
        (under the same `num_tokens - 1` cap as a GPU hit); each is touched as used."""
        if not self._cpu:
            return 0
        limit = min(len(block_hashes), max(num_tokens - 1, 0) // self.block_size)
        n = 0
        cpu = self._cpu
        for i in range(start, limit):
            h = block_hashes[i]
            if h not in cpu:
                break
            cpu.move_to_end(h)
            n += 1
        return n

    @property
    def num_cpu_cached(self) -> int:
        """Blocks on the CPU tier."""
        return len(self._cpu)

    def can_allocate(self, hit_blocks: Sequence[int], num_new: int) -> bool:
        """Whether `allocate(table, hit_blocks, num_new)` would succeed."""
        # Hitting a free cached block takes it out of the evictable pool.
        revived = sum(1 for b in hit_blocks if self._ref[b] == 0)
        return self.num_free - revived >= num_new

    # -- mutations -----------------------------------------------------------------------

    def allocate(self, table: BlockTable, hit_blocks: Sequence[int], num_new: int) -> None:
        """Append the hit blocks (pinning them) and `num_new` fresh blocks to `table`.

        Hit blocks may only be given to an empty table. Raises CacheFullError (changing
        nothing) if not enough blocks are free.
        """
        if hit_blocks and table.block_ids:
            raise ValueError("prefix hits can only start an empty block table")
        if not self.can_allocate(hit_blocks, num_new):
            raise CacheFullError(f"{num_new} blocks needed, {self.num_free} free")
        ref = self._ref
        for b in hit_blocks:
            if ref[b] == 0:
                del self._free_cached[b]
            ref[b] += 1
        if hit_blocks:
            table.block_ids.extend(hit_blocks)
            table.num_registered = len(hit_blocks)
        plain = self._free_plain
        take = min(num_new, len(plain))
        if take:
            got = plain[-take:]
            del plain[-take:]
            got.reverse()
            for b in got:
                ref[b] = 1
            table.block_ids.extend(got)
        for _ in range(num_new - take):
            b = self._evict_one()
            ref[b] = 1
            table.block_ids.append(b)

    def register(
        self,
        table: BlockTable,
        block_hashes: Sequence[int],
        tokens: Sequence[int],
        num_full_blocks: int,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Hash the table's blocks up to `num_full_blocks` (now full) and announce them.

        `block_hashes` must cover at least `num_full_blocks` blocks and `tokens` their
        tokens. Emits one BlockStored for the run of newly registered blocks.
        """
        start = table.num_registered
        if num_full_blocks <= start:
            return
        if num_full_blocks > len(table.block_ids) or num_full_blocks > len(block_hashes):
            raise ValueError("cannot register blocks the table does not hold or hash")
        bs = self.block_size
        block_hash, hash_to_blocks = self._block_hash, self._hash_to_blocks
        new_hashes = block_hashes[start:num_full_blocks]
        for b, h in zip(table.block_ids[start:num_full_blocks], new_hashes, strict=True):
            block_hash[b] = h
            ids = hash_to_blocks.get(h)
            if ids is None:
                hash_to_blocks[h] = [b]
            else:
                ids.append(b)
        self._num_hashed += num_full_blocks - start
        table.num_registered = num_full_blocks
        chunk = tokens[start * bs : num_full_blocks * bs]
        extra: list[Any] | None = None
        if cache_salt is not None and start == 0:
            # As vLLM: the salt is an extra key of the request's first block only.
            extra = [None] * len(new_hashes)
            extra[0] = [lora_name, cache_salt] if lora_name else [cache_salt]
        self._events.append(
            BlockStored(
                block_hashes=list(new_hashes),
                parent_block_hash=block_hashes[start - 1] if start else None,
                token_ids=chunk.tolist() if isinstance(chunk, array) else list(chunk),
                block_size=bs,
                lora_name=lora_name,
                extra_keys=extra,
            )
        )

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks, tail first; cached ones stay hittable until evicted."""
        ref = self._ref
        for b in reversed(table.block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                if self._block_hash[b] is None:
                    self._free_plain.append(b)
                else:
                    self._free_cached[b] = None
        table.block_ids.clear()
        table.num_registered = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, as vLLM's `reset_prefix_cache`.

        Like vLLM it refuses (returns False, changes nothing) while any request holds
        blocks. On success it emits AllBlocksCleared.
        """
        if self.num_free != self.num_blocks:
            return False
        for b in self._free_cached:
            self._block_hash[b] = None
            self._free_plain.append(b)
        self._free_cached.clear()
        self._hash_to_blocks.clear()
        self._num_hashed = 0
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """Events since the last call, in the order they happened."""
        events, self._events = self._events, []
        return events

    # -- internals -----------------------------------------------------------------------

    def _evict_one(self) -> int:
        b, _ = self._free_cached.popitem(last=False)
        h = self._block_hash[b]
        assert h is not None
        self._block_hash[b] = None
        self._num_hashed -= 1
        ids = self._hash_to_blocks[h]
        ids.remove(b)
        if not ids:
            del self._hash_to_blocks[h]
        self._events.append(BlockRemoved([h]))
        if self.cpu_blocks and not ids:
            self._offload(h)
        return b

    def _offload(self, h: int) -> None:
        """Copy an evicted block to the CPU tier (the last GPU copy of its hash)."""
        cpu = self._cpu
        if h in cpu:
            cpu.move_to_end(h)
            return
        cpu[h] = None
        self._events.append(BlockStored([h], None, [], self.block_size, medium=MEDIUM_CPU))
        if len(cpu) > self.cpu_blocks:
            old, _ = cpu.popitem(last=False)
            self._events.append(BlockRemoved([old], medium=MEDIUM_CPU))
