"""Mixed-speed fleets, the shared-prefix workload generator and offered-load scaling."""

from __future__ import annotations

import pytest

from kvrouter.sim.scheduler import step_time_s
from kvrouter.sim.settings import SettingsError, SimSettings
from kvrouter.sim.worker import engine_config


def test_a_speed_mix_repeats_over_the_workers() -> None:
    s = SimSettings(workers=4, speed_mix="2,1")
    assert [s.speed_of(i) for i in range(4)] == [2.0, 1.0, 2.0, 1.0]
    assert SimSettings().speed_of(3) == 1.0
    fast, slow = engine_config(s, s.speed_of(0)), engine_config(s, s.speed_of(1))
    assert fast.prefill_tokens_per_s == 2 * slow.prefill_tokens_per_s == 32_000
    # A faster GPU is faster at everything: the same step takes half the time.
    assert step_time_s(fast, 8, 4096) == pytest.approx(step_time_s(slow, 8, 4096) / 2)


@pytest.mark.parametrize("mix", ["2,x", "1,0", "-1"])
def test_a_bad_speed_mix_names_its_flag(mix: str) -> None:
    with pytest.raises(SettingsError, match="--speed-mix / KVR_SIM_SPEED_MIX"):
        SimSettings(speed_mix=mix)
