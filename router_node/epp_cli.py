"""`kvrouter epp`: run the router as an endpoint picker (Envoy ext_proc over gRPC).

The same settings as `kvrouter serve` (flags mirror the ``KVR_*`` variables) plus the EPP's
ports (``--epp-port``, ``--epp-health-port``, ``--metrics-port``). Exit code 2 for a bad
setting or tokenizer, or when the EPP's extra (grpcio, grpcio-health-checking, protobuf) is
not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from kvrouter.settings import setup_logging
from router_node.settings import RouterSettings, SettingsError, add_arguments


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = RouterSettings.load(args)
    except SettingsError as exc:
        print(f"kvrouter epp: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        from router_node.epp import EppServer
    except ImportError as exc:
        print(
            f"kvrouter epp: {exc}; install the extra: pip install 'kvrouter[epp]'",
            file=sys.stderr,
        )
        return 2
    try:
        server = EppServer(settings)
    except Exception as exc:  # TokenizerLoadError and friends: an operator problem
        from kvrouter.tokenizer.errors import TokenizerError

        if isinstance(exc, TokenizerError):
            print(f"kvrouter epp: {exc}", file=sys.stderr)
            return 2
        raise
    logging.getLogger("router_node").info("starting the endpoint picker: %r", settings)
    from router_node.cli import _event_loop

    loop = _event_loop()
    try:
        loop.run_until_complete(_serve(server))
    finally:
        loop.close()
    return 0


async def _serve(server: object) -> None:
    from router_node.epp import EppServer

    assert isinstance(server, EppServer)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # SIGTERM: readiness goes NOT_SERVING, open streams get the grace period to finish.
    await server.close(grace_s=5.0)
