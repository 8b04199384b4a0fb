"""`kvrouter serve`: run one router replica.

Flags mirror the ``KVR_*`` environment variables (flags win); see `settings.py` or the
README's settings table. Exit code 2 for a bad setting or tokenizer, with a message that
names it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from router_node.settings import RouterSettings, SettingsError, add_arguments


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = RouterSettings.load(args)
    except SettingsError as exc:
        print(f"kvrouter serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from router_node.app import create_app

    try:
        app = create_app(settings)
    except Exception as exc:  # TokenizerLoadError, DiscoveryError: an operator problem
        from kvrouter.discovery.kubernetes import DiscoveryError
        from kvrouter.tokenizer.errors import TokenizerError

        if isinstance(exc, TokenizerError | DiscoveryError):
            print(f"kvrouter serve: {exc}", file=sys.stderr)
            return 2
        raise
    logging.getLogger("router_node").info("starting: %r", settings)
    untokenized = sorted(n for n, b in settings.catalogue().bases.items() if not b.tokenizer)
    if untokenized:
        # The chart's default: easy to miss, and it quietly turns cache-aware routing off.
        logging.getLogger("router_node").warning(
            "no tokenizer for %s (KVR_TOKENIZER or the config file's tokenizer): chat and text "
            "requests are routed by load only; only pre-tokenized prompts use the KV index",
            ", ".join(untokenized),
        )
    loop = _event_loop()
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log=None,
        handler_cancellation=True,
        loop=loop,
        print=lambda text: logging.getLogger("router_node").info("%s", text.strip()),
    )
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (a dependency on Linux and macOS): it takes a large share of
    the router's own per-request overhead off (see docs/benchmarks.md); asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
