"""`kvrouter listen`: the eviction listener. Every flag is also a ``KVR_*`` variable."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eviction_listener.settings import ListenerSettings, SettingsError
from kvrouter.settings import setup_logging


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    ListenerSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = ListenerSettings.load(args)
    except SettingsError as exc:
        print(f"kvrouter listen: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from eviction_listener.service import run_listener
    from kvrouter.discovery.kubernetes import DiscoveryError

    try:
        return run_listener(settings)
    except DiscoveryError as exc:  # e.g. kubernetes discovery outside a pod: an operator problem
        print(f"kvrouter listen: error: {exc}", file=sys.stderr)
        return 2
