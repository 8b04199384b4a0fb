"""`kvrouter listen`: the eviction listener. Every flag is also a ``KVR_*`` variable."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from eviction_listener.settings import (
    ListenerSettings,
    SettingsError,
    env_name,
    flag_name,
    parse_engines,
)

_HELP = {
    "model": "model (OpenAI name) whose index this listener writes (required)",
    "redis_url": "redis://, rediss://, redis+cluster:// or redis+sentinel:// URL",
    "block_size": "router block size in tokens (must match the routers')",
    "hash_seed": "hash seed the routers use (folded into every chain's root)",
    "key_prefix": "prefix of every Redis key",
    "engines": "ID=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,dp=N][,topic=T][,block=B]"
    "[,bind=1]; repeatable",
    "discovery": "where engines come from: static (--engine) or redis (the worker registry)",
    "discovery_interval_s": "seconds between discovery polls",
    "metrics_host": "address of the metrics HTTP server",
    "metrics_port": "port of /metrics, /health, /ready (0 = any free port)",
    "listener_id": "this replica's id (default host-pid)",
    "record_ttl_s": "life of a confirmed record, seconds",
    "worker_capacity_blocks": "trim each worker's records to this many blocks (0 = no limit)",
    "lease_s": "ownership lease, seconds: takeover time after a replica dies",
    "replay_timeout_s": "wait for an engine's replay socket, seconds",
    "drain_grace_s": "on SIGTERM, seconds to apply what was already received",
    "notices": "subscribe to the model's notice channel (true/false)",
    "key_cache_blocks": "engine hash -> router key entries cached per worker",
    "apply_batch": "most queued items applied in one Redis round trip",
    "apply_max_blocks": "most block events in one flush: bounds a router lookup's wait on Redis",
}


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    for f in dataclasses.fields(ListenerSettings):
        help_text = f"{_HELP.get(f.name, '')} [{env_name(f.name)}]"
        if f.name == "engines":
            parser.add_argument("--engine", dest="engines", action="append", help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text)
    parser.add_argument("--log-level", default="INFO", help="logging level")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides: dict[str, object] = {}
    try:
        for f in dataclasses.fields(ListenerSettings):
            raw = getattr(args, f.name, None)
            if raw is None:
                continue
            if f.name == "engines":
                overrides["engines"] = tuple(e for r in raw for e in parse_engines(r))
                continue
            overrides[f.name] = _parse_flag(f.name, raw)
        settings = ListenerSettings.from_env(**overrides)  # type: ignore[arg-type]
    except (SettingsError, ValueError) as exc:
        print(f"kvrouter listen: error: {exc}", file=sys.stderr)
        return 2
    from eviction_listener.service import run_listener

    return run_listener(settings)


def _parse_flag(name: str, raw: str) -> object:
    from eviction_listener.settings import _PARSERS

    try:
        return _PARSERS[name](raw)
    except ValueError as exc:
        raise SettingsError(f"{flag_name(name)}: {exc}") from None
