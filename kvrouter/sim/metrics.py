"""vLLM's Prometheus metrics for one simulated worker, in the text exposition format.

Names and meanings follow vLLM v1: gauges for running/waiting requests and KV-cache usage
(a 0..1 fraction despite the `_perc` name), prefix-cache queries and hits counted in tokens,
and `vllm:cache_config_info` whose labels carry the capacity a router reads. Histograms are
in simulated seconds. Counter families are written with their `_total` sample names in
HELP/TYPE, as prometheus_client does.
"""

from __future__ import annotations

from kvrouter.sim.engine import Engine, Histogram


def _labels(pairs: dict[str, str]) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs.items()
    )
    return "{" + inner + "}"


def _fmt(value: float) -> str:
    return repr(float(value))


def render_metrics(
    engine: Engine, *, model: str, extra_gauges: dict[str, float] | None = None
) -> str:
    """The `/metrics` body for one worker."""
    sched = engine.scheduler
    cache = sched.cache
    stats = sched.stats
    cfg = sched.cfg
    base = {"engine": "0", "model_name": model}
    lb = _labels(base)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, value: float) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{lb} {_fmt(value)}")

    def histogram(name: str, help_text: str, hist: Histogram) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} histogram")
        for bound, count in hist.cumulative():
            lines.append(f"{name}_bucket{_labels({**base, 'le': repr(bound)})} {_fmt(count)}")
        lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {_fmt(hist.count)}")
        lines.append(f"{name}_count{lb} {_fmt(hist.count)}")
        lines.append(f"{name}_sum{lb} {_fmt(hist.total)}")

    family(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        len(sched.running),
    )
    family(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        len(sched.waiting),
    )
    family(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        cache.usage,
    )
    family(
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage (older name).",
        cache.usage,
    )
    family(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        stats.prefix_queries_tokens,
    )
    family(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        stats.prefix_hits_tokens,
    )
    family(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        stats.prompt_tokens,
    )
    family(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        stats.generation_tokens,
    )
    family(
        "vllm:num_preemptions_total",
        "counter",
        "Cumulative number of preemptions from the engine.",
        stats.preemptions,
    )
    lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    lines.append("# TYPE vllm:request_success_total counter")
    lines.append(
        f"vllm:request_success_total{_labels({**base, 'finished_reason': 'length'})} "
        f"{_fmt(stats.finished)}"
    )
    lines.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    lines.append("# TYPE vllm:cache_config_info gauge")
    info = {
        "block_size": str(cfg.block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": "True",
        "engine": "0",
        "kv_cache_size_tokens": str(cfg.num_blocks * cfg.block_size),
        "num_gpu_blocks": str(cfg.num_blocks),
    }
    lines.append(f"vllm:cache_config_info{_labels(info)} 1.0")
    histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds (simulated).",
        engine.ttft,
    )
    histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds (simulated).",
        engine.e2e,
    )
    for name, value in (extra_gauges or {}).items():
        family(name, "gauge", "Simulator state.", value)
    return "\n".join(lines) + "\n"
