"""Settings: environment, flags (which win), validation naming the variable, redaction, and
the README table kept in step with the dataclass."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from router_node.settings import (
    RouterSettings,
    SettingsError,
    WorkerSpec,
    add_arguments,
    settings_table_rows,
)

SETTINGS_DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def parse_flags(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_from_env() -> None:
    s = RouterSettings.from_env(
        {
            "KVR_MODEL": "llama, llama-lora",
            "KVR_WORKERS": "http://10.0.0.1:8000, w2=http://vllm-2:8000#dp1",
            "KVR_PORT": "9000",
            "KVR_KV_EVENTS": "true",
            "KVR_PREFILL_WEIGHT": "0.5",
            "KVR_POLICY": "least_load",
        }
    )
    assert s.models == ("llama", "llama-lora")
    assert s.workers == (
        WorkerSpec("10.0.0.1:8000", "http://10.0.0.1:8000"),
        WorkerSpec("w2", "http://vllm-2:8000", 1),
    )
    assert (s.port, s.kv_events, s.prefill_weight, s.policy) == (9000, True, 0.5, "least_load")
    assert s.speculative_ttl_ms == 30_000  # events confirm residency: short speculative life
    assert RouterSettings(models=("m",)).speculative_ttl_ms == 600_000  # no events: the horizon


def test_flags_win_over_env() -> None:
    args = parse_flags(["--port", "7000", "--worker", "http://a:1", "--worker", "b=http://b:2"])
    s = RouterSettings.load(
        args, {"KVR_PORT": "9000", "KVR_MODEL": "m", "KVR_WORKERS": "http://c:3"}
    )
    assert s.port == 7000
    assert [w.id for w in s.workers] == ["a:1", "b"]
    assert s.models == ("m",)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KVR_PORT": "eighty"}, "KVR_PORT"),
        ({"KVR_PORT": "70000"}, "KVR_PORT / --port"),
        ({"KVR_POLICY": "fastest"}, "KVR_POLICY / --policy"),
        ({"KVR_BLOCK_SIZE": "0"}, "KVR_BLOCK_SIZE / --block-size"),
        ({"KVR_WORKERS": "ftp://x"}, "KVR_WORKERS"),
        ({"KVR_WORKERS": "http://a:1,http://a:1"}, "KVR_WORKERS / --worker"),
        ({"KVR_KV_EVENTS": "maybe"}, "KVR_KV_EVENTS"),
        ({"KVR_BALANCE_REL": "0.5"}, "KVR_BALANCE_REL / --balance-rel"),
        ({"KVR_KEY_PREFIX": "a:b"}, "KVR_KEY_PREFIX / --key-prefix"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(named)):
        RouterSettings.from_env({"KVR_MODEL": "m", **env})


def test_model_is_required_and_flag_errors_name_the_flag() -> None:
    with pytest.raises(SettingsError, match="KVR_MODEL / --model"):
        RouterSettings.from_env({})
    with pytest.raises(SettingsError, match="--port"):
        RouterSettings.load(parse_flags(["--port", "x", "--model", "m"]), {})


def test_secrets_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    s = RouterSettings.from_env(
        {
            "KVR_MODEL": "m",
            "KVR_ADMIN_TOKEN": "tok-123456",
            "KVR_REDIS_URL": "redis://user:hunter2@redis:6379/0",
        }
    )
    text = repr(s) + str(s)
    assert "tok-123456" not in text and "hunter2" not in text
    assert "admin_token='***'" in text and "user:***@redis" in text
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings %r", s)
    assert "hunter2" not in caplog.text
    with pytest.raises(SettingsError) as e:
        RouterSettings.from_env({"KVR_MODEL": "m", "KVR_REDIS_URL": "hunter2-no-scheme"})
    assert "KVR_REDIS_URL" in str(e.value)


def test_worker_spec_forms() -> None:
    assert WorkerSpec.parse("http://h:8000/") == WorkerSpec("h:8000", "http://h:8000")
    assert WorkerSpec.parse("https://h") == WorkerSpec("h:443", "https://h")
    assert WorkerSpec.parse("http://h:8000#dp3") == WorkerSpec("h:8000#dp3", "http://h:8000", 3)
    assert WorkerSpec.parse("http://h:8000#dp0") == WorkerSpec("h:8000", "http://h:8000", 0)
    assert WorkerSpec.parse("pod-1=http://10.1.2.3:8000").id == "pod-1"
    for bad in ("h:8000", "http://h:8000/v1", "bad id=http://h:1", "http://h:1#dpx"):
        with pytest.raises(ValueError):
            WorkerSpec.parse(bad)


def test_every_setting_has_a_flag_and_a_field() -> None:
    # model_configs is the config file's [[models]]: it has no variable of its own.
    fields = set(RouterSettings.model_fields) - {"model_configs"}
    assert set(RouterSettings.settable()) == fields
    assert all(
        RouterSettings.env_name(f).startswith("KVR_")
        and RouterSettings.flag_name(f).startswith("--")
        for f in fields
    )


def test_docs_table_matches_the_schema() -> None:
    text = SETTINGS_DOC.read_text(encoding="utf-8")
    # The shared section and the router's own: the listener's and the simulator's follow.
    start = text.index("## Shared by the router and the listener")
    end = text.index("## The listener only")
    text = text[start:end]
    rows = re.findall(r"^\| `(KVR_[A-Z0-9_]+)` \| `(--[a-z0-9-]+)` \| ([^|]*) \|", text, re.M)
    documented = {(env, flag, default.strip().strip("`")) for env, flag, default in rows}
    expected = {(env, flag, default) for env, flag, default, _ in settings_table_rows()}
    assert documented == expected
