"""`kvrouter bench routing`: does cache-aware routing raise the hit ratio and cut TTFT on real
traffic, against every simpler policy, in the same run?

For each policy, a fresh stack (Redis, a simulated fleet with realistic KV capacity, the
listener when the policy uses engine events, the router) replays the same slice of a Mooncake
trace; then a report compares them:

  kv          cost-model routing, residency confirmed by the engines' KV events
  kv_approx   the same without events: the router's own speculative records only
  round_robin, random, least_load, prefix_only, session   the baselines
  kv_4x       `kv` with 4 router replicas behind a round-robin front (the replay client
              alternates between them request by request): shared state must route as well
  kv_pd       prefill/decode disaggregation at the same GPU count: a quarter of the workers
              prefill (2 of 8), the rest decode, kv policy, events on; the decode workers
              pull the KV over a simulated link; a request runs whole on a decode worker when
              its uncached suffix is short or the prefill pool is saturated
  kv_pd_always  `kv_pd` without the saturation guard: every long uncached prompt takes the
              prefill hop, however long the prefill queue
  kv_pd_half  `kv_pd` with half the workers prefilling (4 of 8): the Mooncake trace is
              prefill-heavy (long prompts, short answers)
  kv_pd_4x    `kv_pd` with 4 router replicas
  kv_pd_3p    3 prefill + 5 decode, no guard: a prefill pool sized for the trace's offered
              prefill (about 36k prompt tokens/s against 3 x 16k)
  kv_pd_3p_guard  `kv_pd_3p` with a queue bound of about three seconds of prefill per worker
  kv_pd_local `kv_pd` whose saturation fallback runs only suffixes up to 2,048 tokens on the
              decode workers (KVR_PD_LOCAL_MAX_TOKENS): longer ones still queue for prefill
  kv_pd_3p_local  `kv_pd_local` on 3 prefill + 5 decode
  kv_pd_half_local  `kv_pd_local` on 4 prefill + 4 decode

Time per output token (TPOT) is where the split pays: in aggregated serving a prefill chunk
batched with decodes stretches that step for every decode in it (the simulator's step time
grows with the step's prefill tokens); decode workers of a split fleet prefill only a prompt's
last block. `compute_hit_ratio` is 1 - prompt tokens the engines computed / prompt tokens sent,
from the workers' own counters: comparable across split and aggregated fleets (a decode
worker's `cached_tokens` does not count pulled blocks, as in vLLM). `transfer_gb` is the KV
the decode workers pulled.

Hit ratio is cached over prompt tokens, as the workers report it in `usage`. It is shown next
to two ideals over the same requests: one infinite cache (`ideal_hit_ratio`) and one LRU cache
holding the whole fleet's capacity (`pooled_hit_ratio`), which no router of separate caches
can beat by much. Latencies are in simulated seconds (wall seconds x time scale): the fleet's
timing model runs `time_scale` times faster than real time, so the router's and client's own
real overheads count `time_scale` times over: a conservative view of the router.

With ``--models N`` (N >= 2) the same fleet serves N models: the base model and N - 1 LoRA
adapters of it, which every simulated worker serves from one shared KV cache (as vLLM serves a
base model and its adapters; each adapter's blocks are its own, and its KV events carry its
name). The trace slice is split into N disjoint traces by conversation (`session_id`), each
replayed as one model, all at once; the report gives each model's hit ratio and its own ideal.

Writes report.md, results.json and PNG plots to --out; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvrouter.bench.common import emit_json
from kvrouter.bench.stack import LocalStack, StackConfig
from kvrouter.sim.replay import RequestRecord, replay_trace, session_id, summarize
from kvrouter.sim.settings import DEFAULT_CAPACITY_TOKENS
from kvrouter.sim.trace import (
    TraceRequest,
    bundled_trace,
    infinite_cache_hit_ratio,
    load_trace,
    lru_cache_hit_ratio,
)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    policy: str
    kv_events: bool
    replicas: int = 1
    prefill_share: float = 0.0
    """Prefill/decode split: this share of the workers (at least one) prefill; 0 = none."""
    router_env: tuple[tuple[str, str], ...] = ()
    cpu_tier: int = 0
    """Each worker gets a CPU offload tier of this many times its GPU capacity (0: none)."""

    def prefill_workers(self, workers: int) -> int:
        if not self.prefill_share:
            return 0
        return min(workers - 1, max(1, round(workers * self.prefill_share)))


# The conditional split's saturation guard: once every prefill worker has about a second of
# prefill queued (16k tokens/s simulated), requests run whole on the decode workers.
PD_SATURATION = (("KVR_PD_SATURATION_TOKENS", "16384"),)
# A queue bound rather than a saturation fallback: a request runs whole on a decode worker
# only once every prefill worker has about three seconds queued, so the guard catches bursts
# without turning every busy moment into decode stalls.
PD_QUEUE_BOUND = (("KVR_PD_SATURATION_TOKENS", "49152"),)
# The saturation guard weighing the decode worker's stall: with the prefill pool saturated,
# only suffixes up to 2,048 tokens (an eighth of a second of prefill batched with the decode
# worker's decodes) run locally; longer ones still queue for the prefill pool.
PD_LOCAL_BOUND = (*PD_SATURATION, ("KVR_PD_LOCAL_MAX_TOKENS", "2048"))
VARIANTS = (
    Variant("kv", "kv", True),
    Variant("kv_approx", "kv", False),
    Variant("round_robin", "round_robin", False),
    Variant("random", "random", False),
    Variant("least_load", "least_load", False),
    Variant("prefix_only", "prefix_only", False),
    Variant("session", "session", False),
    Variant("kv_4x", "kv", True, replicas=4),
    Variant("kv_pd", "kv", True, prefill_share=0.25, router_env=PD_SATURATION),
    Variant("kv_pd_always", "kv", True, prefill_share=0.25),
    Variant("kv_pd_half", "kv", True, prefill_share=0.5, router_env=PD_SATURATION),
    Variant("kv_pd_4x", "kv", True, replicas=4, prefill_share=0.25, router_env=PD_SATURATION),
    Variant("kv_pd_3p", "kv", True, prefill_share=0.375),
    Variant("kv_pd_3p_guard", "kv", True, prefill_share=0.375, router_env=PD_QUEUE_BOUND),
    Variant("kv_pd_local", "kv", True, prefill_share=0.25, router_env=PD_LOCAL_BOUND),
    Variant("kv_pd_3p_local", "kv", True, prefill_share=0.375, router_env=PD_LOCAL_BOUND),
    Variant("kv_pd_half_local", "kv", True, prefill_share=0.5, router_env=PD_LOCAL_BOUND),
    # A fleet whose workers offload evicted blocks to a CPU tier of 4x their GPU capacity
    # (host memory is several times HBM): the router credits tier hits (kv_cpu, default
    # KVR_TIER_CREDITS) or ignores them (kv_cpu_gpu_only), on the same fleet.
    Variant("kv_cpu", "kv", True, cpu_tier=4),
    Variant("kv_cpu_gpu_only", "kv", True, cpu_tier=4, router_env=(("KVR_TIER_CREDITS", "CPU=0"),)),
)
TIER_VARIANTS = ("kv_cpu", "kv_cpu_gpu_only")
# Pool splits explored for the P/D comparison (docs/benchmarks.md): run by name, not by
# default, so the default run stays the policies plus one P/D variant per guard.
PD_SPLIT_VARIANTS = ("kv_pd_3p", "kv_pd_3p_guard", "kv_pd_local", "kv_pd_3p_local",
                     "kv_pd_half_local")  # fmt: skip
OPT_IN_VARIANTS = (*TIER_VARIANTS, *PD_SPLIT_VARIANTS)
# --quick: the first 900 requests (about 5 minutes of the trace), 4 times faster. At 6x the
# listener, simulator, router, client and Redis saturated two cores and the run measured the
# machine more than the router (docs/benchmarks.md).
QUICK_LIMIT = 900
QUICK_TIME_SCALE = 4.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"first {QUICK_LIMIT} requests at time scale {QUICK_TIME_SCALE:g}",
    )
    parser.add_argument("--trace", default="bundled", help="Mooncake JSONL (default: bundled)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--capacity-tokens",
        type=int,
        default=DEFAULT_CAPACITY_TOKENS,
        help="KV capacity per worker in tokens (default: Llama-3-8B on one 80 GB GPU)",
    )
    parser.add_argument("--start", type=int, default=0, help="skip this many trace requests")
    parser.add_argument("--limit", type=int, help="replay at most this many requests")
    parser.add_argument("--time-scale", type=float, help="trace seconds per real second")
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS if v.name not in OPT_IN_VARIANTS),
        help="comma-separated subset of: "
        + ", ".join(v.name for v in VARIANTS)
        + " (default: all but the CPU-tier fleet's and the P/D pool splits: "
        + ", ".join(OPT_IN_VARIANTS)
        + ")",
    )
    parser.add_argument(
        "--models",
        type=int,
        default=1,
        help="serve N models on the one fleet (the base model and N - 1 LoRA adapters), each "
        "replaying its own share of the trace's conversations; per-model hit ratios",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every variant N times, interleaved (each round runs every variant once, so "
        "a change in the machine's load hits all alike); hit ratios are then over all runs' "
        "requests (the mean of the runs) with their spread, latencies pooled",
    )
    parser.add_argument(
        "--max-lag-s",
        type=float,
        default=DEFAULT_MAX_LAG_S,
        help="a run is invalid when the client's send lateness or a router's event-loop lag "
        f"(p99, simulated seconds) exceeds this (default {DEFAULT_MAX_LAG_S:g})",
    )
    parser.add_argument("--out", default="out/bench-routing", help="report directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    by_name = {v.name: v for v in VARIANTS}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}")
    if args.models < 1:
        raise SystemExit("--models: must be >= 1")
    if args.repeat < 1:
        raise SystemExit("--repeat: must be >= 1")
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)
    scale = args.time_scale or (QUICK_TIME_SCALE if args.quick else 4.0)
    source = bundled_trace() if args.trace == "bundled" else Path(args.trace)
    requests = load_trace(source, start=args.start, limit=limit)
    result = asyncio.run(_bench(args, [by_name[w] for w in wanted], requests, scale))
    emit_json(result)
    return 0


async def run_variant(
    v: Variant,
    args: argparse.Namespace,
    requests: list[TraceRequest],
    scale: float,
    *,
    redis_url: str | None = None,
) -> tuple[dict[str, Any], list[RequestRecord]]:
    """One policy on a fresh stack (a fresh Redis unless `redis_url`, which is flushed).

    With ``args.models > 1`` the summary has ``per_model``: each model's own summary."""
    n_models = getattr(args, "models", 1)
    base = StackConfig().model
    names = model_names(base, n_models)
    cfg = StackConfig(
        workers=args.workers, policy=v.policy, kv_events=v.kv_events, replicas=v.replicas,
        capacity_tokens=args.capacity_tokens, time_scale=scale, redis_url=redis_url,
        model=base, adapters=names[1:], prefill_workers=v.prefill_workers(args.workers),
        extra_router_env=v.router_env,
        prefill_tokens_per_s=getattr(args, "prefill_tokens_per_s", None),
        speed_mix=getattr(args, "speed_mix", "") or "",
        sim_args=(("--cpu-capacity-tokens", str(v.cpu_tier * args.capacity_tokens))
                  if v.cpu_tier else ()),
    )  # fmt: skip
    per_model: dict[str, list[RequestRecord]] = {}
    async with LocalStack(cfg) as stack:
        t0 = time.monotonic()
        if n_models == 1:
            records = await replay_trace(
                requests, stack.router_urls, time_scale=scale, concurrency=args.concurrency,
                model=cfg.model, progress=sys.stderr.isatty(),
            )  # fmt: skip
        else:
            shares = split_by_conversation(requests, names)
            # One clock for every model: each share keeps its arrival times relative to the
            # slice's first request, so the models' traffic interleaves as in the trace.
            t_first = requests[0].timestamp_ms if requests else 0
            results = await asyncio.gather(
                *(
                    replay_trace(
                        share,
                        stack.router_urls,
                        time_scale=scale,
                        start_ms=t_first,
                        concurrency=max(1, args.concurrency // n_models),
                        model=name,
                    )
                    for name, share in shares.items()
                )
            )
            per_model = dict(zip(shares, results, strict=True))
            records = [r for rs in results for r in rs]
        duration = time.monotonic() - t0
        reasons: Counter[str] = Counter()
        pd_reasons: Counter[str] = Counter()
        lags: list[tuple[float | None, float | None]] = []
        work: dict[str, float] = {}
        for url in stack.router_urls:
            text = await stack.metrics(url)
            reasons.update(decision_reasons(text))
            add_work(work, router_work(text))
            pd_reasons.update(pd_decision_reasons(text))
            lags.append(loop_lag(text))
        fleet = await fleet_counters(stack)
    summary = finish_summary(records, duration, reasons, args.workers, scale)
    summary.update(fleet)
    summary["router_work"] = dict(work)
    summary.update(work_summary(work))
    sent = summary["prompt_tokens"]
    summary["compute_hit_ratio"] = 1 - fleet["computed_prompt_tokens"] / sent if sent else 0.0
    if pd_reasons:
        summary["pd_decisions"] = dict(sorted(pd_reasons.items()))
    # The worst replica's lag counts: requests through it waited for its loop.
    p99s = [p for p, _ in lags if p is not None]
    peaks = [m for _, m in lags if m is not None]
    summary["loop_lag_p99_s"] = max(p99s) * scale if p99s else None
    summary["loop_lag_max_s"] = max(peaks) * scale if peaks else None
    if per_model:
        summary["per_model"] = {
            name: {
                "requests": len(rs),
                **{
                    k: v
                    for k, v in summarize(rs).items()
                    if k in ("hit_ratio", "failed", "prompt_tokens", "cached_tokens")
                },
            }
            for name, rs in per_model.items()
        }
    return summary, records


async def fleet_counters(stack: LocalStack) -> dict[str, Any]:
    """The simulated workers' own counters, summed: prompt tokens computed and KV pulled."""
    import aiohttp

    assert stack.fleet is not None
    computed = pulled = loaded = 0
    async with aiohttp.ClientSession() as s:
        for w in stack.fleet.workers:
            async with s.get(f"{w.url}/admin/state") as r:
                st = await r.json()
            computed += int(st["stats"]["prompt_tokens"])
            loaded += int(st["stats"].get("cpu_loaded_tokens", 0))
            pulled += int(st.get("pd", {}).get("pulled_bytes", 0))
    return {
        "computed_prompt_tokens": computed,
        "cpu_loaded_tokens": loaded,
        "transfer_gb": pulled / 1e9,
    }


def pd_decision_reasons(metrics_text: str) -> Counter[str]:
    """A router's prefill/decode decisions by reason (split, short_suffix, ...)."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "kvrouter_pd_decisions_total":
                out[s.labels["reason"]] += int(s.value)
    return out


def finish_summary(
    records: list[RequestRecord],
    duration_s: float,
    reasons: Counter[str],
    workers: int,
    scale: float,
) -> dict[str, Any]:
    """A variant's summary of `records` (one run's, or several runs' together): latencies in
    simulated seconds, rejections, load spread over the workers, routing decisions."""
    summary = summarize(records, duration_s)
    for k in SIMULATED_SECONDS:
        if summary[k] is not None:
            summary[k] *= scale
    summary["throughput_rps"] /= scale
    summary["rejected"] = sum(1 for r in records if r.status in (429, 503))
    counts = [summary["per_worker"].get(w, 0) for w in (f"sim-{i}" for i in range(workers))]
    mean = statistics.mean(counts) if counts else 0.0
    summary["load_cv"] = statistics.pstdev(counts) / mean if mean else 0.0
    summary["load_max_over_mean"] = max(counts) / mean if mean else 0.0
    summary["decisions"] = dict(sorted(reasons.items()))
    return summary


def combine_runs(
    runs: list[tuple[dict[str, Any], list[RequestRecord]]], workers: int, scale: float
) -> dict[str, Any]:
    """One variant's runs as one summary: every run replays the same requests, so the hit
    ratio over all their requests is the mean of the runs' (weighted by prompt tokens, which
    are the same unless requests failed); `hit_ratio_runs` keeps each run's and
    `hit_ratio_sd` their spread. Latency percentiles are over all runs' requests."""
    if len(runs) == 1:
        return runs[0][0]
    records = [r for _, rs in runs for r in rs]
    reasons: Counter[str] = Counter()
    for s, _ in runs:
        reasons.update(s.get("decisions", {}))
    duration = sum(s["duration_s"] for s, _ in runs)
    summary = finish_summary(records, duration, reasons, workers, scale)
    for key in ("loop_lag_p99_s", "loop_lag_max_s"):
        lags = [s[key] for s, _ in runs if s.get(key) is not None]
        summary[key] = max(lags) if lags else None
    for key in ("computed_prompt_tokens", "cpu_loaded_tokens", "transfer_gb"):
        summary[key] = sum(s.get(key, 0) for s, _ in runs)
    work: dict[str, float] = {}
    for s, _ in runs:
        add_work(work, s.get("router_work", {}))
    summary["router_work"] = dict(work)
    summary.update(work_summary(work))
    sent = summary["prompt_tokens"]
    summary["compute_hit_ratio"] = 1 - summary["computed_prompt_tokens"] / sent if sent else 0.0
    ratios = [s["hit_ratio"] for s, _ in runs]
    summary["hit_ratio_runs"] = ratios
    summary["hit_ratio_sd"] = statistics.stdev(ratios)
    if "per_model" in runs[0][0]:
        summary["per_model"] = {
            m: {
                "requests": sum(s["per_model"][m]["requests"] for s, _ in runs),
                "failed": sum(s["per_model"][m]["failed"] for s, _ in runs),
                "hit_ratio": statistics.mean(s["per_model"][m]["hit_ratio"] for s, _ in runs),
            }
            for m in runs[0][0]["per_model"]
        }
    return summary


