"""`kvrouter bench sweep`: every policy at several offered loads; latency, goodput, validity.

Load is offered prompt tokens per second over the fleet's prefill capacity (each worker's
prefill tokens per second times its speed factor, summed): a trace is replayed at load L by
scaling its arrival times (`kvrouter.sim.workload.at_load`). At each load every policy runs
on a fresh stack (`routing_bench.run_variant`), rounds interleaved with ``--repeat``.

Per load and policy: TTFT p50/p90/p99, time per output token p50/p99, end-to-end p50/p99,
throughput, hit ratio, and goodput: requests per second that met the SLO (TTFT and TPOT
bounds, ``--slo-ttft-s`` / ``--slo-tpot-s``), over the run's duration (first send to last
completion, simulated seconds). The report says at which load each policy's goodput peaks,
and how evenly each point's requests waited (`worker_spread`: mean TTFT, each worker's TTFT
p50, the busiest worker's uncached tokens over the mean), which tells a median made by a few
short workers from one where every request waited alike.

Validity: a point whose client sent requests late, or whose router's event loop lagged, by
more than ``--max-lag-s`` (p99, simulated seconds) measured the machine, not the routing. It
is marked INVALID in the tables, the JSON (``invalid``: the reasons) and the peak summary.

Time scale: the simulator runs ``--time-scale`` simulated seconds per real second, lowered at
high loads so the client never offers more than ``--max-real-rps`` requests or
``--max-real-tokens-per-s`` prompt tokens per real second (the machine's limits, not the
fleet's: on two shared cores the bundled trace's 14k-token prompts at time scale 6 made every
point invalid).

Workloads: ``--trace bundled`` (the bundled conversation trace), ``--trace shared-prefix``
(the generator in kvrouter.sim.workload, sized by the ``--groups`` ... flags), or any
Mooncake-format JSONL file.

Writes report.md, results.json, ttft_p90_vs_load.png and goodput_vs_load.png to --out, and
every run's requests to records/ there (one JSON line each); the last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrouter.bench.common import emit_json
from kvrouter.bench.routing_bench import (
    DEFAULT_MAX_LAG_S,
    VARIANTS,
    Variant,
    combine_runs,
    run_variant,
    validity,
)
from kvrouter.sim.replay import RequestRecord, percentile
from kvrouter.sim.settings import DEFAULT_CAPACITY_TOKENS, SimSettings
from kvrouter.sim.trace import (
    TraceRequest,
    bundled_trace,
    infinite_cache_hit_ratio,
    load_trace,
    lru_cache_hit_ratio,
)
from kvrouter.sim.workload import (
    SharedPrefixSpec,
    at_load,
    offered_load,
    shared_prefix_trace,
    span_s,
    to_jsonl,
)

DEFAULT_LOADS = "0.3,0.6,0.9,1.2"
DEFAULT_POLICIES = "kv,round_robin,least_load"
# The shared-prefix workload's default fleet: a small KV cache per worker keeps the run short
# while the prefixes (64 x 2,048 tokens) are 4x one worker's cache and half the fleet's.
SHARED_PREFIX_CAPACITY_TOKENS = 32_768
BUNDLED_LIMIT = 600


@dataclass(frozen=True, slots=True)
class Slo:
    """A request meets the objective when its TTFT and TPOT are both within bounds."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1

    def met(self, rec: RequestRecord, scale: float) -> bool:
        """Whether `rec` (real seconds, replayed at time scale `scale`) met it."""
        if not rec.ok or rec.ttft_s is None or rec.ttft_s * scale > self.ttft_s:
            return False
        tpot = rec.tpot_s
        return tpot is None or tpot * scale <= self.tpot_s


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of `kvrouter bench sweep`."""
    parser.add_argument(
        "--trace",
        default="shared-prefix",
        help="shared-prefix (generated, default), bundled, or a Mooncake JSONL file",
    )
    parser.add_argument(
        "--loads", default=DEFAULT_LOADS, help=f"offered loads (default {DEFAULT_LOADS})"
    )
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"variants of bench routing (default {DEFAULT_POLICIES}); any of: "
        + ", ".join(v.name for v in VARIANTS),
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--capacity-tokens",
        type=int,
        help=f"KV capacity per worker in tokens (default {SHARED_PREFIX_CAPACITY_TOKENS:,} for "
        f"shared-prefix, else {DEFAULT_CAPACITY_TOKENS:,})",
    )
    parser.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=SimSettings().prefill_tokens_per_s,
        help="each worker's prefill throughput at speed factor 1",
    )
    parser.add_argument(
        "--speed-mix", default="", help="speed factors given to the workers in turn (e.g. 2,1)"
    )
    parser.add_argument("--start", type=int, default=0, help="skip this many trace requests")
    parser.add_argument(
        "--limit", type=int, help=f"replay at most this many requests (bundled: {BUNDLED_LIMIT})"
    )
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="simulated seconds per real second, at most (default 4)")  # fmt: skip
    parser.add_argument(
        "--max-real-rps",
        type=float,
        default=60.0,
        help="lower the time scale so no point sends more requests per real second (default 60)",
    )
    parser.add_argument(
        "--max-real-tokens-per-s",
        type=float,
        default=100_000.0,
        help="likewise for prompt tokens per real second (default 100,000): long prompts cost "
        "the client and the router per token",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="most requests in flight (default 0: every request, an open loop). A cap holds "
        "requests back while the fleet queues, and that wait counts as the client sending "
        "late: it would mark a point INVALID for the fleet's queueing, not the machine's",
    )
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds per point")
    parser.add_argument("--slo-ttft-s", type=float, default=2.0, help="SLO on TTFT (default 2)")
    parser.add_argument(
        "--slo-tpot-s", type=float, default=0.1, help="SLO on time per output token (default 0.1)"
    )
    parser.add_argument(
        "--max-lag-s",
        type=float,
        default=DEFAULT_MAX_LAG_S,
        help="a point is invalid when send lateness or router loop lag (p99, simulated "
        f"seconds) exceeds this (default {DEFAULT_MAX_LAG_S:g})",
    )
    spec = SharedPrefixSpec()
    g = parser.add_argument_group("shared-prefix workload")
    g.add_argument("--groups", type=int, default=spec.groups, help="prefix groups")
    g.add_argument("--prefix-tokens", type=int, default=spec.prefix_tokens,
                   help="shared system prompt per group (multiple of 512)")  # fmt: skip
    g.add_argument("--question-tokens", type=int, default=spec.question_tokens)
    g.add_argument("--output-tokens", type=int, default=spec.output_tokens)
    g.add_argument("--requests", type=int, default=spec.requests)
    g.add_argument("--workload-seed", type=int, default=spec.seed)
    g.add_argument("--write-trace", help="also write the generated trace (Mooncake JSONL) here")
    parser.add_argument("--out", default="out/bench-sweep", help="report directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def parse_loads(text: str) -> list[float]:
    """`0.3,0.6` -> [0.3, 0.6]; each > 0."""
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--loads: expected numbers, got {text!r}") from None
    if not loads or any(not x > 0 for x in loads):
        raise SystemExit(f"--loads: expected positive numbers, got {text!r}")
    return loads


def workload(args: argparse.Namespace) -> tuple[str, list[TraceRequest], int]:
    """(name, requests, capacity_tokens per worker) from the flags."""
    if args.trace == "shared-prefix":
        spec = SharedPrefixSpec(
            groups=args.groups, prefix_tokens=args.prefix_tokens,
            question_tokens=args.question_tokens, output_tokens=args.output_tokens,
            requests=args.requests, seed=args.workload_seed,
        )  # fmt: skip
        capacity = args.capacity_tokens or SHARED_PREFIX_CAPACITY_TOKENS
        for problem in spec.check(args.workers, capacity):
            print(f"  warning: {problem}", file=sys.stderr)
        requests = shared_prefix_trace(spec)
        if args.write_trace:
            Path(args.write_trace).write_text(to_jsonl(requests), encoding="utf-8")
        return "shared-prefix", requests, capacity
    source = bundled_trace() if args.trace == "bundled" else Path(args.trace)
    limit = args.limit if args.limit is not None else BUNDLED_LIMIT
    requests = load_trace(source, start=args.start, limit=limit)
    return args.trace, requests, args.capacity_tokens or DEFAULT_CAPACITY_TOKENS


def fleet_capacity(args: argparse.Namespace) -> float:
    """The fleet's prefill tokens per second: every worker's at its speed factor."""
    s = SimSettings(workers=args.workers, speed_mix=args.speed_mix)
    per_worker = float(args.prefill_tokens_per_s)
    return sum(per_worker * s.speed_of(i) for i in range(args.workers))


def run(args: argparse.Namespace) -> int:
    """Run the sweep; the last stdout line is its JSON summary."""
    loads = parse_loads(args.loads)
    by_name = {v.name: v for v in VARIANTS}
    wanted = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"--policies: unknown {', '.join(unknown)}")
    if args.repeat < 1:
        raise SystemExit("--repeat: must be >= 1")
    name, requests, capacity = workload(args)
    if len(requests) < 2:
        raise SystemExit("the trace needs at least two requests")
    variants = [by_name[w] for w in wanted]
    result = asyncio.run(_sweep(args, name, requests, capacity, loads, variants))
    emit_json(result)
    return 0


def point_summary(
    runs: list[tuple[dict[str, Any], list[RequestRecord]]],
    args: argparse.Namespace,
    scale: float,
    slo: Slo,
) -> dict[str, Any]:
    """One (load, policy) point over its runs: the routing bench's summary plus goodput and
    validity."""
    s = combine_runs(runs, args.workers, scale)
    records = [r for _, rs in runs for r in rs]
    duration = sum(run[0]["duration_s"] for run in runs) * scale
    good = sum(1 for r in records if slo.met(r, scale))
    s["good"] = good
    s["goodput_rps"] = good / duration if duration else 0.0
    s.update(worker_spread([rs for _, rs in runs], scale))
    s["invalid"] = validity(s, args.max_lag_s)
    return s


def worker_spread(runs: Sequence[Sequence[RequestRecord]], scale: float) -> dict[str, Any]:
    """How evenly a point's requests waited, over its runs (one list of records each): the mean
    TTFT, each worker's TTFT p50 (simulated seconds; ``run/worker`` when there are several runs,
    since a worker of one run has nothing to do with its namesake in another) and the largest
    worker's uncached prompt tokens over the mean worker's.

    In overload the median and the mean part ways: a policy that evens out the workers' queues
    makes every request wait about the mean, while one that leaves some workers short (and
    others far over) serves the short ones' requests fast, and those can be the median.
    These say which of the two a point's p50 reflects."""
    ttfts: dict[str, list[float]] = {}
    uncached: dict[str, int] = {}
    for i, records in enumerate(runs):
        for r in records:
            if not r.ok or r.worker is None:
                continue
            key = r.worker if len(runs) == 1 else f"{i}/{r.worker}"
            uncached[key] = uncached.get(key, 0) + r.prompt_tokens - (r.cached_tokens or 0)
            if r.ttft_s is not None:
                ttfts.setdefault(key, []).append(r.ttft_s * scale)
    every = [t for ts in ttfts.values() for t in ts]
    p50s: dict[str, float] = {}
    for w, ts in sorted(ttfts.items()):
        p50 = percentile(ts, 50)
        if p50 is not None:  # never: a worker is here for its first TTFT
            p50s[w] = p50
    mean_uncached = sum(uncached.values()) / len(uncached) if uncached else 0.0
    return {
        "ttft_mean_s": statistics.fmean(every) if every else None,
        "worker_ttft_p50_s": p50s,
        "worker_ttft_p50_min_s": min(p50s.values()) if p50s else None,
        "worker_ttft_p50_max_s": max(p50s.values()) if p50s else None,
        "uncached_max_over_mean": max(uncached.values()) / mean_uncached if mean_uncached else None,
    }


