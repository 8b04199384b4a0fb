"""The worker pool: where workers come from and whether each can take a request now.

Workers come from the static list (settings) and, with ``discovery``, from the Redis registry
or Kubernetes EndpointSlices. Each has two independent health signals:

- **active**: the monitor's periodic ``GET /health``; a failed check takes the worker out
  until a check succeeds;
- **passive** (circuit breaker): upstream failures counted on real requests. After
  ``eject_failures`` consecutive failures the circuit opens and the worker is ejected for
  ``eject_s``, doubling per repeated trip up to ``eject_max_s``. When the period ends the
  circuit is half-open: the worker takes requests again, the first success closes it, and
  one more failure trips it at once. Failures while it is ejected (requests sent before the
  circuit opened) count nothing.

A worker that has been unavailable for ``clear_grace_s`` has its residency cleared from the
index (the monitor does it, once per outage): when it returns, its cache is likely gone.

All methods take ``now`` (monotonic seconds) so the breaker is tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from router_node.models import Resolved
from router_node.settings import RouterSettings

# Samples below this many prefill tokens are ignored: their TTFT is decode step and network.
PREFILL_SAMPLE_MIN_TOKENS = 256
PREFILL_RATE_ALPHA = 0.1
# Samples a worker needs before its learned speed counts (the first few are noisy).
PREFILL_MIN_SAMPLES = 8


def relative_speeds(workers: list[Worker]) -> dict[str, float]:
    """Each worker's learned prefill rate over the mean of the learned ones; workers not yet
    learned (and every worker until two are) count as 1.0."""
    known = {w.id: w.prefill_rate for w in workers if w.prefill_samples >= PREFILL_MIN_SAMPLES}
    if len(known) < 2:
        return {}
    mean = sum(known.values()) / len(known)
    return {wid: rate / mean for wid, rate in known.items()}


@dataclass(slots=True)
class Worker:
    id: str
    url: str
    dp_rank: int | None = None
    models: frozenset[str] = frozenset()
    """Models served as configured (config file, registry); empty = every model the router
    serves, unless the worker's /v1/models says otherwise."""
    listed: frozenset[str] | None = None
    """Models its ``GET /v1/models`` listed at the last poll (adapters included); None =
    never polled successfully. When known, it wins over `models`."""
    parents: dict[str, str] = field(default_factory=dict)
    """Adapter -> base model, from the ``parent`` of its /v1/models entries."""
    capacity_blocks: int = 0
    """KV capacity in router blocks; 0 = unknown (no LRU trim)."""
    source: str = "static"
    registered: bool = True
    """False once a discovered worker left its source (a lapsed heartbeat, a deleted pod);
    kept until its residency is cleared."""
    healthy: bool = True
    failures: int = 0
    trips: int = 0
    half_open: bool = False
    ejected_until: float = 0.0
    down_since: float | None = None
    cleared: bool = False
    inflight: int = 0
    """Requests this router replica has in flight on the worker (the local load)."""
    prefill_pending: int = 0
    """Prompt tokens this replica sent the worker that have no first token yet."""
    capacity_source: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    role: str = "both"
    """Prefill/decode pool: ``prefill`` (prefill legs only), ``decode`` (decode legs and whole
    requests when the prefill hop is skipped) or ``both`` (whole requests; either leg)."""
    prefill_rate: float = 0.0
    """Prompt tokens per second it prefills, learned from its TTFTs (0 = not yet known)."""
    prefill_samples: int = 0

    def observe_prefill(self, tokens: float, seconds: float) -> None:
        """One TTFT: `tokens` of prefill (the request's uncached prompt plus the prefill
        queued ahead of it at dispatch) took `seconds` to the first byte. An exponentially
        weighted mean of tokens/s, so a worker that slows down (or a replacement GPU) is
        learned again within tens of requests."""
        if tokens < PREFILL_SAMPLE_MIN_TOKENS or seconds <= 0:
            return  # a short prefill's TTFT is mostly fixed overhead, not throughput
        rate = tokens / seconds
        self.prefill_samples += 1
        alpha = max(PREFILL_RATE_ALPHA, 1.0 / self.prefill_samples)
        self.prefill_rate += alpha * (rate - self.prefill_rate)

    def __post_init__(self) -> None:
        if self.dp_rank is not None:
            # vLLM (and SGLang) route a request to the data-parallel rank this header names.
            self.headers = {"X-data-parallel-rank": str(self.dp_rank)}

    @property
    def address(self) -> str:
        """``host:port`` of its URL: the name an endpoint picker gives Envoy (and a subset
        hint uses) for this worker."""
        netloc = urlsplit(self.url).netloc
        return netloc.rpartition("@")[2]

    def available(self, now: float) -> bool:
        return self.registered and self.healthy and now >= self.ejected_until

    def serves(self, model: str) -> bool:
        names = self.listed if self.listed is not None else self.models
        return not names or model in names

    def models_among(self, configured: Iterable[str]) -> list[str]:
        """The models whose records this worker may hold: the configured ones and the ones
        it lists, that it serves."""
        names = dict.fromkeys(configured)
        names.update(dict.fromkeys(sorted(self.listed or ())))
        return [m for m in names if self.serves(m)]

    @property
    def wildcard(self) -> bool:
        """True when nothing says which models it serves (taken to serve every model)."""
        return self.listed is None and not self.models

    def state(self, now: float) -> str:
        if not self.registered:
            return "deregistered"
        if not self.healthy:
            return "unhealthy"
        if now < self.ejected_until:
            return "ejected"
        return "half_open" if self.half_open else "up"


