"""The engine core of one simulated worker: continuous batching over a simulated clock.

`Scheduler` is a pure state machine with no clock or I/O, so tests can step it and check
every duration by hand; `kvrouter.sim.engine.Engine` drives it in real time.

Timing model (all durations in simulated seconds; the driver divides them by the time scale):

    step time = decode_step_s + decode_step_s_per_seq x (sequences in the step)
                + (prompt tokens prefilled in the step) / prefill_tokens_per_s
                + (prompt tokens loaded from the CPU tier in the step) / cpu_load_tokens_per_s

Each step, as vLLM v1's scheduler: running requests go first, in admission order (a decoding
request computes 1 token, a prefilling one the next chunk of its uncached prompt within the
per-step token budget); then waiting requests are admitted first-come first-served while the
batch has room, the budget lasts and the KV cache can hold the whole prompt. Admission looks
up the prefix cache, so only uncached prompt tokens are prefilled; a prefill chunk's full
blocks enter the cache when its step is scheduled (vLLM's ``allocate_slots`` caches them
then), so a request admitted behind it in the same step already reuses them. The last
prefill chunk also samples the first output token; every later step samples one more.
Requests leave the batch at step boundaries when they reach `max_tokens` (the simulator
ignores EOS), and their blocks go back to the cache tail first. If a decoding request needs
a new block and none is free, the most recently admitted request is preempted: its blocks
are freed and it goes back to the front of the queue, to be re-prefilled (mostly from the
cache) later, as vLLM does.

Consecutive pure-decode steps with an unchanged batch are identical, so `plan` offers to run
up to `max_repeats` of them at once; the driver may cut the run short at a step boundary
when a new request arrives. Per-step work is O(batch) and output tokens are appended as
array slices, never one Python iteration per token.
"""

from __future__ import annotations

import enum
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvrouter.sim.kvcache import BlockTable, KVCache, chain_hashes, token_bytes

# Generated text is this filler, started at an offset derived from the prompt, so equal
# prompts produce equal outputs (as greedy decoding would) and the bytes decode as ASCII.
_FILLER = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    b"exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. "
)
_FILLER_LEN = len(_FILLER)
_FILLER_TWICE = array("I", list(_FILLER * 2))