# Summary fields in seconds that finish_summary turns from real into simulated seconds.
SIMULATED_SECONDS = (
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "tpot_p50_s",
    "tpot_p99_s", "late_p99_s", "late_max_s",
)  # fmt: skip
# A run whose client sent requests late, or whose router's loop lagged, by more than this
# (simulated seconds, p99) measured the machine: 5% of the default 2 s TTFT objective.
DEFAULT_MAX_LAG_S = 0.1


def loop_lag(metrics_text: str) -> tuple[float | None, float | None]:
    """(p99, max) of a router's event-loop lag in real seconds from its /metrics text; the
    p99 is the upper bound of the histogram bucket it falls in (None without samples)."""
    buckets: list[tuple[float, float]] = []
    peak: float | None = None
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "kvrouter_event_loop_lag_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == "kvrouter_event_loop_lag_max_seconds":
                peak = s.value
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None, peak
    total = buckets[-1][1]
    p99 = next(le for le, n in buckets if n >= 0.99 * total)
    if p99 == float("inf"):
        p99 = peak if peak is not None else p99
    return p99, peak


def validity(summary: dict[str, Any], max_lag_s: float) -> list[str]:
    """Why a run measured the machine rather than the router: the client's send lateness
    or a router's event-loop lag (p99, simulated seconds) over `max_lag_s`. Empty: valid."""
    why = []
    late = summary.get("late_p99_s")
    if late is not None and late > max_lag_s:
        why.append(f"client sent late: p99 {late:.3f} s > {max_lag_s:g} s")
    lag = summary.get("loop_lag_p99_s")
    if lag is not None and lag > max_lag_s:
        why.append(f"router event loop lagged: p99 {lag:.3f} s > {max_lag_s:g} s")
    return why


