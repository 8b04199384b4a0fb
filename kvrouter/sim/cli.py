"""`kvrouter sim`: run simulated vLLM-compatible workers until SIGTERM or Ctrl-C.

Once every worker listens, one JSON line describing the fleet (see kvrouter.sim.fleet) goes
to stdout and, with --ready-file, to that file; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence

from kvrouter.settings import setup_logging
from kvrouter.sim.fleet import SimFleet, write_ready_file
from kvrouter.sim.settings import SettingsError, SimSettings

log = logging.getLogger("kvrouter.sim")


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Add one flag per SimSettings field; each also reads KVR_SIM_<FIELD>."""
    SimSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Start the fleet and serve until SIGTERM/SIGINT; returns the exit code."""
    try:
        settings = SimSettings.load(args)
    except SettingsError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(settings: SimSettings) -> None:
    """Run a fleet until SIGTERM or SIGINT, announcing it on stdout and the ready file."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with SimFleet(settings) as fleet:
        assert fleet.info is not None
        if settings.ready_file:
            write_ready_file(settings.ready_file, fleet.info)
        print(json.dumps(fleet.info.to_json()), flush=True)
        log.info(
            "%d workers up (%d blocks of %d tokens each, time scale %g, kv events %s)",
            settings.workers,
            settings.num_gpu_blocks,
            settings.block_size,
            settings.time_scale,
            settings.kv_events,
        )
        await stop.wait()
        log.info("shutting down")
