"""The shared backoff: doubling, the cap, reset, jitter bounds, bad arguments."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvrouter.backoff import Backoff


def test_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.1, 0.5)
    assert [b.delay() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    b.reset()
    assert b.delay() == pytest.approx(0.1)


@given(
    initial=st.floats(1e-3, 10.0),
    factor=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**32),
)
def test_jitter_stays_within_half_to_full(initial: float, factor: float, seed: int) -> None:
    plain = Backoff(initial, initial * factor)
    jittered = Backoff(initial, initial * factor, jitter=True, rng=random.Random(seed))
    for _ in range(12):
        d, j = plain.delay(), jittered.delay()
        assert d <= initial * factor * (1 + 1e-12)
        assert d / 2 <= j <= d


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_rejects_bad_bounds(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial, maximum)


async def test_sleep_takes_one_step() -> None:
    b = Backoff(0.001, 0.004)
    await b.sleep()
    await b.sleep()
    assert b.delay() == pytest.approx(0.004)  # 0.001 and 0.002 were slept
