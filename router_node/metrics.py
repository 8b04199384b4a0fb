"""Prometheus metrics, written in the text exposition format by hand.

The router needs a dozen counters, gauges and histograms with a label or two; a ~100-line
registry does that with no dependency and no global state (each app has its own `Metrics`,
so tests and embedded routers never collide in a process-wide registry).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


@dataclass
class _Metric:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    kind: str = "counter"

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


@dataclass
class Counter(_Metric):
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        out = self.header()
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labels, key)} {_num(v)}")
        return out


@dataclass
class Gauge(Counter):
    kind: str = "gauge"
    collect: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def render(self) -> list[str]:
        if self.collect is not None:
            self.values = dict(self.collect())
        return super().render()


@dataclass
class Histogram(_Metric):
    kind: str = "histogram"
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    series: dict[tuple[str, ...], list[float]] = field(default_factory=dict)

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.get(labels)
        if s is None:
            # per-bucket counts, then +Inf count, then sum
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-1] += value

    def count(self, *labels: str) -> int:
        s = self.series.get(labels)
        return int(sum(s[:-1])) if s else 0

    def render(self) -> list[str]:
        out = self.header()
        for key, s in sorted(self.series.items()):
            cum = 0.0
            for b, n in zip((*self.buckets, float("inf")), s[:-1], strict=True):
                cum += n
                le = "+Inf" if b == float("inf") else _num(b)
                labels = _labels(self.labels, key, 'le="' + le + '"')
                out.append(f"{self.name}_bucket{labels} {_num(cum)}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(s[-1])}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {_num(cum)}")
        return out


class Metrics:
    """Every metric the router exports. One instance per app."""

    def __init__(self) -> None:
        self.requests = Counter(
            "kvrouter_requests_total",
            "HTTP requests by endpoint and status",
            ("endpoint", "status"),
        )
        self.decisions = Counter(
            "kvrouter_routing_decisions_total",
            "routing decisions by policy and reason",
            ("policy", "reason"),
        )
        self.matched_tokens = Histogram(
            "kvrouter_matched_tokens",
            "prompt tokens the chosen worker already held, per request",
            buckets=TOKEN_BUCKETS,
        )
        self.matched_tokens_total = Counter(
            "kvrouter_matched_tokens_total", "prompt tokens the chosen worker already held"
        )
        self.prompt_tokens_total = Counter(
            "kvrouter_prompt_tokens_total", "prompt tokens of routed requests"
        )
        self.lookup_seconds = Histogram(
            "kvrouter_lookup_seconds", "Redis lookup round trip (residency and load)"
        )
        self.tokenize_seconds = Histogram(
            "kvrouter_tokenize_seconds", "time to tokenize a request's prompt"
        )
        self.upstream_errors = Counter(
            "kvrouter_upstream_errors_total",
            "worker failures by worker and kind (connect, status, timeout, stream)",
            ("worker", "kind"),
        )
        self.worker_requests = Counter(
            "kvrouter_worker_requests_total",
            "requests a worker answered (any status), by worker",
            ("worker",),
        )
        self.retries = Counter(
            "kvrouter_retries_total", "requests moved to the next-best worker before a byte"
        )
        self.redis_errors = Counter(
            "kvrouter_redis_errors_total", "failed Redis calls by operation", ("op",)
        )
        self.redis_up = Gauge("kvrouter_redis_up", "1 when the shared index is reachable")
        self.worker_up = Gauge(
            "kvrouter_worker_up", "1 when a worker can take requests", ("worker",)
        )
        self.inflight = Gauge(
            "kvrouter_inflight_requests", "requests this replica has in flight", ("worker",)
        )
        self.ejections = Counter(
            "kvrouter_worker_ejections_total", "circuit breaker trips by worker", ("worker",)
        )
        self.cleared = Counter(
            "kvrouter_worker_residency_cleared_total",
            "residency cleared for workers out longer than the grace period",
            ("worker",),
        )
        self.tokenization_inexact = Counter(
            "kvrouter_tokenization_inexact_total",
            "requests the router cannot tokenize exactly (routed on the text before the part "
            "it cannot render, or on load), by endpoint and reason",
            ("endpoint", "reason"),
        )
        self.tokenization_checked = Counter(
            "kvrouter_tokenization_checked_total",
            "responses whose reported prompt token count was compared with the router's",
            ("model",),
        )
        self.tokenization_mismatch = Counter(
            "kvrouter_tokenization_mismatch_total",
            "responses whose worker-reported prompt token count differs from the router's "
            "(a wrong tokenizer or chat template here), by model",
            ("model",),
        )
        self.tokenizer_cache = Gauge(
            "kvrouter_tokenizer_cache",
            "segment cache counters (hits, misses, entries, tokens)",
            ("stat",),
        )

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for m in self.all():
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
