"""`kvrouter serve`: run one router replica.

Flags mirror the ``KVR_*`` environment variables (flags win); see `settings.py` or the
generated tables in docs/settings.md. Exit code 2 for a bad setting or tokenizer, with a
message that names it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from kvrouter.settings import setup_logging
from router_node.settings import RouterSettings, SettingsError, add_arguments


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = RouterSettings.load(args)
    except SettingsError as exc:
        print(f"kvrouter serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from router_node.app import create_app
    from router_node.settings import otel_configured
    from router_node.tracing import setup_tracing

    setup_tracing(otel_configured())

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
    try:
        loop.run_until_complete(_serve(app, settings))
    finally:
        loop.close()
    return 0


async def _serve(app: web.Application, settings: RouterSettings) -> None:
    """Serve until SIGTERM or SIGINT, then drain (what ``web.run_app`` does, with the edge's
    runner: header read timeout and header limits, router_node/edge.py)."""
    from router_node.app import METRICS
    from router_node.edge import EdgeRunner

    runner = EdgeRunner(app, settings, app[METRICS], handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        logging.getLogger("router_node").info("serving on %s", site.name)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (a dependency on Linux and macOS): it takes a large share of
    the router's own per-request overhead off (see docs/benchmarks.md); asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
