"""Prediction feedback: what the engine says it had cached against what the router matched.

Engines report the prompt tokens they served from their prefix cache in the response's usage
(``usage.prompt_tokens_details.cached_tokens`` on chat and completions, the final usage chunk
of a stream; ``usage.input_tokens_details.cached_tokens`` on responses). For each such
response this module

1. observes the prediction error, engine cached minus router matched tokens, in a histogram;
2. heals the index when the engine had fewer whole blocks than the router matched: the
   worker's records of the request's chain past the engine's depth are dropped (one Lua call,
   off the request path), and the first of them is marked a hole, so every chain through it
   stops matching that worker. A worker that silently lost its cache (a restart without
   events, lost eviction notices) stops attracting traffic after a request instead of after
   its records' TTL.

Engines count cached tokens in whole blocks (vLLM also never counts the prompt's last token),
so the comparison is in whole blocks and the router's side is capped at the blocks an engine
can reuse (``Plan.matched_blocks``): rounding alone never triggers a correction.

The cost of a correction: the engine did compute the missing blocks for this request and now
holds them, but their records on that worker are dropped too (the hole must cut the stale
subtree behind them). The next dispatch of the chain, or the engine's next event for it,
records them again; until then the router under-predicts that chain on that worker, which
costs affinity, never a misroute.

Not observed: P/D decode legs (their worker's cached tokens count the blocks the prefill
worker pushed, not the decode worker's own cache) and plans that did not read the index
(baseline policies, Redis down: there was no prediction).

**Races are not losses.** A request that matched blocks another in-flight request to the same
worker recorded at dispatch, before the engine finished computing them, gets fewer cached
tokens than matched though nothing was lost. So this replica tracks its in-flight requests
per worker (`dispatched` / `finished`); at dispatch it notes how deep the new chain shares a
prefix with one sent there earlier and still in flight, and a later shortfall within that
depth corrects nothing (only blocks past it can be dropped). Requests in flight on *other*
replicas are not seen: their races can still drop records that become true a moment later
(an under-prediction until the next record, never a misroute).

**A lost block says what else is lost.** Engines evict the least recently used blocks first
(vLLM's free queue, SGLang's radix LRU). When this replica saw a request through the first
missing block *complete* on that worker (a witness: the engine held the block then), dispatched
at time t, the block has been evicted since, and so has every block last used before t. The
correction then also drops the worker's records whose last access (the ``lru`` set) is older
than t (``KVR_FEEDBACK_LRU_CUT``). A silent restart is healed by the first request that shows
it: the hottest block is gone, and with it every stale chain on that worker, not one misrouted
request per chain. Only a completed request is a witness, so a race with a request still in
flight cuts nothing. The inference is approximate where the engine's order differs from the
router's (blocks free when a request ends, the ``lru`` score is its dispatch): a record dropped
while the engine still holds it costs that prefix's affinity until its next dispatch or event,
never a misroute. Witnesses are the last ``WITNESSES`` requests per worker this replica saw
complete.

**A loss too small for an eviction is an emptied cache.** The witnessed block is evicted only
once blocks used after the witness was sent fill the engine's cache. When the worker's records
used since fill less than ``KVR_FEEDBACK_RESET_FILL`` of its known capacity, the engine emptied
its cache instead (a restart, a reset), and every chain used after the witness is stale too:
the cut moves to when the request that showed the loss was sent (`_emptied`). The share leaves
room for blocks the records do not see (outputs, traffic that bypasses the router); when it
is wrong, the cost is affinity, never a misroute.

**An aborted stream is a restart.** Engines abort the requests they are running when they
restart or die (vLLM's engine-dead error, the simulator's restart: an error event in a stream
that had opened, or the connection dropped mid-stream), and a restarted engine's cache is
empty. So such an abort drops every record of the worker last used before it
(``KVR_FEEDBACK_ABORT_CLEAR``), before any request completes there to show the loss: the
requests sent there while the first misrouted response is still being computed (which report
their cached tokens only at their end) no longer follow stale records. One restart aborts
every request in flight there; the first abort seen drops the records, and the aborts of
requests sent before that drop are the same restart (nothing is dropped again, so records of
requests already sent to the new engine stay). What it costs when the abort was not a restart
(an engine failing one request with a 5xx for another reason): that worker's affinity until
its prefixes are dispatched there again, never a misroute. A failure before the stream opens
(a reset keep-alive connection, an HTTP 5xx status) is not taken as a restart: a load shedder
or a connection closed for idling answers that way too.

**A refused connection is an outage.** Nothing listens on the worker's port: its engine is
down (restarting, crashed, rescheduled), and when it listens again its cache is empty. The
first refusal of an outage, seen on a request or on the monitor's health check
(``KVR_FEEDBACK_REFUSED_CLEAR``), drops every record of that worker last used before it, so
an engine that restarts while idle is healed before any request lands on it. The outage ends
when the worker answers again (a response, a passing health check); later refusals in the
same outage drop nothing more. What it costs when the cache survived (only the HTTP server
restarted): that worker's affinity until its prefixes are dispatched there again. A request
routed there before such a clear (an abort's or a refusal's) had run, that then fails there,
drops its whole chain: its dispatch refreshed the dead engine's records after the clear's cut.

The logic is here, behind a few calls (`dispatched`, `observe_body`, `finished`), so any front
end that reads a response's usage can use it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from router_node.metrics import Metrics
from router_node.routing import Plan
from router_node.settings import RouterSettings
from router_node.shared_index import SharedIndex
from router_node.workers import Worker

log = logging.getLogger(__name__)

# "cached_tokens": N inside usage's prompt/input token details. A completion's text cannot
# match: quotes inside JSON strings are escaped.
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)\s*[,}]')

WITNESSES = 64
"""Completed requests kept per worker as witnesses of what its engine held (their chains are
the plans' own lists: a reference each, no copy)."""

CUT_CALLS = 4096
"""Most calls one correction makes to drop records older than its cut (each drops at most
``feedback_max_blocks``, so no call stalls Redis): a safety bound only. A cut must finish: a
restart's clear that stopped short would leave the worker's most recently used records, the
ones most likely to be matched, and each would cost a misrouted request."""


@dataclass(slots=True, eq=False)
class _Flight:
    """A request of this replica's, in flight on a worker or completed there."""

    chain: list[int]
    sent: float
    """time.monotonic() at dispatch (the router wrote its records' last access then)."""
    done: float = field(default=0.0)


def connection_refused(exc: BaseException) -> bool:
    """Whether `exc` is a refused TCP connection (nothing listens on the port), as aiohttp
    raises it (ClientConnectorError wrapping the OSError) or as the OSError itself."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    os_error = getattr(exc, "os_error", None)
    return isinstance(os_error, OSError) and os_error.errno == errno.ECONNREFUSED


def cached_tokens_in(data: bytes) -> int | None:
    """The engine's cached prompt tokens reported in `data` (a response body or a piece of a
    stream), or None when it reports none."""
    found = _CACHED.search(data)
    return int(found.group(1)) if found is not None else None


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading blocks chains `a` and `b` share. Block keys are chained (each hashes
    its parent), so equal keys at a position mean equal prefixes up to it: a binary search."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[hi:] differs unless hi is the end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Feedback:
    """Error histogram and index correction from engines' reported cached tokens."""

    def __init__(
        self,
        settings: RouterSettings,
        shared: SharedIndex,
        metrics: Metrics,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        workers: Callable[[str], Worker | None] | None = None,
    ) -> None:
        """`spawn` starts a background task the app drains at shutdown (corrections run off
        the request path); `workers`: a worker by id (its capacity and models), for the
        inference of an emptied cache."""
        self.settings = settings
        self.workers = workers or (lambda worker: None)
        self.shared = shared
        self.metrics = metrics
        self.spawn = spawn
        # (model, worker) -> this replica's requests in flight there.
        self._inflight: dict[tuple[str, str], list[_Flight]] = {}
        # (model, worker) -> the last requests that completed there, oldest first.
        self._completed: dict[tuple[str, str], deque[_Flight]] = {}
        # (model, worker) -> when an aborted stream last dropped its records (monotonic).
        self._aborts: dict[tuple[str, str], float] = {}
        # worker -> when a refusal last dropped its records; when it last answered.
        self._down: dict[str, float] = {}
        self._up: dict[str, float] = {}
        # (model, worker) -> restart clears running; when the last one finished.
        self._clearing: dict[tuple[str, str], int] = {}
        self._cleared: dict[tuple[str, str], float] = {}

    def dispatched(self, model: str, worker: str, plan: Plan) -> int:
        """A request with `plan` was sent to `worker`: returns how many leading blocks of its
        chain an earlier request still in flight there shares (the engine may still be
        computing those: a shortfall within them is a race, not a loss). Pair with
        `finished`."""
        flights = self._inflight.setdefault((model, worker), [])
        racing = max((common_prefix(plan.chain, f.chain) for f in flights), default=0)
        flights.append(_Flight(plan.chain, time.monotonic()))
        return racing

    def _flight(self, model: str, worker: str, plan: Plan) -> _Flight | None:
        for f in self._inflight.get((model, worker), ()):
            if f.chain is plan.chain:
                return f
        return None

    def finished(self, model: str, worker: str, plan: Plan) -> None:
        """The request `dispatched` with `plan` is done (answered, failed or cancelled)."""
        flight = self._flight(model, worker, plan)
        if flight is None:
            return
        flights = self._inflight[(model, worker)]
        flights.remove(flight)  # by identity (eq=False)
        if not flights:
            del self._inflight[(model, worker)]

    def unanswered(
        self,
        model: str,
        worker: str,
        plan: Plan,
        racing: int = 0,
        after: Awaitable[Any] | None = None,
    ) -> None:
        """The request `dispatched` with `plan` failed on `worker` before any answer (refused,
        reset, 5xx, an empty stream): the engine never computed its prompt, so the records its
        dispatch wrote past the blocks the worker already had are false. They are dropped
        (blocks an earlier request still in flight there shares are left: it may compute
        them). Without this a request in flight when its engine restarts leaves its new blocks
        on the dead cache, and its conversation's next turn is sent back there. `after`: the
        attempt's dispatch round trip; the correction waits for it (a record landing after
        the correction would outlive it)."""
        if not (self.settings.feedback_heal and plan.indexed):
            return
        start = max(plan.depths.get(worker, 0), racing)
        flight = self._flight(model, worker, plan)
        key = (model, worker)
        if self._clearing.get(key) or (
            flight is not None and flight.sent <= self._cleared.get(key, -1.0)
        ):
            # Routed before a restart's clear had run: the depth it matched there is the dead
            # engine's, and its dispatch refreshed those records after the clear's cut.
            start = 0
        stale = plan.chain[start:][: self.settings.feedback_max_blocks]
        if stale:
            self.spawn(self._correct(model, worker, stale, 0.0, 0, after))

    def aborted(
        self, model: str, worker: str, plan: Plan, after: Awaitable[Any] | None = None
    ) -> None:
        """The engine `worker` aborted the request `dispatched` with `plan` after its stream
        opened: it restarted or died, and its cache is gone. Drops the worker's records last
        used before now (this request's chain first, its first block marked a hole), once per
        restart (see the module's docstring). Call before `finished`. `after`: this request's
        dispatch round trip, waited for first (as in `unanswered`)."""
        if not (self.settings.feedback_heal and self.settings.feedback_abort_clear):
            return
        key = (model, worker)
        flight = self._flight(model, worker, plan)
        last = self._aborts.get(key)
        if last is not None and flight is not None and flight.sent < last:
            return  # sent before the last drop: the same restart
        now = time.monotonic()
        self._aborts[key] = now
        # What completed there before the restart witnesses nothing about the new engine.
        self._completed.pop(key, None)
        self.metrics.index_abort_clears.labels(model, worker).inc()
        log.warning(
            "worker %s aborted a running request: taken as an engine restart, its records of "
            "%s last used before now are dropped",
            worker,
            model,
        )
        chain = plan.chain[: self.settings.feedback_max_blocks] if plan.indexed else []
        self.spawn(self._clear(model, worker, chain, now, after))

    def answered(self, worker: str) -> None:
        """`worker` answered (a response opened, a health check passed): an outage is over."""
        self._up[worker] = time.monotonic()

    def refused(
        self,
        worker: str,
        plan: tuple[str, Plan] | None = None,
        after: Awaitable[Any] | None = None,
    ) -> bool:
        """A connection to `worker` was refused: its engine is down and its cache lost. Drops
        its records of every model it serves last used before now, once per outage (see the
        module's docstring); returns whether it did. `plan`: the refused request's model and
        plan, whose chain is dropped explicitly once `after` (its dispatch round trip) is done
        (records it wrote there land after the refusal instant)."""
        if not (self.settings.feedback_heal and self.settings.feedback_refused_clear):
            return False
        last = self._down.get(worker)
        if last is not None and self._up.get(worker, -1.0) < last:
            return False  # not answered since the last drop: the same outage
        now = time.monotonic()
        self._down[worker] = now
        log.warning(
            "worker %s refused a connection: its engine is down, its records last used before "
            "now are dropped",
            worker,
        )
        for model in dict.fromkeys([*self._models(worker), *([plan[0]] if plan else [])]):
            self.metrics.index_refused_clears.labels(model, worker).inc()
            chain: list[int] = []
            if plan is not None and plan[0] == model and plan[1].indexed:
                chain = plan[1].chain[: self.settings.feedback_max_blocks]
            self.spawn(self._clear(model, worker, chain, now, after if chain else None))
        return True

    def _models(self, worker: str) -> list[str]:
        """The models whose records `worker` may hold (every configured one when this replica
        does not know the worker)."""
        info = self.workers(worker)
        if info is None:
            return list(self.settings.models)
        return info.models_among(self.settings.models)

    def _witness(
        self, model: str, worker: str, chain: list[int], pos: int, before: float
    ) -> _Flight | None:
        """The latest-sent witness: a request that completed on `worker` before `before` and
        whose chain has `chain`'s block at `pos` (chained keys: the same prefix)."""
        key = chain[pos]
        return max(
            (
                f
                for f in self._completed.get((model, worker), ())
                if f.done < before and len(f.chain) > pos and f.chain[pos] == key
            ),
            key=lambda f: f.sent,
            default=None,
        )

    def observe_body(
        self, model: str, worker: str, plan: Plan, data: bytes, racing: int = 0
    ) -> bool:
        """Look for cached tokens in `data`; observe them if found. Returns True once found
        (so a stream stops looking). `racing`: what `dispatched` returned."""
        cached = cached_tokens_in(data)
        if cached is None:
            return False
        self.observe(model, worker, plan, cached, racing)
        return True

    def observe(
        self, model: str, worker: str, plan: Plan, cached_tokens: int, racing: int = 0
    ) -> None:
        """The engine `worker` served `cached_tokens` of the plan's prompt from its cache;
        blocks below `racing` were being computed for an earlier request (not corrected)."""
        if not plan.indexed:
            return
        error = cached_tokens - plan.matched_tokens(worker)
        self.metrics.prediction_error.labels(model).observe(error)
        if error:
            direction = "under" if error > 0 else "over"
            self.metrics.mispredicted_tokens.labels(model, direction).inc(abs(error))
        engine_blocks = cached_tokens // plan.block_size
        matched_blocks = plan.matched_blocks(worker)
        flight = self._flight(model, worker, plan)
        witness = None
        if flight is not None:
            if self.settings.feedback_lru_cut and engine_blocks < matched_blocks:
                witness = self._witness(model, worker, plan.chain, engine_blocks, flight.sent)
            # The engine computed this prompt: a witness for later shortfalls on the worker.
            flight.done = time.monotonic()
            witnesses = self._completed.get((model, worker))
            if witnesses is None:
                witnesses = self._completed[(model, worker)] = deque(maxlen=WITNESSES)
            witnesses.append(flight)
        if not self.settings.feedback_heal or engine_blocks >= matched_blocks:
            return
        start = max(engine_blocks, racing)
        stale = plan.chain[start:matched_blocks]
        cut = 0.0
        if witness is not None:
            # The witness's own blocks past the lost one went first (an engine evicts a
            # chain's tail before its head); its record was written a moment after `sent`, so
            # the cut below does not reach them.
            stale = list(dict.fromkeys(stale + witness.chain[engine_blocks + 1 :]))
            cut = witness.sent
        stale = stale[: self.settings.feedback_max_blocks]
        if stale:
            # Block i of a record scores its dispatch - i us (transport.RecordCall).
            reset_at = flight.sent if witness is not None and flight is not None else 0.0
            self.spawn(self._correct(model, worker, stale, cut, engine_blocks, reset_at=reset_at))

    async def _clear(
        self,
        model: str,
        worker: str,
        chain: list[int],
        cut: float,
        after: Awaitable[Any] | None,
    ) -> None:
        """A restart's clear (`_correct` with a cut at `cut`), its progress kept so that a
        request routed before it ran drops its whole chain when it fails (`unanswered`)."""
        key = (model, worker)
        self._clearing[key] = self._clearing.get(key, 0) + 1
        try:
            await self._correct(model, worker, chain, cut, 0, after)
        finally:
            self._clearing[key] -= 1
            if not self._clearing[key]:
                del self._clearing[key]
            self._cleared[key] = time.monotonic()

    async def _emptied(self, model: str, worker: str, cut_us: int, reset_at: float) -> bool:
        """Whether a block `worker`'s engine held at `cut_us` (a witness's dispatch) is gone
        because the engine emptied its cache, not because it evicted the block: an LRU engine
        evicts a block only once blocks used after it fill its cache, so when the worker's
        records used since, of every model it serves (adapters have their own records and share
        the cache), fill less than ``feedback_reset_fill`` of its capacity, the cache was
        emptied (a restart, a reset), and the other models' records last used before
        `reset_at` are dropped too. Outputs' blocks and traffic that bypasses the router
        are not in the records: the share leaves room for them. Unknown capacity: False."""
        info = self.workers(worker)
        capacity = info.capacity_blocks if info is not None else 0
        fill = self.settings.feedback_reset_fill
        if info is None or not capacity or not fill:
            return False
        # Every model the worker serves (base models, adapters: each its own records) shares
        # its cache.
        models = list(dict.fromkeys([model, *self._models(worker)]))
        used = 0
        for m in models:
            n = await self.shared.used_since(m, worker, cut_us)
            if n is None:
                return False
            used += n
            if used >= fill * capacity:
                return False
        for m in models[1:]:
            # An emptied cache lost them too (this model's records go with the caller's cut).
            self.spawn(self._correct(m, worker, [], reset_at, 0))
        key = (model, worker)
        done = self._completed.get(key)
        if done:
            # What completed before the restart witnesses nothing about the new engine.
            self._completed[key] = deque((f for f in done if f.sent >= reset_at), WITNESSES)
        self.metrics.index_reset_clears.labels(model, worker).inc()
        log.warning(
            "worker %s lost a block its engine held, with %d blocks used since (capacity %d): "
            "taken for an emptied cache, its records of %s last used before the request that "
            "showed it are dropped",
            worker,
            used,
            capacity,
            ", ".join(models),
        )
        return True

    async def _correct(
        self,
        model: str,
        worker: str,
        stale: list[int],
        cut: float,
        offset_us: int,
        after: Awaitable[Any] | None = None,
        *,
        reset_at: float = 0.0,
    ) -> None:
        """Drop `stale` and, when `cut` (a time.monotonic() instant) is set, the worker's
        records last accessed more than `offset_us` before it, in bounded calls; once `after`
        (the dispatch that wrote them) is done, whatever its outcome. `reset_at`: when the
        request that showed the loss was sent; the cut moves there when the loss cannot be an
        eviction (`_emptied`)."""
        if after is not None:
            await asyncio.wait([asyncio.ensure_future(after)])
        cut_us = 0
        if cut:
            now_us = await self.shared.server_now_us()
            if now_us is None:
                return  # Redis is down: the correction is dropped, the TTL still applies.
            now = time.monotonic()
            # The instant on the clock the records' last accesses were written with.
            cut_us = now_us - int((now - cut) * 1e6) - offset_us
            if reset_at and await self._emptied(model, worker, cut_us, reset_at):
                cut_us = now_us - int((now - reset_at) * 1e6)
        started = time.monotonic()
        limit = self.settings.feedback_max_blocks
        removed = older = 0
        for call in range(CUT_CALLS):
            got = await self.shared.correct_chain(model, worker, stale, cut_us=cut_us, limit=limit)
            if got is None:
                if call == 0:
                    return  # Redis is down: the correction is dropped, the TTL still applies.
                break
            removed += got[0]
            older += got[1]
            if got[1] < limit:
                break
        self.metrics.index_corrections.labels(model).inc()
        self.metrics.index_corrected_blocks.labels(model).inc(removed + older)
        if older:
            self.metrics.index_lru_cut_blocks.labels(model).inc(older)
        log.debug(
            "feedback: %d stale records of %s dropped on %s, and %d last used before a cut, "
            "in %.1f ms", removed, model, worker, older, (time.monotonic() - started) * 1e3,
        )  # fmt: skip
