"""ListenerSettings: variables, flags, engine entries, errors that name the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eviction_listener.settings import EngineSpec, ListenerSettings, SettingsError


def test_from_env_reads_every_kind_of_value() -> None:
    env = {
        "KVR_MODEL": "llama",
        "KVR_REDIS_URL": "redis://user:hunter2@redis:6379/0",
        "KVR_BLOCK_SIZE": "32",
        "KVR_ENGINES": "a=tcp://h1:5557,replay=tcp://h1:5558,dp=2; b=tcp://h2:5557,block=64",
        "KVR_RECORD_TTL_S": "600",
        "KVR_NOTICES": "false",
        "KVR_WORKER_CAPACITY_BLOCKS": "20_480",
    }
    s = ListenerSettings.from_env(env, listener_id="L1")
    assert (s.model, s.block_size, s.record_ttl_ms, s.notices) == ("llama", 32, 600_000, False)
    assert s.worker_capacity_blocks == 20480 and s.listener_id == "L1"
    a, b = s.engines
    assert a.worker_ids() == ["a", "a#dp1"]
    assert [e.endpoint for e in a.endpoints()] == ["tcp://h1:5557", "tcp://h1:5558"]
    assert [e.replay_endpoint for e in a.endpoints()] == ["tcp://h1:5558", "tcp://h1:5559"]
    assert b.block_size == 64 and b.replay_endpoint is None
    assert "hunter2" not in repr(s) and "***" in repr(s)


def test_flags_override_variables() -> None:
    s = ListenerSettings.from_env({"KVR_MODEL": "a", "KVR_BLOCK_SIZE": "8"}, block_size=None)
    assert s.block_size == 8
    assert ListenerSettings.from_env({"KVR_MODEL": "a"}, model="b").model == "b"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "KVR_MODEL"),
        ({"KVR_MODEL": "m", "KVR_BLOCK_SIZE": "sixteen"}, "KVR_BLOCK_SIZE"),
        ({"KVR_MODEL": "m", "KVR_BLOCK_SIZE": "0"}, "KVR_BLOCK_SIZE"),
        ({"KVR_MODEL": "m", "KVR_ENGINES": "nourl"}, "KVR_ENGINES"),
        ({"KVR_MODEL": "m", "KVR_ENGINES": "a=tcp://h:1,color=red"}, "KVR_ENGINES"),
        ({"KVR_MODEL": "m", "KVR_ENGINES": "a=tcp://h:1 a=tcp://h:2"}, "KVR_ENGINES"),
        ({"KVR_MODEL": "m", "KVR_ENGINES": "a=tcp://h:1,block=24"}, "KVR_ENGINES"),
        ({"KVR_MODEL": "m", "KVR_REDIS_URL": "http://x"}, "KVR_REDIS_URL"),
        ({"KVR_MODEL": "m", "KVR_DISCOVERY": "dns"}, "KVR_DISCOVERY"),
        ({"KVR_MODEL": "m", "KVR_METRICS_PORT": "70000"}, "KVR_METRICS_PORT"),
        ({"KVR_MODEL": "m", "KVR_LEASE_S": "0"}, "KVR_LEASE_S"),
        ({"KVR_MODEL": "a{b}"}, "KVR_MODEL"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        ListenerSettings.from_env(env)


def test_engine_entry_rejects_reserved_ids() -> None:
    with pytest.raises(ValueError, match="reserved"):
        EngineSpec.parse("a#dp1=tcp://h:1")


def test_cli_reports_bad_settings_and_exits_2() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kvrouter", "listen", "--model", "m", "--block-size", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 2 and "--block-size" in res.stderr
