"""`kvrouter bench heal`: a worker restarted silently mid-run, with and without feedback.

Each variant runs on a fresh stack (`kvrouter sim`, `kvrouter serve`, Redis; KV events off,
so nothing but the router's own records and, with feedback, the engines' reported cached
tokens tell the index what the workers hold). The trace's first part warms the fleet; the
worker that served most of it then drops its whole prefix cache without a word
(`POST /admin/restart` on the simulator: no AllBlocksCleared, no removals; the requests it
was running fail, as a restarted engine's do); the rest of the trace follows. With `--restart
busy` (the default) the worker restarts a few seconds into the second part, while requests
flow, and the misroutes counted are those sent after the restart; with `--restart idle` it
restarts between the parts, when it runs nothing, so no aborted request shows the restart.
`--down-s` closes its port for that long (1 s by default when busy, 0 when idle: a restart
that takes no time, which only the reported cached tokens can show). The `feedback` variant
heals from aborts (KVR_FEEDBACK_ABORT_CLEAR) and refused connections
(KVR_FEEDBACK_REFUSED_CLEAR) at once; `feedback_usage` shows what the reported cached tokens
alone do (with the LRU cut and the inference of an emptied cache, KVR_FEEDBACK_RESET_FILL).

A request is *misrouted* to the restarted worker when the router matched more whole blocks
there than the engine reports cached (``x-kvrouter-matched-tokens`` against
``usage.prompt_tokens_details.cached_tokens``). Reported per variant: the misrouted
requests after the restart, the requests the restarted worker took, the over-predicted
tokens there, the position (among requests sent to it after the restart) of the last
misroute, and the router's correction counter before and after the restart. Without
feedback the stale records live their TTL (the router's `record_ttl_s`, 600 s by default),
far past the run.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvrouter.bench.common import emit_json, print_table
from kvrouter.bench.stack import LocalStack, StackConfig
from kvrouter.sim.replay import RequestRecord, replay_trace
from kvrouter.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest, bundled_trace, load_trace

QUICK_LIMIT = 600
DEFAULT_LIMIT = 1500
TIME_SCALE = 4.0
HEAL_CAPACITY_TOKENS = 16_000_000
"""Room for every block of the bundled trace's first 1,500 requests (about 15.7 M distinct
tokens) on each worker: with KV events off the index never hears of a capacity eviction, so
smaller caches add misroutes that have nothing to do with the restart."""
VARIANTS: dict[str, tuple[tuple[str, str], ...]] = {
    # Everything on (the defaults): aborted streams, refused connections, then reported
    # cached tokens.
    "feedback": (
        ("KVR_FEEDBACK_HEAL", "true"),
        ("KVR_FEEDBACK_LRU_CUT", "true"),
        ("KVR_FEEDBACK_ABORT_CLEAR", "true"),
        ("KVR_FEEDBACK_REFUSED_CLEAR", "true"),
    ),
    # Reported cached tokens only, with the LRU cut: what heals a loss that aborts nothing
    # (a restart that found the engine idle, lost eviction notices).
    "feedback_usage": (
        ("KVR_FEEDBACK_HEAL", "true"),
        ("KVR_FEEDBACK_LRU_CUT", "true"),
        ("KVR_FEEDBACK_ABORT_CLEAR", "false"),
        ("KVR_FEEDBACK_REFUSED_CLEAR", "false"),
    ),
    # Corrections of the chain only: each stale chain costs a misrouted request.
    "feedback_chain": (
        ("KVR_FEEDBACK_HEAL", "true"),
        ("KVR_FEEDBACK_LRU_CUT", "false"),
        ("KVR_FEEDBACK_ABORT_CLEAR", "false"),
        ("KVR_FEEDBACK_REFUSED_CLEAR", "false"),
    ),
    "no_feedback": (("KVR_FEEDBACK_HEAL", "false"),),
}


def misroutes(
    records: Sequence[RequestRecord],
    worker: str,
    block_size: int,
    prompts: Mapping[int, Sequence[int]] | None = None,
    trace_block_tokens: int = TRACE_BLOCK_TOKENS,
) -> dict[str, Any]:
    """Count, over `records` (in send order), the requests sent to `worker` whose matched
    whole blocks exceed the engine's cached whole blocks.

    With `prompts` (record index -> the trace's hash ids) such a request is a *race*, not a
    misroute, when everything it matched is a prefix it shares with an earlier request still
    in flight on that worker: the router matched blocks that request's dispatch recorded and
    the engine was still computing. That happens on any worker whose cache is cold (both
    requests arrive within a prefill of each other), restarted or not, and the router's
    feedback knows it for a race (it corrects nothing there); it is counted apart."""
    to_worker = [r for r in records if r.ok and r.worker == worker]
    short = [
        (r.matched_tokens or 0) // block_size > (r.cached_tokens or 0) // block_size
        for r in to_worker
    ]

    def racing(i: int) -> bool:
        if prompts is None:
            return False
        r = to_worker[i]
        sent = r.sent_s or 0.0
        for e in to_worker[:i]:
            e_sent = e.sent_s or 0.0
            if not e_sent <= sent < e_sent + (e.e2e_s or 0.0):
                continue
            shared = _shared(prompts.get(e.index, ()), prompts.get(r.index, ()))
            if (r.matched_tokens or 0) <= shared * trace_block_tokens:
                return True
        return False

    races = [bad and racing(i) for i, bad in enumerate(short)]
    flags = [bad and not race for bad, race in zip(short, races, strict=True)]
    over = sum(
        max(0, (r.matched_tokens or 0) - (r.cached_tokens or 0))
        for r, bad in zip(to_worker, flags, strict=True)
        if bad
    )
    last = max((i + 1 for i, bad in enumerate(flags) if bad), default=0)
    # The engine reports its cached tokens at the end of a response (the final usage chunk),
    # so feedback can only act once the first misrouted request has answered: the requests
    # sent to the worker before that were already on their way.
    first = next((r for r, bad in zip(to_worker, flags, strict=True) if bad), None)
    answered = (first.sent_s or 0.0) + (first.e2e_s or 0.0) if first is not None else 0.0
    late = [bad for r, bad in zip(to_worker, flags, strict=True) if (r.sent_s or 0.0) > answered]
    return {
        "sent_before_first_answer": len(to_worker) - len(late) if first is not None else 0,
        "misrouted_after_first_answer": sum(late),
        "misrouted": sum(flags),
        "races": sum(races),
        "requests_to_worker": len(to_worker),
        "over_predicted_tokens": over,
        "last_misroute_at": last,
        "misroute_positions": [i + 1 for i, bad in enumerate(flags) if bad][:50],
        "race_positions": [i + 1 for i, race in enumerate(races) if race][:50],
    }


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading hash ids `a` and `b` share (chained ids: the same prefix)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _counter(text: str, name: str) -> float:
    """The sum over labels of counter `name` (with its ``_total``) in a /metrics page."""
    return math.fsum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def run_variant(
    name: str,
    env: tuple[tuple[str, str], ...],
    args: argparse.Namespace,
    requests: list[TraceRequest],
) -> dict[str, Any]:
    """One variant on a fresh stack; the summary of the restarted worker after the restart."""
    cfg = StackConfig(
        workers=args.workers, kv_events=False, time_scale=TIME_SCALE,
        capacity_tokens=args.capacity_tokens,
        extra_router_env=env,
    )  # fmt: skip
    cut = int(len(requests) * args.restart_at)
    async with LocalStack(cfg) as stack:
        assert stack.fleet is not None
        warm = await replay_trace(
            requests[:cut], stack.router_urls, time_scale=TIME_SCALE,
            concurrency=args.concurrency, model=cfg.model,
        )  # fmt: skip
        # Corrections before the restart are races, not losses: a request matched blocks a
        # concurrent one to the same worker had recorded but not yet computed.
        warm_corrections = _counter(
            await stack.metrics(stack.router_urls[0]), "kvrouter_index_corrections_total"
        )
        served = Counter(r.worker for r in warm if r.ok and r.worker)
        victim = served.most_common(1)[0][0]
        url = next(w.url for w in stack.fleet.workers if w.id == victim)

        async def restart() -> int:
            down = args.down_s
            restart_url = f"{url}/admin/restart?down_s={down}"
            async with aiohttp.ClientSession() as http, http.post(restart_url) as r:
                if r.status != 200:
                    raise RuntimeError(f"/admin/restart on {victim}: HTTP {r.status}")
                return int((await r.json())["aborted"])

        loop = asyncio.get_running_loop()
        aborted = 0
        if args.restart == "idle":
            aborted = await restart()
        t0 = loop.time()
        # The replay's clock starts when it is called: its sent_s count from about t0.
        second = asyncio.ensure_future(
            replay_trace(
                requests[cut:],
                stack.router_urls,
                time_scale=TIME_SCALE,
                concurrency=args.concurrency,
                model=cfg.model,
                first_index=cut,
                start_ms=requests[cut].timestamp_ms,
            )
        )
        restart_at = 0.0
        if args.restart == "busy":
            await asyncio.sleep(args.restart_after_s)
            restart_at = loop.time() - t0
            aborted = await restart()
        after = await second
        duration = loop.time() - t0
        text = await stack.metrics(stack.router_urls[0])
    after.sort(key=lambda r: r.sent_s or 0.0)
    # What was sent before the restart completed there or was aborted and retried elsewhere.
    prompts = {cut + i: r.hash_ids for i, r in enumerate(requests[cut:])}
    out = misroutes(
        [r for r in after if (r.sent_s or 0.0) >= restart_at], victim, cfg.block_size, prompts
    )
    others = [
        misroutes(after, w, cfg.block_size, prompts)["misrouted"]
        for w in served
        if w and w != victim
    ]
    out.update(
        variant=name,
        restarted_worker=victim,
        restart=args.restart,
        down_s=args.down_s,
        restart_at_s=round(restart_at, 3),
        aborted_at_restart=aborted,
        abort_clears=_counter(text, "kvrouter_index_abort_clears_total"),
        refused_clears=_counter(text, "kvrouter_index_refused_clears_total"),
        reset_clears=_counter(text, "kvrouter_index_reset_clears_total"),
        warm_requests=cut,
        requests_after=len(after),
        failed_after=sum(1 for r in after if not r.ok),
        misrouted_elsewhere=sum(others),
        corrections_before_restart=warm_corrections,
        corrections_after_restart=_counter(text, "kvrouter_index_corrections_total")
        - warm_corrections,
        duration_s=round(duration, 1),
    )
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_LIMIT} requests")
    parser.add_argument("--trace", default="bundled", help="Mooncake JSONL (default: bundled)")
    parser.add_argument("--limit", type=int, help=f"requests to replay (default {DEFAULT_LIMIT})")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--capacity-tokens",
        type=int,
        default=HEAL_CAPACITY_TOKENS,
        help="each worker's KV cache, tokens (default: room for the whole trace, so the "
        "restart is the only loss; smaller: capacity evictions the index never hears of too)",
    )
    parser.add_argument(
        "--restart-at", type=float, default=0.5, help="share of the requests before the restart"
    )
    parser.add_argument(
        "--restart",
        choices=("busy", "idle"),
        default="busy",
        help="busy: restart the worker while the second part's requests flow (it aborts the "
        "ones it runs, as a restarted engine does); idle: between the parts, when it runs "
        "nothing (no abort shows the restart: only reported cached tokens can)",
    )
    parser.add_argument(
        "--restart-after-s",
        type=float,
        default=3.0,
        help="busy: real seconds into the second part before the restart",
    )
    parser.add_argument(
        "--down-s",
        type=float,
        default=None,
        help="real seconds the restarting worker's port is closed (a restart takes time: the "
        "engine reloads its model); 0: it takes new requests at once (default: 1 for busy, "
        "0 for idle)",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS)
    )


def run(args: argparse.Namespace) -> int:
    wanted = [v for v in args.variants.split(",") if v]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}")
    if not 0 < args.restart_at < 1:
        raise SystemExit("--restart-at: must be between 0 and 1")
    if args.down_s is None:
        args.down_s = 1.0 if args.restart == "busy" else 0.0
    if args.restart_after_s < 0 or args.down_s < 0:
        raise SystemExit("--restart-after-s, --down-s: must be >= 0")
    limit = args.limit or (QUICK_LIMIT if args.quick else DEFAULT_LIMIT)
    source = bundled_trace() if args.trace == "bundled" else Path(args.trace)
    requests = load_trace(source, limit=limit)
    results = {v: asyncio.run(run_variant(v, VARIANTS[v], args, requests)) for v in wanted}
    rows = [
        (
            v,
            f"{r['misrouted']} of {r['requests_to_worker']}",
            f"{r['races']}",
            f"{r['misrouted_after_first_answer']}",
            f"{r['aborted_at_restart']} / {r['abort_clears']:g} / {r['refused_clears']:g}"
            f" / {r['reset_clears']:g}",
            f"last at #{r['last_misroute_at']}, corrections {r['corrections_before_restart']:g}"
            f" before / {r['corrections_after_restart']:g} after the restart",
        )
        for v, r in results.items()
    ]
    print_table(
        rows,
        (
            "variant",
            "misrouted to the restarted worker",
            "races (not counted)",
            "of them sent after the first misrouted one answered",
            "aborted at the restart / abort, refused, reset clears",
            "healing",
        ),
    )
    sys.stdout.flush()
    emit_json({"bench": "heal", "requests": len(requests), "variants": results})
    return 0
