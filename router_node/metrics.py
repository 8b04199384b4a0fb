"""The router's Prometheus metrics, on prometheus_client with one registry per app.

Each app owns its `CollectorRegistry` (never the process-wide default), so tests and
several routers embedded in one process never collide. Metric names are what dashboards
query; keep them. Per-model metrics carry a ``model`` label (the name the client asked for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
# Event-loop lag: from "on time" to "the run measured the machine, not the router".
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
# Engine cached minus router matched tokens: negative is over-prediction (the router believed
# in blocks the engine did not have), positive under-prediction. Symmetric, block-sized steps
# near 0, where a healthy index lives.
ERROR_BUCKETS = (
    -16384,
    -4096,
    -1024,
    -256,
    -64,
    -16,
    -1,
    0,
    15,
    63,
    255,
    1023,
    4095,
    16383,
)

# generate_latest writes format 0.0.4; say so (CONTENT_TYPE_LATEST names a newer one).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class ModelTotal(Collector):
    """A per-model counter exported as ``<name>`` exactly.

    ``kvrouter_matched_tokens_total`` shares its stem with the histogram
    ``kvrouter_matched_tokens``; a prometheus_client `Counter` of that name claims the
    histogram's family name and is refused by the registry. This collector has no
    ``describe``, so the registry skips the name check, and it writes no ``_created``
    sample (which would repeat the histogram's)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._values: dict[str, float] = {}
        registry.register(self)

    def inc(self, model: str, amount: float) -> None:
        """Add `amount` to the model's total."""
        self._values[model] = self._values.get(model, 0.0) + amount

    def get(self, model: str) -> float:
        """The model's total so far."""
        return self._values.get(model, 0.0)

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=("model",))
        for model, value in sorted(self._values.items()):
            fam.add_metric((model,), value)
        yield fam


class CallbackGauge(Collector):
    """A labelled gauge whose samples are read at scrape time from a callback."""

    def __init__(
        self, name: str, documentation: str, label: str, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.source: Callable[[], Iterable[tuple[str, float]]] | None = None
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=(self.label,))

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(self.name, self.documentation, labels=(self.label,))
        if self.source is not None:
            for value_label, value in self.source():
                fam.add_metric((value_label,), value)
        yield fam