async def _sweep(
    args: argparse.Namespace,
    workload_name: str,
    requests: list[TraceRequest],
    capacity_tokens: int,
    loads: list[float],
    variants: list[Variant],
) -> dict[str, Any]:
    fleet = fleet_capacity(args)
    native = offered_load(requests, fleet)
    bs = 16
    ideal = infinite_cache_hit_ratio(requests, block_size=bs).ratio
    pooled = lru_cache_hit_ratio(requests, args.workers * capacity_tokens // bs, block_size=bs)
    slo = Slo(args.slo_ttft_s, args.slo_tpot_s)
    print(
        f"kvrouter bench sweep: {workload_name}, {len(requests)} requests (native load "
        f"{native:.2f}), {args.workers} workers x {capacity_tokens:,} tokens, fleet prefill "
        f"{fleet:,.0f} tokens/s; ideal hit {ideal:.3f}, pooled {pooled.ratio:.3f}",
        file=sys.stderr,
    )
    # run_variant reads these from its args.
    run_args = argparse.Namespace(**vars(args))
    run_args.capacity_tokens = capacity_tokens
    run_args.models = 1
    run_args.concurrency = args.concurrency or len(requests)
    points: list[dict[str, Any]] = []
    for load in loads:
        scaled = at_load(requests, load, fleet)
        scale = real_time_scale(scaled, args)
        runs: dict[str, list[tuple[dict[str, Any], list[RequestRecord]]]] = {
            v.name: [] for v in variants
        }
        for rep in range(args.repeat):
            for v in variants:
                summary, records = await run_variant(v, run_args, scaled, scale)
                runs[v.name].append((summary, records))
                write_records(Path(args.out), load, v.name, rep, records)
        for v in variants:
            s = point_summary(runs[v.name], args, scale, slo)
            s.update(load=load, policy=v.name, time_scale=scale)
            s.pop("per_worker", None)
            points.append(s)
            flag = " INVALID: " + "; ".join(s["invalid"]) if s["invalid"] else ""
            print(
                f"  load {load:g} {v.name}: hit {s['hit_ratio']:.3f}, TTFT p50 "
                f"{_f(s['ttft_p50_s'])} p90 {_f(s['ttft_p90_s'])} s, goodput "
                f"{s['goodput_rps']:.2f}/s, failed {s['failed']}{flag}",
                file=sys.stderr,
                flush=True,
            )

    meta: dict[str, Any] = {
        "workload": workload_name, "requests": len(requests), "workers": args.workers,
        "capacity_tokens": capacity_tokens, "speed_mix": args.speed_mix,
        "fleet_prefill_tokens_per_s": fleet, "native_load": native, "repeat": args.repeat,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "max_lag_s": args.max_lag_s,
        "ideal_hit_ratio": ideal, "pooled_hit_ratio": pooled.ratio,
    }  # fmt: skip
    peaks = peak_goodput(points)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, after all the traffic
    (out / "results.json").write_text(
        json.dumps({**meta, "peaks": peaks, "points": points}, indent=2)
    )
    text = report(points, peaks, meta, command_line(args))
    (out / "report.md").write_text(text)
    print(text)
    if not args.no_plots:
        plots(out, points)
    return {
        "bench": "sweep",
        **{k: meta[k] for k in ("workload", "requests", "workers", "native_load")},
        "peaks": peaks,
        "invalid_points": sum(1 for p in points if p["invalid"]),
        "failed": sum(p["failed"] for p in points),
    }


def write_records(
    out: Path, load: float, policy: str, run: int, records: list[RequestRecord]
) -> Path:
    """One run's requests, one JSON object per line (RequestRecord.to_json: worker, when it
    was due and sent, TTFT, end to end, prompt and cached tokens, error; real seconds), to
    ``records/load<load>-<policy>-<run>.jsonl`` under `out`: what a point's percentiles were
    computed from, for looking at single requests."""
    path = out / "records" / f"load{load:g}-{policy}-{run}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    return path


def real_time_scale(requests: list[TraceRequest], args: argparse.Namespace) -> float:
    """The time scale of one point: ``--time-scale``, lowered until neither requests nor
    prompt tokens arrive faster per real second than the machine can send and route."""
    span = span_s(requests)
    rps = (len(requests) - 1) / span
    tps = sum(r.input_length for r in requests[1:]) / span
    return float(min(args.time_scale, args.max_real_rps / rps, args.max_real_tokens_per_s / tps))


def peak_goodput(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy: the load of its highest goodput and that goodput; `valid` says whether
    that point (and every point of the policy) was valid."""
    peaks: dict[str, dict[str, Any]] = {}
    for p in points:
        best = peaks.get(p["policy"])
        if best is None or p["goodput_rps"] > best["goodput_rps"]:
            peaks[p["policy"]] = {
                "load": p["load"],
                "goodput_rps": round(p["goodput_rps"], 3),
                "valid": not p["invalid"],
            }
    for name, peak in peaks.items():
        peak["all_points_valid"] = not any(p["invalid"] for p in points if p["policy"] == name)
    return peaks


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this sweep (flags that differ from their defaults)."""
    parser = argparse.ArgumentParser()
    configure(parser)
    defaults = vars(parser.parse_args([]))
    flags = []
    for key, value in vars(args).items():
        if key in defaults and value != defaults[key]:
            flag = "--" + key.replace("_", "-")
            flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(["kvrouter bench sweep", *flags])


def report(
    points: list[dict[str, Any]],
    peaks: dict[str, dict[str, Any]],
    meta: dict[str, Any],
    command: str,
) -> str:
    """The sweep as markdown: one table of every point, then each policy's peak goodput."""
    head = (
        "| load | policy | hit ratio | TTFT p50 | p90 | p99 | TPOT p50 | p99 | e2e p50 | p99 "
        "| req/s | goodput/s | failed | valid |"
    )
    lines = [head, "|" + "---|" * 14]
    for p in points:
        valid = "yes" if not p["invalid"] else "**INVALID**: " + "; ".join(p["invalid"])
        lines.append(
            f"| {p['load']:g} | {p['policy']} | {p['hit_ratio']:.3f} | {_f(p['ttft_p50_s'])} "
            f"| {_f(p['ttft_p90_s'])} | {_f(p['ttft_p99_s'])} | {_f(p['tpot_p50_s'], 4)} "
            f"| {_f(p['tpot_p99_s'], 4)} | {_f(p['e2e_p50_s'], 2)} | {_f(p['e2e_p99_s'], 2)} "
            f"| {p['throughput_rps']:.2f} | {p['goodput_rps']:.2f} | {p['failed']} | {valid} |"
        )
    spread = [
        "| load | policy | TTFT mean | TTFT p50 of the fastest worker | of the slowest "
        "| uncached tokens, busiest worker over mean |",
        "|" + "---|" * 6,
    ]
    for p in points:
        ratio = p.get("uncached_max_over_mean")
        spread.append(
            f"| {p['load']:g} | {p['policy']} | {_f(p.get('ttft_mean_s'))} "
            f"| {_f(p.get('worker_ttft_p50_min_s'))} | {_f(p.get('worker_ttft_p50_max_s'))} "
            f"| {_f(ratio, 2)} |"
        )
    peak_lines = ["| policy | peak goodput/s | at load | valid |", "|---|---|---|---|"]
    for name, pk in peaks.items():
        valid = "yes" if pk["all_points_valid"] else ("peak only" if pk["valid"] else "NO")
        peak_lines.append(f"| {name} | {pk['goodput_rps']:.2f} | {pk['load']:g} | {valid} |")
    slo = meta["slo"]
    return (
        f"# Load sweep\n\nCommand: `{command}`\n\n"
        f"Workload {meta['workload']}: {meta['requests']} requests, {meta['workers']} workers x "
        f"{meta['capacity_tokens']:,} tokens of KV cache"
        + (f", speed mix {meta['speed_mix']}" if meta["speed_mix"] else "")
        + f"; fleet prefill {meta['fleet_prefill_tokens_per_s']:,.0f} tokens/s. Load = offered "
        f"prompt tokens/s over that (the trace as recorded: {meta['native_load']:.2f}). Ideal "
        f"hit ratio {meta['ideal_hit_ratio']:.3f}, pooled {meta['pooled_hit_ratio']:.3f}. "
        f"Goodput: requests/s with TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s']:g} s. "
        f"Latencies in simulated seconds. A point is INVALID when the client's send lateness "
        f"or a router's event-loop lag (p99) exceeded {meta['max_lag_s']:g} s.\n\n"
        + "\n".join(lines)
        + "\n\nWhere requests waited (simulated seconds; each worker's TTFT p50, and its share "
        "of the prompt tokens it had to compute): a policy that evens out the queues makes every "
        "request wait about the mean; one that leaves some workers short serves their requests "
        "fast, and in overload those can make the median.\n\n"
        + "\n".join(spread)
        + "\n\n"
        + "\n".join(peak_lines)
        + "\n\n![TTFT p90 vs load](ttft_p90_vs_load.png) ![goodput vs load](goodput_vs_load.png)\n"
    )


def plots(out: Path, points: list[dict[str, Any]]) -> None:
    """TTFT p90 and goodput against load, one line per policy; invalid points hollow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'kvrouter[bench]')", file=sys.stderr)
        return
    policies = list(dict.fromkeys(p["policy"] for p in points))
    for key, ylabel, fname, log in (
        ("ttft_p90_s", "TTFT p90 (simulated s)", "ttft_p90_vs_load.png", True),
        ("goodput_rps", "goodput (requests/s within SLO)", "goodput_vs_load.png", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in policies:
            ps = [p for p in points if p["policy"] == name and p[key] is not None]
            ax.plot([p["load"] for p in ps], [p[key] for p in ps], marker="o", label=name)
            bad = [p for p in ps if p["invalid"]]
            if bad:
                ax.scatter([p["load"] for p in bad], [p[key] for p in bad], s=120,
                           facecolors="none", edgecolors="red", zorder=3)  # fmt: skip
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("offered load (prompt tokens/s over fleet prefill capacity)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel + " vs load (red rings: invalid points)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