class WorkerPool:
    """Every known worker, by id, with the circuit breaker."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.workers: dict[str, Worker] = {}
        for spec in settings.workers:
            self.workers[spec.id] = Worker(
                spec.id,
                spec.url,
                spec.dp_rank,
                models=frozenset(spec.models),
                capacity_blocks=settings.worker_capacity_blocks,
                capacity_source="config" if settings.worker_capacity_blocks else "",
                role=spec.role,
            )

    def candidates(self, model: str, now: float) -> list[Worker]:
        """Workers that serve `model` and can take a request now."""
        return [w for w in self.workers.values() if w.serves(model) and w.available(now)]

    def candidates_for(
        self, model: Resolved, placement: str, now: float
    ) -> list[tuple[Worker, bool]]:
        """(worker, has the model loaded) for the workers that can take `model` now.

        A base model: the workers serving it. An adapter: those that list it (or say nothing
        about their models) and, with ``placement == "any_base_worker"``, the other workers of
        its base model, flagged as not having it loaded.
        """
        out: list[tuple[Worker, bool]] = []
        for w in self.workers.values():
            if not w.available(now):
                continue
            if w.serves(model.name):
                out.append((w, True))
            elif (
                model.lora_name is not None
                and placement == "any_base_worker"
                and w.serves(model.base.name)
            ):
                out.append((w, False))
        return out

    def set_roles(self, source: str, roles: Iterable[tuple[str, str]]) -> None:
        """Apply (worker id, role) pairs from `source` to the workers it owns."""
        for wid, role in roles:
            w = self.workers.get(wid)
            if w is not None and w.source == source:
                w.role = role

    @property
    def disaggregated(self) -> bool:
        """True when some worker is in the prefill pool (the P/D split is in use)."""
        return any(w.role == "prefill" for w in self.workers.values())

    def pools(self, now: float) -> dict[str, list[str]]:
        """Worker ids by role, available ones only (for /ready)."""
        out: dict[str, list[str]] = {r: [] for r in ("prefill", "decode", "both")}
        for w in self.workers.values():
            if w.available(now):
                out[w.role].append(w.id)
        return out

    def lists(self, model: str) -> bool:
        """True if some known worker, available or not, names `model` among its models."""
        return any(
            model in (w.listed if w.listed is not None else w.models) for w in self.workers.values()
        )

    def adapter_parent(self, model: str) -> str | None:
        """The base model some worker's /v1/models gives as `model`'s parent, if any."""
        for w in self.workers.values():
            parent = w.parents.get(model)
            if parent is not None:
                return parent
        return None

    def get(self, worker_id: str) -> Worker | None:
        return self.workers.get(worker_id)

    # -- passive health --------------------------------------------------------------------
    def record_success(self, worker: Worker) -> None:
        worker.failures = 0
        worker.trips = 0
        worker.half_open = False

    def record_failure(self, worker: Worker, now: float) -> bool:
        """Count an upstream failure; returns True when it opened the circuit. A failure while
        the worker is ejected counts nothing: it is a request sent before the circuit opened
        (an engine that restarts fails all it runs at once, and each would otherwise double
        the ejection: a dozen aborted streams kept a worker back in 1 s out for a minute)."""
        if now < worker.ejected_until:
            return False
        worker.failures += 1
        if worker.half_open or worker.failures >= self.settings.eject_failures:
            period = min(self.settings.eject_s * (2**worker.trips), self.settings.eject_max_s)
            worker.ejected_until = now + period
            worker.trips += 1
            worker.failures = 0
            worker.half_open = True
            return True
        return False

    # -- active health ---------------------------------------------------------------------
    def record_check(self, worker: Worker, ok: bool) -> None:
        worker.healthy = ok

    # -- dynamic sources (the Redis registry, Kubernetes EndpointSlices) --------------------
    def sync_source(
        self,
        source: str,
        entries: Iterable[tuple[str, str, tuple[str, ...], int, int | None]],
    ) -> list[str]:
        """Make the workers of `source` match `entries` (id, url, models, capacity, dp rank);
        returns the ids that joined.

        Static workers win over an entry with the same id. A worker of `source` missing from
        `entries` is marked unlisted (not dropped: the monitor still has to clear its
        residency after the grace period, then forgets it).
        """
        seen: set[str] = set()
        joined: list[str] = []
        for wid, url, models, capacity, rank in entries:
            seen.add(wid)
            w = self.workers.get(wid)
            if w is not None and w.source == "static":
                continue
            if w is None or w.url != url or w.dp_rank != rank:
                w = self.workers[wid] = Worker(wid, url, rank, source=source)
                joined.append(wid)
            elif not w.registered:
                joined.append(wid)
            w.registered = True
            w.models = frozenset(models)
            if capacity:
                w.capacity_blocks = capacity
                w.capacity_source = source
            elif not w.capacity_blocks and self.settings.worker_capacity_blocks:
                w.capacity_blocks = self.settings.worker_capacity_blocks
                w.capacity_source = "config"
        for w in self.workers.values():
            if w.source == source and w.id not in seen:
                w.registered = False
        return joined

    def sync_registry(
        self,
        entries: Iterable[tuple[str, str, tuple[str, ...], int, int | None]],
    ) -> list[str]:
        """`sync_source` for the Redis registry."""
        return self.sync_source("registry", entries)

    def forget(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None and w.source != "static" and not w.registered and w.inflight == 0:
            del self.workers[worker_id]

    # -- outage bookkeeping ----------------------------------------------------------------
    def due_for_clearing(self, now: float) -> list[Worker]:
        """Workers out for longer than the grace period whose residency is not cleared yet.
        Also starts and ends each worker's outage clock."""
        due: list[Worker] = []
        grace = self.settings.clear_grace_s
        for w in self.workers.values():
            if w.available(now):
                w.down_since = None
                w.cleared = False
                continue
            if w.down_since is None:
                w.down_since = now
            if not w.cleared and now - w.down_since >= grace:
                due.append(w)
        return due
