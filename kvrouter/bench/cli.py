"""`kvrouter bench <name>`: dispatch to one benchmark module."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

BENCHES: dict[str, tuple[str, str]] = {
    "index": (
        "kvrouter.bench.index_bench",
        "Lua lookup/record on a 1M-record index vs a naive walk",
    ),
    "routing": (
        "kvrouter.bench.routing_bench",
        "every routing policy on a simulated fleet replaying a Mooncake trace",
    ),
    "heal": (
        "kvrouter.bench.heal_bench",
        "a worker restarted silently mid-run: requests misrouted to it, with and without feedback",
    ),
    "sweep": (
        "kvrouter.bench.sweep",
        "every policy at several offered loads: TTFT, TPOT, goodput at SLO, validity",
    ),
    "listener": (
        "kvrouter.bench.listener_bench",
        "block events/s one listener applies to Redis vs one Lua call per event",
    ),
    "decode": (
        "kvrouter.bench.decode_bench",
        "KV-event payload decoding throughput vs a bare msgpack unpack",
    ),
    "priority": (
        "kvrouter.bench.priority_bench",
        "interactive TTFT under batch saturation, with and without the priority queue",
    ),
    "router": (
        "kvrouter.bench.router_bench",
        "latency the router adds, throughput, tokenizer cache",
    ),
}


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen or chosen is None:
            mod = importlib.import_module(module)
            mod.configure(p)
            p.set_defaults(_run=mod.run)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - replaced by the chosen bench
    raise SystemExit("choose a benchmark: " + ", ".join(BENCHES))
