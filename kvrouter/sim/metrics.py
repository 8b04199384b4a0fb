"""vLLM's Prometheus metrics for one simulated worker, through prometheus_client.

Names and meanings follow vLLM v1: gauges for running/waiting requests and KV-cache usage
(a 0..1 fraction despite the `_perc` name), prefix-cache queries and hits counted in tokens,
and `vllm:cache_config_info` whose labels carry the capacity a router reads. Histograms are
in simulated seconds. vLLM exports through prometheus_client too, so the text a router
scrapes here has the real server's shape. The engine keeps its own counters; a custom
collector reads them at scrape time into a registry that belongs to one worker.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvrouter.sim.engine import Engine, Histogram

_BASE = ("engine", "model_name")


class VllmCollector(Collector):
    """One simulated engine's state, as vLLM names it."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine = engine
        self.model = model

    def _family(
        self, cls: type[GaugeMetricFamily | CounterMetricFamily], name: str, doc: str, v: float
    ) -> Metric:
        fam = cls(name, doc, labels=_BASE)
        fam.add_metric(("0", self.model), v)
        return fam

    def _histogram(self, name: str, doc: str, hist: Histogram) -> Metric:
        fam = HistogramMetricFamily(name, doc, labels=_BASE)
        buckets = [(repr(float(bound)), float(n)) for bound, n in hist.cumulative()]
        buckets.append(("+Inf", float(hist.count)))
        fam.add_metric(("0", self.model), buckets, hist.total)
        return fam

    def collect(self) -> Iterator[Metric]:
        sched = self.engine.scheduler
        cache = sched.cache
        stats = sched.stats
        cfg = sched.cfg
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield self._family(
            g,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            len(sched.running),
        )
        yield self._family(
            g,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            len(sched.waiting),
        )
        yield self._family(
            g, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", cache.usage
        )
        yield self._family(
            g,
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage (older name).",
            cache.usage,
        )
        yield self._family(
            c,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_queries_tokens,
        )
        yield self._family(
            c,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_hits_tokens,
        )
        yield self._family(
            c, "vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens
        )
        yield self._family(
            c,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            stats.generation_tokens,
        )
        yield self._family(
            c,
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            stats.preemptions,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=(*_BASE, "finished_reason"),
        )
        success.add_metric(("0", self.model, "length"), stats.finished)
        yield success
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=(
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "engine",
                "kv_cache_size_tokens",
                "num_gpu_blocks",
            ),
        )
        info.add_metric(
            (
                str(cfg.block_size),
                "auto",
                "True",
                "0",
                str(cfg.num_blocks * cfg.block_size),
                str(cfg.num_blocks),
            ),
            1.0,
        )
        yield info
        yield self._histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds (simulated).",
            self.engine.ttft,
        )
        yield self._histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds (simulated).",
            self.engine.e2e,
        )


def registry(engine: Engine, *, model: str) -> CollectorRegistry:
    """A registry of its own for one simulated worker."""
    reg = CollectorRegistry()
    reg.register(VllmCollector(engine, model))
    return reg


def render_metrics(reg: CollectorRegistry) -> str:
    """The `/metrics` body for one worker (Prometheus text format 0.0.4)."""
    return generate_latest(reg).decode()