def decision_reasons(metrics_text: str) -> Counter[str]:
    """A router's routing decisions by reason (``kvrouter_routing_decisions_total``): for
    ``kv``, how often the best-matched worker won (prefix), lost to its load (load), was held
    back by the hot-spot guard (guard), or nobody matched (no_match)."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "kvrouter_routing_decisions_total":
                out[s.labels["reason"]] += int(s.value)
    return out


def router_work(metrics_text: str) -> dict[str, float]:
    """What a router spent per request, from its /metrics text: tokenizing
    (``tokenize_s``, ``tokenized``: the histogram's sum and count, real seconds) and the
    re-checks of its decisions against other replicas' leases (``recheck_kept``,
    ``recheck_moved``)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            key = None
            if s.name == "kvrouter_tokenize_seconds_sum":
                key = "tokenize_s"
            elif s.name == "kvrouter_tokenize_seconds_count":
                key = "tokenized"
            elif s.name == "kvrouter_lease_rechecks_total":
                key = f"recheck_{s.labels['outcome']}"
            if key is not None:
                out[key] = out.get(key, 0.0) + s.value
    return out


def add_work(total: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v


def work_summary(work: dict[str, float]) -> dict[str, float]:
    """`router_work` summed over replicas (and runs) as summary fields: mean tokenize time
    per request (real ms) and the re-checks kept and moved."""
    n = work.get("tokenized", 0)
    return {
        "tokenize_ms_mean": 1000 * work.get("tokenize_s", 0) / n if n else 0.0,
        "recheck_kept": int(work.get("recheck_kept", 0)),
        "recheck_moved": int(work.get("recheck_moved", 0)),
    }


def model_names(base: str, n: int) -> tuple[str, ...]:
    """The base model, then ``n - 1`` adapters of it."""
    return (base, *(f"{base}-lora-{i}" for i in range(1, n)))


def split_by_conversation(
    requests: list[TraceRequest], names: tuple[str, ...]
) -> dict[str, list[TraceRequest]]:
    """Disjoint shares of `requests`, one per model: a conversation (`session_id`) stays in
    one share, so each model's trace keeps its multi-turn reuse; the shared system prompt is
    in every share (each model caches its own copy)."""
    shares: dict[str, list[TraceRequest]] = {n: [] for n in names}
    for r in requests:
        key = session_id(r)
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
        shares[names[digest % len(names)]].append(r)
    return shares


async def _bench(
    args: argparse.Namespace, variants: list[Variant], requests: list[TraceRequest], scale: float
) -> dict[str, Any]:
    bs = 16
    ideal = infinite_cache_hit_ratio(requests, block_size=bs).ratio
    pooled = lru_cache_hit_ratio(
        requests, args.workers * args.capacity_tokens // bs, block_size=bs
    ).ratio
    print(
        f"kvrouter bench routing: {len(requests)} requests, {args.workers} workers x "
        f"{args.capacity_tokens:,} tokens, time scale {scale:g}; "
        f"ideal {ideal:.3f}, pooled {pooled:.3f}",
        file=sys.stderr,
    )
    n_models = getattr(args, "models", 1)
    ideal_per_model: dict[str, float] = {}
    if n_models > 1:
        shares = split_by_conversation(requests, model_names(StackConfig().model, n_models))
        ideal_per_model = {
            name: infinite_cache_hit_ratio(share, block_size=bs).ratio
            for name, share in shares.items()
        }
        print(
            f"  {n_models} models: "
            + ", ".join(
                f"{n} ({len(shares[n])} requests, ideal {ideal_per_model[n]:.3f})" for n in shares
            ),
            file=sys.stderr,
        )
    runs: dict[str, list[tuple[dict[str, Any], list[RequestRecord]]]] = {
        v.name: [] for v in variants
    }
    for round_ in range(1, args.repeat + 1):
        for v in variants:
            label = v.name + (f" (run {round_}/{args.repeat})" if args.repeat > 1 else "")
            print(f"  {label} ...", file=sys.stderr, flush=True)
            summary, records = await run_variant(v, args, requests, scale)
            runs[v.name].append((summary, records))
            print(
                f"  {label}: hit {summary['hit_ratio']:.3f}, "
                f"TTFT p50 {_fmt(summary['ttft_p50_s'])} s, tokenize "
                f"{summary['tokenize_ms_mean']:.2f} ms/request (real), re-checks kept "
                f"{summary['recheck_kept']} moved {summary['recheck_moved']}",
                file=sys.stderr,
            )
    results = {name: combine_runs(rs, args.workers, scale) for name, rs in runs.items()}
    max_lag = getattr(args, "max_lag_s", DEFAULT_MAX_LAG_S)
    for s in results.values():
        s["invalid"] = validity(s, max_lag)
    ttfts = {
        name: sorted(r.ttft_s * scale for _, rs in vr for r in rs if r.ok and r.ttft_s is not None)
        for name, vr in runs.items()
    }
    tpots = {
        name: sorted(r.tpot_s * scale for _, rs in vr for r in rs if r.ok and r.tpot_s is not None)
        for name, vr in runs.items()
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, after all the traffic
    table = results_table(results, ideal, pooled)
    if ideal_per_model:
        table += "\n\n" + per_model_table(results, ideal_per_model)
    decisions = decisions_table(results)
    if decisions:
        table += "\n\n" + decisions
    replicas = replica_comparison(results)
    if replicas:
        table += "\n\n" + replicas
    tiers = tier_table(results)
    if tiers:
        table += "\n\n" + tiers
    pd = pd_table(results)
    if pd:
        table += "\n\n" + pd
    table += "\n\n" + validity_lines(results)
    print(table)
    meta = {"requests": len(requests), "start": args.start, "workers": args.workers,
            "capacity_tokens": args.capacity_tokens, "time_scale": scale, "repeat": args.repeat,
            "ideal_hit_ratio": ideal, "pooled_hit_ratio": pooled}  # fmt: skip
    if ideal_per_model:
        meta["models"] = n_models
        meta["ideal_hit_ratio_per_model"] = ideal_per_model
    (out / "results.json").write_text(json.dumps({**meta, "variants": results}, indent=2))
    (out / "report.md").write_text(_markdown(table, meta, args))
    if not args.no_plots:
        plot_results(out, results, ttfts, ideal, pooled, tpots)
    final: dict[str, Any] = {"bench": "routing", "quick": bool(args.quick), **meta, "policies": {}}
    for name, s in results.items():
        final["policies"][name] = {
            "hit_ratio": round(s["hit_ratio"], 4),
            "ttft_p50_s": _r(s["ttft_p50_s"]),
            "ttft_p99_s": _r(s["ttft_p99_s"]),
            "tpot_p50_s": _r(s.get("tpot_p50_s")),
            "tpot_p99_s": _r(s.get("tpot_p99_s")),
            "compute_hit_ratio": _r(s.get("compute_hit_ratio")),
            "transfer_gb": _r(s.get("transfer_gb")),
            "cpu_loaded_tokens": s.get("cpu_loaded_tokens", 0),
            "failed": s["failed"],
            "exact_share": _r(s.get("exact_share")),
            "over_share": _r(s.get("over_share")),
            "under_share": _r(s.get("under_share")),
            "invalid": s["invalid"],
        }
        if "hit_ratio_runs" in s:
            final["policies"][name]["hit_ratio_runs"] = [round(x, 4) for x in s["hit_ratio_runs"]]
        if "per_model" in s:
            final["policies"][name]["per_model"] = {
                m: {"hit_ratio": round(pm["hit_ratio"], 4), "failed": pm["failed"]}
                for m, pm in s["per_model"].items()
            }
    gap = replica_gap(results)
    if gap is not None:
        final["kv_4x_vs_kv"] = round(gap, 4)
    return final


def validity_lines(results: dict[str, dict[str, Any]]) -> str:
    """One line per variant whose run measured the machine, or one saying all were valid."""
    bad = [f"- **{n} INVALID**: {'; '.join(s['invalid'])}" for n, s in results.items()
           if s.get("invalid")]  # fmt: skip
    if bad:
        return "Runs that measured the machine, not the router:\n" + "\n".join(bad)
    return "Every run valid: client send lateness and router event-loop lag within bounds."


def replica_gap(results: dict[str, dict[str, Any]]) -> float | None:
    """kv_4x's hit ratio relative to kv's (0.01 = 1% higher); None unless both ran."""
    if "kv" not in results or "kv_4x" not in results or not results["kv"]["hit_ratio"]:
        return None
    ratio: float = results["kv_4x"]["hit_ratio"] / results["kv"]["hit_ratio"]
    return ratio - 1


def replica_comparison(results: dict[str, dict[str, Any]]) -> str:
    """kv with 4 replicas against kv with one: the hit ratios (over every run) and how far
    apart, next to each one's run-to-run spread when there were several runs."""
    rel = replica_gap(results)
    if rel is None:
        return ""
    one, four = results["kv"], results["kv_4x"]
    line = (
        f"kv with 4 router replicas: hit ratio {four['hit_ratio']:.4f} against "
        f"{one['hit_ratio']:.4f} with one ({rel:+.1%})"
    )
    if "hit_ratio_runs" in one and "hit_ratio_runs" in four:
        runs = len(one["hit_ratio_runs"])
        line += (
            f", over {runs} runs each; run-to-run sd {one['hit_ratio_sd']:.4f} (1 replica), "
            f"{four['hit_ratio_sd']:.4f} (4); runs: "
            + " ".join(f"{x:.3f}" for x in one["hit_ratio_runs"])
            + " / "
            + " ".join(f"{x:.3f}" for x in four["hit_ratio_runs"])
        )
    return line


def per_model_table(results: dict[str, dict[str, Any]], ideal: dict[str, float]) -> str:
    """Hit ratio per policy and model, with each model's own ideal (one infinite cache)."""
    names = list(ideal)
    lines = [
        "| policy | " + " | ".join(f"{n} hit ratio" for n in names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for policy, s in results.items():
        pm = s.get("per_model", {})
        cells = [f"{pm[n]['hit_ratio']:.3f}" if n in pm else "-" for n in names]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines.append("| ideal (one infinite cache per model) | " + " | ".join(
        f"{ideal[n]:.3f}" for n in names) + " |")  # fmt: skip
    return "\n".join(lines)


def decisions_table(results: dict[str, dict[str, Any]]) -> str:
    """The kv variants' routing decisions by reason, as shares of their requests (all
    replicas summed): where a hit ratio was won or lost."""
    rows = {n: s["decisions"] for n, s in results.items() if s.get("decisions", {}).get("prefix")}
    if not rows:
        return ""
    reasons = ("prefix", "load", "guard", "no_match")
    lines = [
        "| policy | " + " | ".join(f"{r} decisions" for r in reasons) + " |",
        "|" + "---|" * (len(reasons) + 1),
    ]
    for name, d in rows.items():
        total = sum(d.values()) or 1
        lines.append(
            f"| {name} | " + " | ".join(f"{d.get(r, 0) / total:.1%}" for r in reasons) + " |"
        )
    return "\n".join(lines)


def tier_table(results: dict[str, dict[str, Any]]) -> str:
    """The CPU-tier variants side by side: what crediting tier hits buys on the same fleet
    (prompt tokens computed, loaded from the CPU tier, hit ratios, TTFT); "" without them."""
    rows = [(n, results[n]) for n in TIER_VARIANTS if n in results]
    if not rows:
        return ""
    lines = [
        "| fleet with a CPU tier | compute hit ratio | loaded from CPU | GPU+CPU hit ratio "
        "| TTFT p50 | p90 | p99 |",
        "|" + "---|" * 7,
    ]
    for name, s in rows:
        sent = s["prompt_tokens"] or 1
        lines.append(
            f"| {name} | {s.get('compute_hit_ratio', 0.0):.3f} "
            f"| {_pct(s.get('cpu_loaded_tokens', 0) / sent)} | {s['hit_ratio']:.3f} "
            f"| {_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p90_s'])} | {_fmt(s['ttft_p99_s'])} |"
        )
    return "\n".join(lines)


def pd_table(results: dict[str, dict[str, Any]]) -> str:
    """Split against aggregated serving at the same GPU count: TTFT, time per output token,
    compute hit ratio, KV moved, and why split variants skipped the prefill hop."""
    if not any(s.get("pd_decisions") for s in results.values()):
        return ""
    lines = [
        "| variant | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | compute hit | transfer GB "
        "| P/D decisions |",
        "|" + "---|" * 8,
    ]
    for name, s in results.items():
        d = s.get("pd_decisions") or {}
        total = sum(d.values()) or 1
        shown = ", ".join(f"{k} {v / total:.0%}" for k, v in d.items()) or "aggregated"
        lines.append(
            f"| {name} | {_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p99_s'])} "
            f"| {_fmt(s.get('tpot_p50_s'), 4)} | {_fmt(s.get('tpot_p99_s'), 4)} "
            f"| {_fmt(s.get('compute_hit_ratio'))} | {_fmt(s.get('transfer_gb'), 2)} | {shown} |"
        )
    return "\n".join(lines)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def results_table(results: dict[str, dict[str, Any]], ideal: float, pooled: float) -> str:
    # exact / over / under: the router's matched tokens against the engine's cached tokens
    # per request (share predicted exactly; over- and under-predicted tokens as a share of
    # the prompt tokens).
    head = ("| policy | hit ratio | of pooled | TTFT p50 | p90 | p99 | e2e p50 | p99 | req/s "
            "| failed | rejected | load max/mean | exact | over | under |")  # fmt: skip
    lines = [head, "|" + "---|" * 15]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['hit_ratio']:.3f} | {s['hit_ratio'] / pooled if pooled else 0:.2f} "
            f"| {_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p90_s'])} | {_fmt(s['ttft_p99_s'])} "
            f"| {_fmt(s['e2e_p50_s'], 2)} | {_fmt(s['e2e_p99_s'], 2)} | {s['throughput_rps']:.2f} "
            f"| {s['failed']} | {s['rejected']} | {s['load_max_over_mean']:.2f} "
            f"| {_pct(s.get('exact_share'))} | {_pct(s.get('over_share'), 2)} "
            f"| {_pct(s.get('under_share'), 2)} |"
        )
    lines.append(f"| ideal (one infinite cache) | {ideal:.3f} | | | | | | | | | | | | | |")
    lines.append(
        f"| pooled (one LRU of the fleet's capacity) | {pooled:.3f} | 1.00 "
        "| | | | | | | | | | | | |"
    )
    return "\n".join(lines)


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _markdown(table: str, meta: dict[str, Any], args: argparse.Namespace) -> str:
    cmd = "kvrouter bench routing" + (" --quick" if args.quick else "")
    return (
        f"# Routing benchmark\n\nCommand: `{cmd}`\n\n"
        f"{meta['requests']} requests from trace offset {meta['start']}, {meta['workers']} workers "
        f"x {meta['capacity_tokens']:,} tokens of KV cache, time scale {meta['time_scale']:g}. "
        "Latencies in simulated seconds.\n\n" + table + "\n\n"
        "![TTFT CDF](ttft_cdf.png) ![TPOT CDF](tpot_cdf.png) ![hit ratio](hit_ratio.png) "
        "![load](load.png)\n"
    )


def plot_results(
    out: Path,
    results: dict[str, dict[str, Any]],
    ttfts: dict[str, list[float]],
    ideal: float,
    pooled: float,
    tpots: dict[str, list[float]] | None = None,
) -> None:
    """ttft_cdf.png, hit_ratio.png and load.png in `out` (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'kvrouter[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, xs in ttfts.items():
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (simulated s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=110)
    plt.close(fig)

    if tpots and any(tpots.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, xs in tpots.items():
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("time per output token (simulated s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("TPOT CDF: aggregated and prefill/decode split")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "tpot_cdf.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    ax.bar(names, [results[n]["hit_ratio"] for n in names], color="#4878a8")
    ax.axhline(ideal, color="gray", linestyle="--", label=f"ideal {ideal:.3f}")
    ax.axhline(pooled, color="black", linestyle=":", label=f"pooled {pooled:.3f}")
    ax.set_ylabel("cached / prompt tokens")
    ax.set_title("KV-cache hit ratio")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hit_ratio.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(names))
    workers = sorted({w for n in names for w in results[n]["per_worker"]})
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(workers))]
        ax.bar(xs, [results[n]["per_worker"].get(w, 0) for w in workers], width=width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workers))], workers, rotation=30)
    ax.set_ylabel("requests served")
    ax.set_title("load per worker")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)
    plt.close(fig)
