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

Hit ratio is cached over prompt tokens, as the workers report it in `usage`. It is shown next
to two ideals over the same requests: one infinite cache (`ideal_hit_ratio`) and one LRU cache
holding the whole fleet's capacity (`pooled_hit_ratio`), which no router of separate caches
can beat by much. Latencies are in simulated seconds (wall seconds x time scale): the fleet's
timing model runs `time_scale` times faster than real time, so the router's and client's own
real overheads count `time_scale` times over: a conservative view of the router.

Writes report.md, results.json and PNG plots to --out; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrouter.bench.common import emit_json
from kvrouter.bench.stack import LocalStack, StackConfig
from kvrouter.sim.replay import RequestRecord, replay_trace, summarize
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


VARIANTS = (
    Variant("kv", "kv", True),
    Variant("kv_approx", "kv", False),
    Variant("round_robin", "round_robin", False),
    Variant("random", "random", False),
    Variant("least_load", "least_load", False),
    Variant("prefix_only", "prefix_only", False),
    Variant("session", "session", False),
    Variant("kv_4x", "kv", True, replicas=4),
)
# --quick: the first 900 requests (about 5 minutes of the trace), 6 times faster.
QUICK_LIMIT = 900
QUICK_TIME_SCALE = 6.0


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
        default=",".join(v.name for v in VARIANTS),
        help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS),
    )
    parser.add_argument("--out", default="out/bench-routing", help="report directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    by_name = {v.name: v for v in VARIANTS}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}")
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
    """One policy on a fresh stack (a fresh Redis unless `redis_url`, which is flushed)."""
    cfg = StackConfig(
        workers=args.workers, policy=v.policy, kv_events=v.kv_events, replicas=v.replicas,
        capacity_tokens=args.capacity_tokens, time_scale=scale, redis_url=redis_url,
    )  # fmt: skip
    async with LocalStack(cfg) as stack:
        t0 = time.monotonic()
        records = await replay_trace(
            requests, stack.router_urls, time_scale=scale, concurrency=args.concurrency,
            model=cfg.model, progress=sys.stderr.isatty(),
        )  # fmt: skip
        summary = summarize(records, time.monotonic() - t0)
    for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s"):
        if summary[k] is not None:
            summary[k] *= scale
    summary["throughput_rps"] /= scale
    summary["rejected"] = sum(1 for r in records if r.status in (429, 503))
    counts = [summary["per_worker"].get(w, 0) for w in (f"sim-{i}" for i in range(args.workers))]
    mean = statistics.mean(counts) if counts else 0.0
    summary["load_cv"] = statistics.pstdev(counts) / mean if mean else 0.0
    summary["load_max_over_mean"] = max(counts) / mean if mean else 0.0
    return summary, records


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
    results: dict[str, dict[str, Any]] = {}
    ttfts: dict[str, list[float]] = {}
    for v in variants:
        print(f"  {v.name} ...", file=sys.stderr, flush=True)
        summary, records = await run_variant(v, args, requests, scale)
        results[v.name] = summary
        ttfts[v.name] = sorted(r.ttft_s * scale for r in records if r.ok and r.ttft_s is not None)
        print(
            f"  {v.name}: hit {summary['hit_ratio']:.3f}, TTFT p50 {summary['ttft_p50_s']}",
            file=sys.stderr,
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, after all the traffic
    table = results_table(results, ideal, pooled)
    print(table)
    meta = {"requests": len(requests), "start": args.start, "workers": args.workers,
            "capacity_tokens": args.capacity_tokens, "time_scale": scale,
            "ideal_hit_ratio": ideal, "pooled_hit_ratio": pooled}  # fmt: skip
    (out / "results.json").write_text(json.dumps({**meta, "variants": results}, indent=2))
    (out / "report.md").write_text(_markdown(table, meta, args))
    if not args.no_plots:
        _plots(out, results, ttfts, ideal, pooled)
    final: dict[str, Any] = {"bench": "routing", "quick": bool(args.quick), **meta, "policies": {}}
    for name, s in results.items():
        final["policies"][name] = {
            "hit_ratio": round(s["hit_ratio"], 4),
            "ttft_p50_s": _r(s["ttft_p50_s"]),
            "ttft_p99_s": _r(s["ttft_p99_s"]),
            "failed": s["failed"],
        }
    return final


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def results_table(results: dict[str, dict[str, Any]], ideal: float, pooled: float) -> str:
    head = ("| policy | hit ratio | of pooled | TTFT p50 | p90 | p99 | e2e p50 | p99 | req/s "
            "| failed | rejected | load max/mean |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['hit_ratio']:.3f} | {s['hit_ratio'] / pooled if pooled else 0:.2f} "
            f"| {_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p90_s'])} | {_fmt(s['ttft_p99_s'])} "
            f"| {_fmt(s['e2e_p50_s'], 2)} | {_fmt(s['e2e_p99_s'], 2)} | {s['throughput_rps']:.2f} "
            f"| {s['failed']} | {s['rejected']} | {s['load_max_over_mean']:.2f} |"
        )
    lines.append(f"| ideal (one infinite cache) | {ideal:.3f} | | | | | | | | | | |")
    lines.append(
        f"| pooled (one LRU of the fleet's capacity) | {pooled:.3f} | 1.00 | | | | | | | | | |"
    )
    return "\n".join(lines)


def _markdown(table: str, meta: dict[str, Any], args: argparse.Namespace) -> str:
    cmd = "kvrouter bench routing" + (" --quick" if args.quick else "")
    return (
        f"# Routing benchmark\n\nCommand: `{cmd}`\n\n"
        f"{meta['requests']} requests from trace offset {meta['start']}, {meta['workers']} workers "
        f"x {meta['capacity_tokens']:,} tokens of KV cache, time scale {meta['time_scale']:g}. "
        "Latencies in simulated seconds.\n\n" + table + "\n\n"
        "![TTFT CDF](ttft_cdf.png) ![hit ratio](hit_ratio.png) ![load](load.png)\n"
    )


def _plots(
    out: Path,
    results: dict[str, dict[str, Any]],
    ttfts: dict[str, list[float]],
    ideal: float,
    pooled: float,
) -> None:
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