class Metrics:
    """Every metric the router exports. One instance (and one registry) per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvrouter_requests_total",
            "HTTP requests by endpoint, status and model (empty off the inference endpoints)",
            ("endpoint", "status", "model"),
            registry=r,
        )
        self.decisions = Counter(
            "kvrouter_routing_decisions_total",
            "routing decisions by policy, reason and model",
            ("policy", "reason", "model"),
            registry=r,
        )
        self.rechecks = Counter(
            "kvrouter_lease_rechecks_total",
            "decisions re-checked against the other replicas' leases (lease_recheck), by "
            "outcome: kept (still the best worker) or moved",
            ("outcome",),
            registry=r,
        )
        self.matched_tokens = Histogram(
            "kvrouter_matched_tokens",
            "prompt tokens the chosen worker already held, per request",
            ("model",),
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.matched_tokens_total = ModelTotal(
            "kvrouter_matched_tokens_total", "prompt tokens the chosen worker already held", r
        )
        self.prompt_tokens_total = Counter(
            "kvrouter_prompt_tokens_total",
            "prompt tokens of routed requests",
            ("model",),
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "kvrouter_lookup_seconds",
            "Redis lookup round trip (residency and load), by model",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "kvrouter_time_to_first_byte_seconds",
            "from the request's arrival to the first byte sent back (a streamed response's "
            "first chunk: TTFT through the router; a whole response otherwise), by model",
            ("model",),
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "kvrouter_tokenize_seconds",
            "time to tokenize a request's prompt",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvrouter_upstream_errors_total",
            "worker failures by worker and kind (connect, status, timeout, stream)",
            ("worker", "kind"),
            registry=r,
        )
        self.worker_requests = Counter(
            "kvrouter_worker_requests_total",
            "requests a worker answered (any status), by worker",
            ("worker",),
            registry=r,
        )
        self.retries = Counter(
            "kvrouter_retries_total",
            "requests moved to the next-best worker before a byte",
            registry=r,
        )
        self.redis_errors = Counter(
            "kvrouter_redis_errors_total", "failed Redis calls by operation", ("op",), registry=r
        )
        self.redis_up = Gauge(
            "kvrouter_redis_up", "1 when the shared index is reachable", registry=r
        )
        self.worker_up = Gauge(
            "kvrouter_worker_up", "1 when a worker can take requests", ("worker",), registry=r
        )
        self.inflight = Gauge(
            "kvrouter_inflight_requests",
            "requests this replica has in flight",
            ("worker",),
            registry=r,
        )
        self.ejections = Counter(
            "kvrouter_worker_ejections_total",
            "circuit breaker trips by worker",
            ("worker",),
            registry=r,
        )
        self.cleared = Counter(
            "kvrouter_worker_residency_cleared_total",
            "residency cleared for workers out longer than the grace period",
            ("worker",),
            registry=r,
        )
        self.pd_decisions = Counter(
            "kvrouter_pd_decisions_total",
            "prefill/decode decisions: split, or why the request ran whole on a decode worker "
            "(short_suffix, prefill_saturated, no_prefill_worker)",
            ("reason",),
            registry=r,
        )
        self.pd_fallbacks = Counter(
            "kvrouter_pd_fallbacks_total",
            "split requests that ran whole on the decode worker after all, by cause "
            "(prefill_failed, missing_params, malformed_params)",
            ("cause",),
            registry=r,
        )
        self.pd_prefill_cancelled = Counter(
            "kvrouter_pd_prefill_cancelled_total",
            "prefill legs cancelled because the client went away",
            registry=r,
        )
        self.pool_workers = Gauge(
            "kvrouter_pool_workers",
            "workers able to take requests, by prefill/decode role (prefill, decode, both)",
            ("role",),
            registry=r,
        )
        self.edge_refused = Counter(
            "kvrouter_edge_refused_total",
            "requests or connections refused at the edge, by reason (header_timeout, "
            "rate_limited, overloaded, queue_full)",
            ("reason",),
            registry=r,
        )
        self.tokenization_inexact = Counter(
            "kvrouter_tokenization_inexact_total",
            "requests the router cannot tokenize exactly (routed on the text before the part "
            "it cannot render, or on load), by endpoint and reason",
            ("endpoint", "reason"),
            registry=r,
        )
        self.tokenization_checked = Counter(
            "kvrouter_tokenization_checked_total",
            "responses whose reported prompt token count was compared with the router's",
            ("model",),
            registry=r,
        )
        self.tokenization_mismatch = Counter(
            "kvrouter_tokenization_mismatch_total",
            "responses whose worker-reported prompt token count differs from the router's "
            "(a wrong tokenizer or chat template here), by model",
            ("model",),
            registry=r,
        )
        self.prediction_error = Histogram(
            "kvrouter_prediction_error_tokens",
            "per response whose engine reports usage.prompt_tokens_details.cached_tokens: "
            "those cached tokens minus the tokens the router matched on that worker "
            "(< 0: over-predicted), by model; P/D decode legs are left out",
            ("model",),
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        # A histogram with negative buckets has no _sum (the OpenMetrics rule prometheus_client
        # follows), so the error's totals are counted here, split by sign: over / prompt
        # tokens is the bench's "over-predicted" share.
        self.mispredicted_tokens = Counter(
            "kvrouter_mispredicted_tokens",
            "tokens the router over-predicted (matched, but the engine had not cached) or "
            "under-predicted (cached, but not matched), by model and direction",
            ("model", "direction"),
            registry=r,
        )
        self.index_corrections = Counter(
            "kvrouter_index_corrections_total",
            "feedback corrections: a worker reported fewer cached blocks than the router "
            "matched, so its records of the chain past the engine's depth were dropped, by model",
            ("model",),
            registry=r,
        )
        self.index_corrected_blocks = Counter(
            "kvrouter_index_corrected_blocks_total",
            "records those corrections removed (0 when another replica got there first)",
            ("model",),
            registry=r,
        )
        self.index_abort_clears = Counter(
            "kvrouter_index_abort_clears_total",
            "engine restarts seen as aborted streams (KVR_FEEDBACK_ABORT_CLEAR): the worker's "
            "records last used before the abort were dropped, by model and worker",
            ("model", "worker"),
            registry=r,
        )
        self.index_reset_clears = Counter(
            "kvrouter_index_reset_clears_total",
            "lost blocks taken for an emptied engine cache (KVR_FEEDBACK_RESET_FILL): the "
            "worker's records used since the block was last seen held fill too little of its "
            "capacity for an eviction, so its records last used before the request that showed "
            "the loss were dropped, by model and worker",
            ("model", "worker"),
            registry=r,
        )
        self.index_refused_clears = Counter(
            "kvrouter_index_refused_clears_total",
            "engine outages seen as refused connections, on a request or a health check "
            "(KVR_FEEDBACK_REFUSED_CLEAR): the worker's records last used before the refusal "
            "were dropped, by model and worker",
            ("model", "worker"),
            registry=r,
        )
        self.index_lru_cut_blocks = Counter(
            "kvrouter_index_lru_cut_blocks_total",
            "of those, records dropped because they were last used before a block the engine "
            "had since evicted (KVR_FEEDBACK_LRU_CUT)",
            ("model",),
            registry=r,
        )
        self.tokenizer_cache = CallbackGauge(
            "kvrouter_tokenizer_cache",
            "segment cache counters (hits, misses, entries, tokens)",
            "stat",
            r,
        )

        self.loop_lag = Histogram(
            "kvrouter_event_loop_lag_seconds",
            "how late the event loop woke a periodic probe (a busy loop delays every request)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "kvrouter_event_loop_lag_max_seconds", "largest event-loop lag since start", registry=r
        )

    def render(self) -> str:
        """The registry in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry).decode()