def filler_tokens(offset: int, start: int, count: int) -> array[int]:
    """`count` generated token ids from position `start` of a request's filler stream."""
    out = array("I")
    pos = (offset + start) % _FILLER_LEN
    while count > 0:
        n = min(count, _FILLER_LEN)
        out.extend(_FILLER_TWICE[pos : pos + n])
        count -= n
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The engine's shape and speed (see the module docstring for the timing model)."""

    block_size: int = 16
    num_blocks: int = 26_624
    prefill_tokens_per_s: float = 16_000.0
    decode_step_s: float = 0.010
    decode_step_s_per_seq: float = 0.00025
    max_batch: int = 256
    max_batched_tokens: int = 8192
    max_model_len: int = 131_072
    cpu_blocks: int = 0
    """Capacity of the CPU offload tier in blocks (0: no tier)."""
    cpu_load_tokens_per_s: float = 160_000.0
    """Tokens of KV loaded back from the CPU tier per simulated second: ten times the default
    prefill speed (a 2 MiB block of Llama-3-8B over ~25 GB/s of PCIe Gen4 is ~0.08 ms, a
    16-token prefill at 16,000 tokens/s is 1 ms), so a tier hit is cheaper than a recompute."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_batch", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prefill_tokens_per_s <= 0 or self.cpu_load_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s and cpu_load_tokens_per_s must be > 0")
        if self.cpu_blocks < 0:
            raise ValueError("cpu_blocks must be >= 0")
        if self.decode_step_s < 0 or self.decode_step_s_per_seq < 0:
            raise ValueError("decode step times must be >= 0")


def step_time_s(
    cfg: EngineConfig, num_seqs: int, prefill_tokens: int, loaded_tokens: int = 0
) -> float:
    """Simulated duration of one engine step (`loaded_tokens`: KV loaded from the CPU tier)."""
    return (
        cfg.decode_step_s
        + cfg.decode_step_s_per_seq * num_seqs
        + prefill_tokens / cfg.prefill_tokens_per_s
        + loaded_tokens / cfg.cpu_load_tokens_per_s
    )


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class RequestRejected(ValueError):
    """A request the engine can never serve (too long for the model or the whole cache)."""


class SimRequest:
    """One generation request inside the engine; the HTTP layer reads its progress."""

    __slots__ = (
        "_digest",
        "_filler_offset",
        "arrival_s",
        "cache_salt",
        "cached_tokens",
        "error",
        "finish_s",
        "first_token_s",
        "hashes",
        "lora_name",
        "max_tokens",
        "notify",
        "num_computed",
        "num_generated",
        "num_preemptions",
        "prefilling",
        "prompt_len",
        "remote_tokens",
        "request_id",
        "state",
        "table",
        "tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        root: bytes,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.lora_name = lora_name
        self.cache_salt = cache_salt
        self.tokens: array[int] = array("I", prompt)
        self.prompt_len = len(self.tokens)
        self.max_tokens = max_tokens
        self.num_generated = 0
        self.num_computed = 0
        self.num_preemptions = 0
        self.prefilling = True
        self.remote_tokens = 0
        """Leading prompt tokens whose KV was pulled from a prefill worker (P/D): admitted as
        computed, without prefill time (the pull was already waited for)."""
        self.table = BlockTable()
        self.hashes: list[int] = []
        self._digest = root
        tail = self.tokens[-16:]
        self._filler_offset = sum(tail) % _FILLER_LEN
        self.cached_tokens: int | None = None
        self.arrival_s = 0.0
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.state = RequestState.WAITING
        self.error: str | None = None
        self.notify: object | None = None
        """Opaque slot for the driver (e.g. an asyncio.Event to wake the HTTP handler)."""

    @property
    def output_tokens(self) -> array[int]:
        """Tokens generated so far."""
        return self.tokens[self.prompt_len :]

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED)

    def ensure_hashes(self, num_blocks: int, block_size: int) -> None:
        """Extend the engine-hash chain to cover the first `num_blocks` full blocks."""
        have = len(self.hashes)
        if num_blocks <= have:
            return
        packed = token_bytes(self.tokens[have * block_size : num_blocks * block_size])
        new, self._digest = chain_hashes(self._digest, packed, block_size)
        self.hashes.extend(new)

    def _sample(self, count: int) -> None:
        self.tokens.extend(filler_tokens(self._filler_offset, self.num_generated, count))
        self.num_generated += count


@dataclass(slots=True)
class StepPlan:
    """What one scheduler iteration will compute."""

    prefill: list[tuple[SimRequest, int]]
    decode: list[SimRequest]
    step_s: float
    max_repeats: int = 1
    """Identical decode steps that may run back to back (1 when anything is prefilling)."""


@dataclass(slots=True)
class StepOutcome:
    """What an executed plan changed."""

    progressed: list[SimRequest] = field(default_factory=list)
    first_tokens: list[SimRequest] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)


@dataclass(slots=True)
class EngineStats:
    """Counters exposed as vLLM's Prometheus metrics."""

    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    cpu_loaded_tokens: int = 0
    """Prompt tokens loaded from the CPU tier instead of prefilled."""
    finished: int = 0
    aborted: int = 0


