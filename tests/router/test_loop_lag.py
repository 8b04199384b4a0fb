"""The router's event-loop lag probe: a loop blocked on purpose shows up in its metrics."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from router_node.loop_lag import LoopLagProbe
from router_node.metrics import Metrics
from tests.router.conftest import StartRouter
from tests.support.fake_worker import FakeWorker
from tests.support.metrics import parse


async def test_a_blocked_loop_is_measured() -> None:
    metrics = Metrics()
    probe = LoopLagProbe(metrics, interval_s=0.01)
    probe.start()
    await asyncio.sleep(0.05)
    assert probe.max_lag_s < 0.15  # an idle loop wakes the probe on time
    time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is the point
    await asyncio.sleep(0.05)
    await probe.close()
    assert probe.max_lag_s >= 0.15
    scrape = parse(metrics.render())
    assert scrape.value("kvrouter_event_loop_lag_max_seconds") >= 0.15
    # The blocked sample falls in a bucket above 0.1 s; idle samples below it.
    count = scrape.value("kvrouter_event_loop_lag_seconds_count")
    assert count >= 3
    assert scrape.value("kvrouter_event_loop_lag_seconds_bucket", le="0.1") < count


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LoopLagProbe(Metrics(), interval_s=0)


@pytest.mark.redis
async def test_a_router_exports_its_loop_lag(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers)
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s, s.get(router.url + "/metrics") as r:
        text = await r.text()
    scrape = parse(text)
    assert scrape.types["kvrouter_event_loop_lag_seconds"] == "histogram"
    assert scrape.value("kvrouter_event_loop_lag_seconds_count") > 0
