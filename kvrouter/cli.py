"""The `kvrouter` command: one binary, several roles.

Each role lives in its own module, imported only when that role runs, so `kvrouter serve`
never pays for the simulator's imports. A role module provides two functions:

    configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None
        # add its flags; argv is what follows the role's name (for nested roles)
    run(args: argparse.Namespace) -> int                 # do the work, return the exit code
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from kvrouter import __version__

# name -> (module, one-line help). Nested roles (bench) dispatch again inside their module.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("kvrouter.bench.cli", "benchmarks that print a ratio against an in-run baseline"),
    "epp": (
        "router_node.epp_cli",
        "the router as an endpoint picker for Envoy inference gateways (ext_proc, gRPC)",
    ),
    "inspect": (
        "kvrouter.inspect",
        "the shared index as an operator sees it: residency, shared prefixes, listeners, leases",
    ),
    "listen": (
        "eviction_listener.cli",
        "eviction listener: engine KV events and worker notices into the shared index",
    ),
    "sim": ("kvrouter.sim.cli", "simulated vLLM-compatible workers (KV cache, timing, KV events)"),
    "demo": (
        "kvrouter.demo",
        "everything on an embedded default: Redis, 8 simulated workers, router",
    ),
    "register": (
        "kvrouter.register",
        "worker sidecar: register in the Redis registry, heartbeat, deregister on SIGTERM",
    ),
    "replay": ("kvrouter.sim.replay", "replay a Mooncake trace against a router or worker"),
    "serve": ("router_node.cli", "run a router replica (OpenAI-compatible, KV-cache-aware)"),
}


# Commands that start a fleet of their own (Redis, simulated workers, listeners, routers) in
# process sessions of their own, so that a terminal's Ctrl-C reaches only the command, which
# then closes them. A SIGTERM (`timeout`, a CI job cancelled, `kill`) would end the command at
# once and leave the fleet running: for these, it stops them the way Ctrl-C does.
_OWN_FLEET = frozenset({"bench", "demo"})


class RoleModule(Protocol):
    def configure(self, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(module: str) -> RoleModule:
    return cast(RoleModule, importlib.import_module(module))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser; only the module of the chosen role is imported."""
    parser = argparse.ArgumentParser(prog="kvrouter", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvrouter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            role = _load(module)
            role.configure(p, argv[list(argv).index(name) + 1 :])
            p.set_defaults(_run=role.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:  # pragma: no cover - argparse already exited for a missing command
        parser.print_help()
        return 2
    if args.command in _OWN_FLEET:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    return int(run(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
