"""Mooncake-format traces: loading, token synthesis, and the ideal hit ratios of a trace.

A line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}` where
each hash id stands for one 512-token block, chained: equal ids at the same position mean
the whole prefix up to that block is shared. The last block is partial (`input_length` cuts
it).

Tokens: each hash id becomes its own deterministic run of 512 token ids drawn from a PRNG
seeded by (seed, id), in [0, 128000) (below Llama-3's special tokens). Equal ids give equal
runs, so equal prefixes in the trace are equal token prefixes on the wire.

Ideal hit ratios are counted the way the simulator counts `cached_tokens`: in whole
`block_size`-token blocks of each prompt, the hit capped so at least one prompt token is
computed, summed over requests and divided by the summed prompt tokens. Requests are
replayed in trace order, each one's blocks stored before the next one looks up.
"""

from __future__ import annotations

import json
import random
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

TRACE_BLOCK_TOKENS = 512
VOCAB_SIZE = 128_000
BUNDLED_TRACE = "conversation_trace.jsonl"


class TraceError(ValueError):
    """A trace line that does not follow the Mooncake format."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One trace line."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def bundled_trace() -> Traversable:
    """The conversation trace shipped with the package (Mooncake, Apache-2.0; see NOTICE)."""
    return resources.files("kvrouter.sim").joinpath("data", BUNDLED_TRACE)


def parse_line(line: str, lineno: int = 0) -> TraceRequest:
    """Parse and check one JSONL line."""
    try:
        obj = json.loads(line)
        req = TraceRequest(
            timestamp_ms=float(obj["timestamp"]),
            input_length=int(obj["input_length"]),
            output_length=int(obj["output_length"]),
            hash_ids=tuple(int(h) for h in obj["hash_ids"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"line {lineno}: not a Mooncake trace record ({exc})") from None
    need = -(-req.input_length // TRACE_BLOCK_TOKENS)
    if req.input_length < 1 or len(req.hash_ids) != need:
        raise TraceError(
            f"line {lineno}: input_length {req.input_length} needs {need} hash_ids, "
            f"got {len(req.hash_ids)}"
        )
    return req


def iter_trace(source: str | Path | Traversable) -> Iterator[TraceRequest]:
    """Requests of a JSONL trace file (a path, or `bundled_trace()`), blank lines skipped."""
    path: Path | Traversable = Path(source) if isinstance(source, str) else source
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield parse_line(line, lineno)


def load_trace(
    source: str | Path | Traversable, *, start: int = 0, limit: int | None = None
) -> list[TraceRequest]:
    """Requests `start .. start+limit` of a trace, in file order."""
    out: list[TraceRequest] = []
    for i, req in enumerate(iter_trace(source)):
        if i < start:
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(req)
    return out


class TraceTokenizer:
    """Turns hash ids into token runs, memoizing recent ones (a conversation reuses them)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        block_tokens: int = TRACE_BLOCK_TOKENS,
        vocab_size: int = VOCAB_SIZE,
        cache_size: int = 65_536,
    ) -> None:
        if block_tokens < 1 or vocab_size < 1:
            raise ValueError("block_tokens and vocab_size must be >= 1")
        self.seed = seed
        self.block_tokens = block_tokens
        self.vocab_size = vocab_size
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._cache_size = cache_size

    def block(self, hash_id: int) -> array[int]:
        """The token run of one hash id (deterministic in (seed, hash_id))."""
        run = self._cache.get(hash_id)
        if run is not None:
            self._cache.move_to_end(hash_id)
            return run
        rng = random.Random(f"{self.seed}:{hash_id}")
        raw = array("I", rng.randbytes(4 * self.block_tokens))
        vocab = self.vocab_size
        run = array("I", [x % vocab for x in raw])
        self._cache[hash_id] = run
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return run

    def prompt(self, req: TraceRequest) -> list[int]:
        """The request's prompt: its blocks' runs back to back, cut to `input_length`."""
        out = array("I")
        for h in req.hash_ids:
            out.extend(self.block(h))
        del out[req.input_length :]
        return out.tolist()


# -- ideal hit ratios ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HitRatio:
    """Cached prompt tokens over prompt tokens."""

    hit_tokens: int
    prompt_tokens: int

    @property
    def ratio(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def block_keys(req: TraceRequest, block_size: int, trace_block_tokens: int) -> list[int]:
    """Identities of the prompt's full `block_size` blocks.

    Block j is the (j mod k)-th sub-block of hash id j // k (k = trace_block_tokens //
    block_size); chained hash ids make equal keys at equal positions mean equal prefixes.
    """
    if block_size < 1 or trace_block_tokens % block_size:
        raise ValueError("block_size must divide the trace's block size")
    k = trace_block_tokens // block_size
    n = req.input_length // block_size
    ids = req.hash_ids
    return [ids[j // k] * k + j % k for j in range(n)]


def _hit_blocks(keys: Sequence[int], cached: set[int] | OrderedDict[int, None], cap: int) -> int:
    hit = 0
    for key in keys[:cap]:
        if key not in cached:
            break
        hit += 1
    return hit


def infinite_cache_hit_ratio(
    requests: Iterable[TraceRequest],
    *,
    block_size: int = 16,
    trace_block_tokens: int = TRACE_BLOCK_TOKENS,
) -> HitRatio:
    """The hit ratio of one cache that never evicts, replaying `requests` in order."""
    cached: set[int] = set()
    hit_tokens = prompt_tokens = 0
    for req in requests:
        keys = block_keys(req, block_size, trace_block_tokens)
        cap = (req.input_length - 1) // block_size
        hit_tokens += _hit_blocks(keys, cached, cap) * block_size
        prompt_tokens += req.input_length
        cached.update(keys)
    return HitRatio(hit_tokens, prompt_tokens)


def lru_cache_hit_ratio(
    requests: Iterable[TraceRequest],
    capacity_blocks: int,
    *,
    block_size: int = 16,
    trace_block_tokens: int = TRACE_BLOCK_TOKENS,
    include_output: bool = True,
) -> HitRatio:
    """The hit ratio of one LRU cache of `capacity_blocks` blocks, replaying `requests`.

    With the fleet's total capacity this is the "pooled ideal": what a single machine with
    all the fleet's KV memory would hit, so no routing can do better on the same requests.
    After each request its blocks become most recently used, tail first (the head ends up
    newest, as the simulator frees them), then the oldest blocks are evicted down to
    capacity. With `include_output`, the full blocks the simulator would also cache for the
    generated tokens (unique to the request, never hit) take room as well.
    """
    if capacity_blocks < 0:
        raise ValueError("capacity_blocks must be >= 0")
    lru: OrderedDict[int, None] = OrderedDict()
    hit_tokens = prompt_tokens = 0
    fresh = -1  # output blocks get negative keys no prompt block can equal
    for req in requests:
        keys = block_keys(req, block_size, trace_block_tokens)
        cap = (req.input_length - 1) // block_size
        hit_tokens += _hit_blocks(keys, lru, cap) * block_size
        prompt_tokens += req.input_length
        touched: list[int] = list(keys)
        if include_output:
            total_full = (req.input_length + req.output_length) // block_size
            for _ in range(total_full - len(keys)):
                touched.append(fresh)
                fresh -= 1
        for key in reversed(touched):
            lru[key] = None
            lru.move_to_end(key)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return HitRatio(hit_tokens, prompt_tokens)
