"""`kvrouter register`: a worker's sidecar for registry discovery (``KVR_DISCOVERY=redis``).

Registers the worker in the Redis registry that routers (and listeners) read, re-registers
every ``KVR_REGISTER_HEARTBEAT_S`` (registering is idempotent and is the heartbeat, so a Redis
that restarted empty relearns the worker), and deregisters on SIGTERM or SIGINT, so routers
stop sending to a pod that is going away before its heartbeat would age out. Nothing here
needs Python in the worker's image: run this image as a second container of the vLLM pod
(see docs/kubernetes.md).

With ``KVR_REGISTER_RELAY_RESTARTS`` it also relays the one eviction every worker has, with or
without KV events: an engine restart empties its whole KV cache. The sidecar probes the
worker's health endpoint at each heartbeat; when it answers again after failing
``KVR_REGISTER_DOWN_AFTER`` probes in a row (a restart, or the first start of the pod), it
publishes a ``clear`` notice per model, so the listener forgets the worker's records at once
instead of letting routers send its old prefixes there until the records' TTL. Evictions of
single blocks need the engine's KV events (the listener reads them over ZMQ).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import model_validator

from kvrouter.index.connection import connect
from kvrouter.settings import Bool, Int, SettingsError, SharedSettings, setting, setup_logging

log = logging.getLogger("kvrouter.register")


class RegisterSettings(SharedSettings):
    """The shared settings (Redis, key prefix, models, block size) plus the worker's own."""

    COMMAND: ClassVar[str] = "kvrouter register"

    register_url: str = setting(
        "", "the worker's HTTP URL as routers reach it, e.g. http://$(POD_IP):8000 (required)"
    )
    register_id: str = setting(
        "", "worker id ('' = host:port of the URL, as routers name static workers)"
    )
    register_capacity_blocks: Int = setting(
        0, "the worker's KV capacity in blocks (0 = unknown: routers scrape it)", ge=0
    )
    register_events: str = setting(
        "", "the worker's ZMQ KV-event endpoint (tcp://HOST:PORT) for listeners ('' = none)"
    )
    register_replay: str = setting("", "the worker's ZMQ replay endpoint ('' = none)")
    register_heartbeat_s: float = setting(
        5.0, "seconds between two registrations (the heartbeat)", gt=0
    )
    register_relay_restarts: Bool = setting(
        False,
        "probe the worker's health at each heartbeat and publish a clear notice when it "
        "comes back after failing (an engine restart empties its KV cache)",
    )
    register_health_path: str = setting(
        "/health", "path of the worker's health endpoint (200 = up), for the restart relay"
    )
    register_down_after: Int = setting(
        2, "failed health probes in a row that count as the worker down (restart relay)", ge=1
    )
    register_own_channel: Bool = setting(
        False,
        "publish notices on the worker's own channel (what a per-worker Redis ACL user may do)",
    )

    @model_validator(mode="after")
    def _across_fields(self) -> RegisterSettings:
        if not self.register_url:
            raise ValueError(f"{self.names('register_url')}: required: the worker's HTTP URL")
        if not self.redis_url:
            raise ValueError(f"{self.names('redis_url')}: the registry lives in Redis")
        if self.register_relay_restarts and not self.models:
            raise ValueError(f"{self.names('models')}: the restart relay publishes per model")
        if not self.register_health_path.startswith("/"):
            raise ValueError(f"{self.names('register_health_path')}: must start with '/'")
        for name in ("register_events", "register_replay"):
            value = getattr(self, name)
            if value and "://" not in value:
                raise ValueError(f"{self.names(name)}: not a ZMQ address (tcp://HOST:PORT)")
        return self

    @property
    def worker_id(self) -> str:
        if self.register_id:
            return self.register_id
        parts = urlsplit(self.register_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"

    def kv_events(self) -> dict[str, Any] | None:
        if not self.register_events:
            return None
        return {
            "endpoint": self.register_events,
            "replay": self.register_replay or None,
            "block_size": self.block_size,
        }


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    RegisterSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Register until SIGTERM/SIGINT, then deregister; 2 for bad settings."""
    try:
        settings = RegisterSettings.load(args)
        # The registry's own URL and id rules (as for static workers), checked at start.
        from router_node.settings import WorkerSpec

        WorkerSpec.parse(f"{settings.worker_id}={settings.register_url}")
    except (SettingsError, ValueError) as exc:
        print(f"kvrouter register: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    return asyncio.run(serve(settings))


class RestartRelay:
    """Turns the worker's health probes into ``clear`` notices: one when the worker answers
    again after ``down_after`` failed probes in a row. A worker already up when the sidecar
    starts is not cleared (the sidecar alone may have restarted; the engine kept its cache);
    one that was never up yet (the pod is starting) is, since its id may have served before
    (a StatefulSet's pod names survive restarts)."""

    def __init__(self, settings: RegisterSettings, client: Any) -> None:
        self.settings = settings
        self.client = client
        self.url = settings.register_url.rstrip("/") + settings.register_health_path
        self.failures = 0
        self.seen_up = False
        self.clears = 0

    async def probe(self, session: Any) -> bool:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=min(self.settings.register_heartbeat_s, 5.0))
        try:
            async with session.get(self.url, timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def step(self, session: Any) -> None:
        """One probe; publishes the clear notices when the worker came back."""
        from eviction_listener.notices import publish_notice

        if not await self.probe(session):
            self.failures += 1
            if self.failures == self.settings.register_down_after:
                log.warning("worker %s is down (%d failed probes)", self.settings.worker_id,
                            self.failures)  # fmt: skip
            return
        came_back = self.failures >= self.settings.register_down_after or (
            not self.seen_up and self.failures > 0
        )
        self.failures = 0
        self.seen_up = True
        if not came_back:
            return
        s = self.settings
        for model in s.models:
            try:
                await publish_notice(
                    self.client, model, "clear", s.worker_id, prefix=s.key_prefix,
                    own_channel=s.register_own_channel,
                )  # fmt: skip
            except Exception as exc:  # Redis away: the records' TTL stays the bound
                log.warning("clear notice for %s (%s) not sent: %s", s.worker_id, model, exc)
                continue
            self.clears += 1
            log.info("worker %s is up again: cleared its records of %s", s.worker_id, model)


async def serve(settings: RegisterSettings) -> int:
    """The registration loop; returns the exit code."""
    import aiohttp

    from router_node.registry import deregister_worker, register_worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    client = connect(settings.redis_connect_url)
    schema = settings.key_schema
    wid = settings.worker_id
    registered = False
    relay = RestartRelay(settings, client) if settings.register_relay_restarts else None
    session = aiohttp.ClientSession()
    try:
        while not stop.is_set():
            if relay is not None:
                await relay.step(session)
            try:
                await register_worker(
                    client,
                    schema,
                    wid,
                    settings.register_url,
                    models=settings.models,
                    capacity_blocks=settings.register_capacity_blocks,
                    kv_events=settings.kv_events(),
                )
                if not registered:
                    log.info("registered %s (%s)", wid, settings.register_url)
                registered = True
            except Exception as exc:  # Redis away: keep trying, the routers keep the rest
                log.warning("registering %s failed: %s", wid, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.register_heartbeat_s)
        try:
            await deregister_worker(client, schema, wid)
            log.info("deregistered %s", wid)
        except Exception as exc:
            log.warning("deregistering %s failed: %s (its heartbeat will age out)", wid, exc)
    finally:
        await session.close()
        await client.aclose()
    return 0