class Scheduler:
    """Continuous batching over a prefix-caching KV cache, in simulated time."""

    def __init__(self, cfg: EngineConfig, root: bytes) -> None:
        self.cfg = cfg
        self.root = root
        self.cache = KVCache(cfg.num_blocks, cfg.block_size, cfg.cpu_blocks)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.stats = EngineStats()

    # -- requests ------------------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise RequestRejected if a request of this shape can never run here."""
        cfg = self.cfg
        if prompt_len < 1:
            raise RequestRejected("the prompt must contain at least one token")
        if max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        total = prompt_len + max_tokens
        if total > cfg.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {cfg.max_model_len} tokens. "
                f"However, you requested {total} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion)."
            )
        if _cdiv(total, cfg.block_size) > cfg.num_blocks:
            raise RequestRejected(
                f"the request needs {_cdiv(total, cfg.block_size)} KV-cache blocks, "
                f"the worker holds {cfg.num_blocks}"
            )

    def add(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        now_s: float,
        *,
        root: bytes | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> SimRequest:
        """Queue a request arriving at simulated time `now_s` (`root`: the hash root of its
        model and salt, default the engine's; `lora_name`: its adapter, `cache_salt` its salt,
        both named in its KV events)."""
        self.check(len(prompt), max_tokens)
        req = SimRequest(request_id, prompt, max_tokens, root or self.root, lora_name, cache_salt)
        req.arrival_s = now_s
        self.waiting.append(req)
        return req

    def abort(self, req: SimRequest, error: str | None = None) -> None:
        """Drop a request wherever it is; its blocks go back to the cache."""
        if req.done:
            return
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self.cache.free(req.table)
        req.state = RequestState.ABORTED
        req.error = error
        self.stats.aborted += 1

    def abort_all(self, error: str) -> list[SimRequest]:
        """Abort every request (engine restart); returns them."""
        victims = [*self.running, *self.waiting]
        for req in victims:
            self.abort(req, error)
        return victims

    def restart(self, error: str = "engine restarted") -> list[SimRequest]:
        """Abort everything and start from an empty cache and zeroed counters, silently."""
        victims = self.abort_all(error)
        self.cache = KVCache(self.cfg.num_blocks, self.cfg.block_size, self.cfg.cpu_blocks)
        self.stats = EngineStats()
        return victims

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- stepping ------------------------------------------------------------------------

    def plan(self, max_span_s: float = 0.0) -> StepPlan | None:
        """Schedule the next step (allocating its blocks); None if nothing can run.

        `max_span_s` bounds how much simulated time a run of identical decode steps may
        cover; 0 means one step at a time.
        """
        cfg, cache = self.cfg, self.cache
        bs = cfg.block_size
        budget = cfg.max_batched_tokens
        prefill: list[tuple[SimRequest, int]] = []
        decode: list[SimRequest] = []
        running = self.running
        loaded_tokens = 0

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            if req.prefilling:
                # Like vLLM, a prefill chunk gets its blocks in the step that computes it,
                # so a long prompt does not evict (and announce) all its blocks at once.
                n = min(len(req.tokens) - req.num_computed, budget)
                need = _cdiv(req.num_computed + n, bs) - len(req.table.block_ids)
                if not self._grow(req, need):
                    break
                prefill.append((req, n))
                self._register(req, bs, req.num_computed + n)
                budget -= n
                i += 1
                continue
            need = _cdiv(req.num_computed + 1, bs) - len(req.table.block_ids)
            if not self._grow(req, need):
                break
            decode.append(req)
            budget -= 1
            i += 1

        while self.waiting and budget > 0 and len(running) < cfg.max_batch:
            req = self.waiting[0]
            n_tokens = len(req.tokens)
            req.ensure_hashes(n_tokens // bs, bs)
            hit = cache.match_prefix(req.hashes, n_tokens)
            # Blocks past the GPU hit that the CPU tier holds are loaded, not recomputed.
            tier = cache.match_tier(req.hashes, len(hit), n_tokens) if cache.cpu_blocks else 0
            # Pulled KV counts as computed, in whole blocks, short of the last prompt token
            # (computed here, as vLLM does, to sample the first token).
            start = max((len(hit) + tier) * bs, min(req.remote_tokens, n_tokens - 1) // bs * bs)
            first = min(n_tokens - start, budget)
            need = _cdiv(start + first, bs) - len(hit)
            if not cache.can_allocate(hit, need):
                break
            self.waiting.popleft()
            cache.allocate(req.table, hit, need)
            req.num_computed = start
            if start > len(hit) * bs:
                self._register(req, bs)  # the pulled blocks are cached now (BlockStored)
            req.prefilling = True
            req.state = RequestState.RUNNING
            if req.cached_tokens is None:
                # As vLLM: tokens loaded by the KV connector count as cached.
                req.cached_tokens = (len(hit) + tier) * bs
            loaded_tokens += tier * bs
            self.stats.cpu_loaded_tokens += tier * bs
            self.stats.prefix_queries_tokens += n_tokens
            self.stats.prefix_hits_tokens += len(hit) * bs
            running.append(req)
            n = min(n_tokens - req.num_computed, budget)
            prefill.append((req, n))
            self._register(req, bs, req.num_computed + n)
            budget -= n

        if not prefill and not decode:
            return None
        prefill_tokens = sum(n for _, n in prefill)
        step = step_time_s(cfg, len(prefill) + len(decode), prefill_tokens, loaded_tokens)
        repeats = 1
        if not prefill and max_span_s > 0 and step > 0:
            repeats = min(req.max_tokens - req.num_generated for req in decode)
            repeats = max(1, min(repeats, int(max_span_s / step)))
            if repeats > 1:
                extra = [
                    max(0, _cdiv(r.num_computed + repeats, bs) - len(r.table.block_ids))
                    for r in decode
                ]
                if sum(extra) > cache.num_free:
                    repeats = 1
                else:
                    for r, n in zip(decode, extra, strict=True):
                        if n:
                            cache.allocate(r.table, (), n)
        return StepPlan(prefill, decode, step, repeats)

    def execute(self, plan: StepPlan, repeats: int, end_s: float) -> StepOutcome:
        """Apply `repeats` steps of `plan` (1 <= repeats <= plan.max_repeats), ending at
        simulated time `end_s`. Requests aborted since `plan` are skipped."""
        if not 1 <= repeats <= plan.max_repeats:
            raise ValueError(f"repeats must be in [1, {plan.max_repeats}], got {repeats}")
        bs = self.cfg.block_size
        cache = self.cache
        stats = self.stats
        out = StepOutcome()
        for req, n in plan.prefill:
            if req.state is not RequestState.RUNNING:
                continue
            req.num_computed += n
            stats.prompt_tokens += n
            if req.num_computed == len(req.tokens):
                req.prefilling = False
                req._sample(1)
                stats.generation_tokens += 1
                if req.first_token_s is None:
                    req.first_token_s = end_s
                    out.first_tokens.append(req)
            self._register(req, bs)
            out.progressed.append(req)
        for req in plan.decode:
            if req.state is not RequestState.RUNNING:
                continue
            req.num_computed += repeats
            req._sample(repeats)
            stats.generation_tokens += repeats
            self._register(req, bs)
            out.progressed.append(req)
        for req in out.progressed:
            if req.num_generated >= req.max_tokens:
                req.state = RequestState.FINISHED
                req.finish_s = end_s
                cache.free(req.table)
                out.finished.append(req)
        if out.finished:
            stats.finished += len(out.finished)
            self.running = [r for r in self.running if r.state is RequestState.RUNNING]
        return out

    def _register(self, req: SimRequest, bs: int, upto: int | None = None) -> None:
        """Cache (hash and announce) the request's full blocks up to `upto` tokens (default:
        those computed). As vLLM v1's ``allocate_slots``, a prefill chunk's blocks are cached
        when the step that computes them is scheduled, not after it ran: a request admitted
        later in the same step, or in any later one, reuses them instead of computing the same
        prefix again."""
        full = (req.num_computed if upto is None else upto) // bs
        if full > req.table.num_registered:
            req.ensure_hashes(full, bs)
            self.cache.register(
                req.table, req.hashes, req.tokens, full, req.lora_name, req.cache_salt
            )

    def _grow(self, req: SimRequest, need: int) -> bool:
        """Give a running request `need` more blocks, preempting the newest requests (vLLM's
        recompute preemption) until they fit. False if `req` itself had to be preempted."""
        while need > 0 and self.cache.num_free < need:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            self.cache.allocate(req.table, (), need)
        return True

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.cache.free(req.table)
        req.num_computed = 0
        req.remote_tokens = 0  # the pulled KV is gone with the blocks: recompute
        req.prefilling = True
        req.num_preemptions += 1
        req.state = RequestState.WAITING
        self.waiting.appendleft(req)
        self.stats.preemptions += 1
