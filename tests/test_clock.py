"""ServerClock against a real Redis: replies read late (a stalled event loop, a GC pause) do not
skew the offset, so two clocks of one server agree to well under the feedback's cut margin."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvrouter.index.clock import (
    CLOCK_REFRESH_S,
    CLOCK_RETRIES,
    CLOCK_RETRY_S,
    CLOCK_SAMPLES,
    CLOCK_TIGHT_US,
    ServerClock,
)


class LateReader:
    """A real client whose TIME replies are read `stall_s` late for the next `stalls` calls
    (the reply has arrived; the caller's loop gets to it late), the server's answer shifted
    by `shift_us` (a server clock stepped since)."""

    def __init__(self, client: Any, stalls: int = 0, stall_s: float = 0.2) -> None:
        self.client = client
        self.stalls = stalls
        self.stall_s = stall_s
        self.shift_us = 0
        self.calls = 0

    async def time(self) -> tuple[int, int]:
        self.calls += 1
        reply = await self.client.time()
        if isinstance(reply, dict):
            reply = next(iter(reply.values()))
        if self.stalls:
            self.stalls -= 1
            await asyncio.sleep(self.stall_s)
        us = int(reply[0]) * 1_000_000 + int(reply[1]) + self.shift_us
        return us // 1_000_000, us % 1_000_000


async def skew_us(a: ServerClock, b: ServerClock) -> int:
    """How far `a` reads ahead of `b` (both already sampled: no round trip here)."""
    return await a.now_us() - await b.now_us()


async def test_a_reply_read_late_at_first_use_does_not_skew_the_clock(any_client: Any) -> None:
    """The first TIME reply is read 200 ms late: one sample would put this clock 100 ms
    behind the server's (what made the feedback cut reach a record written 50 ms after its
    witness). The fastest of the first samples sets the offset."""
    late = LateReader(any_client, stalls=1)
    prompt = LateReader(any_client)
    clock, reference = ServerClock(late), ServerClock(prompt)
    await clock.now_us()
    await reference.now_us()
    assert late.calls == CLOCK_SAMPLES
    assert abs(await skew_us(clock, reference)) < 20_000
    assert clock.error_us() < 20_000


async def sampled(client: Any) -> tuple[LateReader, ServerClock, ServerClock]:
    """A clock on a LateReader and a reference clock, both past their first samples."""
    late = LateReader(client)
    clock, reference = ServerClock(late), ServerClock(LateReader(client))
    await clock.now_us()
    await reference.now_us()
    clock._checked -= CLOCK_REFRESH_S + 1  # its next read refreshes
    return late, clock, reference


async def test_a_late_refresh_keeps_the_tighter_estimate(any_client: Any) -> None:
    """A refresh whose reply is read late does not replace the estimate it would skew."""
    late, clock, reference = await sampled(any_client)
    late.stalls = 1
    await clock.now_us()
    assert late.calls == CLOCK_SAMPLES + 1
    assert abs(await skew_us(clock, reference)) < 20_000


async def test_a_prompt_refresh_follows_a_server_clock_that_moved(any_client: Any) -> None:
    """An estimate's bound grows with its age; a refresh taken promptly replaces an old one,
    so a server clock that stepped (or drifted) is followed."""
    late, clock, reference = await sampled(any_client)
    late.shift_us = 5_000_000
    clock._sampled -= 1000.0  # an estimate 1,000 s old: its bound is 100 ms
    await clock.now_us()
    assert abs(await skew_us(clock, reference) - 5_000_000) < 20_000


@pytest.mark.parametrize("stall_s", [0.05, 0.2])
async def test_the_error_bound_holds(any_client: Any, stall_s: float) -> None:
    """Whatever the stalls, the offset is within its stated bound of a prompt clock's."""
    clock = ServerClock(LateReader(any_client, stalls=CLOCK_SAMPLES, stall_s=stall_s))
    reference = ServerClock(LateReader(any_client))
    await clock.now_us()
    await reference.now_us()
    bound = clock.error_us() + reference.error_us()
    assert bound >= stall_s * 500_000  # every sample was late: the bound says so
    assert abs(await skew_us(clock, reference)) <= bound + 1_000


class SlowToSend:
    """A real client whose next `slow` TIME calls are sent `delay_s` late (a connection being
    opened: connect and handshake before the command goes out)."""

    def __init__(self, client: Any, slow: int, delay_s: float) -> None:
        self.client = client
        self.slow = slow
        self.delay_s = delay_s
        self.calls = 0

    async def time(self) -> Any:
        self.calls += 1
        if self.slow:
            self.slow -= 1
            await asyncio.sleep(self.delay_s)
        return await self.client.time()


async def test_first_samples_on_opening_connections_are_replaced_a_second_later(
    any_client: Any,
) -> None:
    """Every first sample waits 40 ms before TIME goes out (the connections are being opened):
    the estimate reads about 20 ms ahead, within its bound. It is read again after
    CLOCK_RETRY_S, not CLOCK_REFRESH_S, and the warm round trip replaces it."""
    slow = SlowToSend(any_client, CLOCK_SAMPLES, 0.04)
    clock, reference = ServerClock(slow), ServerClock(LateReader(any_client))
    await clock.now_us()
    await reference.now_us()
    loose = clock.error_us()
    assert loose >= 20_000 > CLOCK_TIGHT_US
    assert abs(await skew_us(clock, reference)) <= loose + reference.error_us() + 1_000
    clock._checked -= CLOCK_RETRY_S + 0.1
    await clock.now_us()
    assert slow.calls == CLOCK_SAMPLES + 1
    assert clock.error_us() < loose
    assert abs(await skew_us(clock, reference)) <= clock.error_us() + reference.error_us() + 1_000


async def test_a_loose_estimate_is_reread_a_bounded_number_of_times(any_client: Any) -> None:
    """On a network whose round trips are all slow no reread gets tighter; the quick rereads
    stop after CLOCK_RETRIES (each makes its caller wait a round trip), then the full refresh."""
    slow = SlowToSend(any_client, 10**6, 0.004)
    clock = ServerClock(slow)
    await clock.now_us()
    for _ in range(CLOCK_RETRIES + 2):
        clock._checked -= CLOCK_RETRY_S + 0.1
        await clock.now_us()
    assert slow.calls == CLOCK_SAMPLES + CLOCK_RETRIES
    clock._checked -= CLOCK_REFRESH_S + 0.1
    await clock.now_us()
    assert slow.calls == CLOCK_SAMPLES + CLOCK_RETRIES + 1


class Failing:
    """A real client whose next `failures` TIME calls fail as a dropped connection would."""

    def __init__(self, client: Any, failures: int) -> None:
        self.client = client
        self.failures = failures

    async def time(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection dropped")
        return await self.client.time()


async def test_a_first_use_needs_one_sample_of_its_three(any_client: Any) -> None:
    """One failed sample of the first three is not an error; all three failed is Redis's
    error, as the caller (which marks Redis down) expects."""
    clock, reference = ServerClock(Failing(any_client, 2)), ServerClock(any_client)
    await clock.now_us()
    await reference.now_us()
    assert abs(await skew_us(clock, reference)) < 20_000
    down = ServerClock(Failing(any_client, CLOCK_SAMPLES))
    with pytest.raises(ConnectionError):
        await down.now_us()
    await down.now_us()  # Redis is back: the next call samples again
    assert down.error_us() < 20_000
