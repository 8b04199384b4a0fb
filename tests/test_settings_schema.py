"""The one settings schema: docs generated from it, shared fields defined once, bad input that
stops each process at start with a message naming the variable, the value and what is allowed."""

from __future__ import annotations

import difflib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eviction_listener.settings import ListenerSettings
from kvrouter.register import RegisterSettings
from kvrouter.settings import TYPO_CUTOFF, SettingsError, SharedSettings
from kvrouter.settings_doc import render
from kvrouter.sim.settings import SimSettings
from router_node.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = (RouterSettings, ListenerSettings, SimSettings, RegisterSettings)


def test_docs_settings_md_is_generated_from_the_schema() -> None:
    committed = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/settings.md is stale: run `make settings-doc`"
    assert "docs/settings.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_shared_fields_are_the_same_in_router_and_listener() -> None:
    for name, info in SharedSettings.model_fields.items():
        for cls in (RouterSettings, ListenerSettings):
            own = cls.model_fields[name]
            assert (own.default, own.annotation) == (info.default, info.annotation), name
            assert cls.env_name(name) == SharedSettings.env_name(name)
    # The defaults the issue found disagreeing now agree by construction.
    assert RouterSettings(models=("m",)).record_ttl_s == ListenerSettings(model="m").record_ttl_s


def test_no_name_of_one_process_looks_like_a_typo_of_anothers() -> None:
    # Otherwise a ConfigMap shared by both processes would stop one of them.
    names = {cls: {cls.env_name(n) for n in cls.settable()} for cls in PROCESSES}
    for a, b in itertools.permutations(PROCESSES, 2):
        for var in names[a] - names[b]:
            if var.startswith(b.prefix()):
                close = difflib.get_close_matches(var, names[b], cutoff=TYPO_CUTOFF)
                assert not close, (a.__name__, var, b.__name__, close)


@pytest.mark.parametrize(
    ("cls", "env", "expected"),
    [
        (ListenerSettings, {"KVR_REDIS_PASWORD": "pw"}, "did you mean KVR_REDIS_PASSWORD"),
        (RouterSettings, {"KVR_BLOCKSIZE": "16"}, "did you mean KVR_BLOCK_SIZE"),
        (SimSettings, {"KVR_SIM_WORKER": "2"}, "did you mean KVR_SIM_WORKERS"),
        (RouterSettings, {"KVR_PORT": "80.5"}, "KVR_PORT / --port: invalid value '80.5'"),
        (ListenerSettings, {"KVR_NOTICES": "maybe"}, "expected true or false"),
        (RouterSettings, {"KVR_LOG_LEVEL": "loud"}, "'debug', 'info', 'warning' or 'error'"),
        (RouterSettings, {"KVR_DISCOVERY": "dns"}, "'static', 'redis' or 'kubernetes'"),
        (ListenerSettings, {"KVR_MODEL": "a,b"}, "exactly one model name"),
        (RouterSettings, {"KVR_RECORD_TTL_S": "0"}, "greater than 0"),
    ],
)
def test_bad_input_names_variable_value_and_what_is_allowed(
    cls: type[SharedSettings] | type[SimSettings], env: dict[str, str], expected: str
) -> None:
    base = {} if cls is SimSettings else {"KVR_MODEL": "m"}
    with pytest.raises(SettingsError, match=expected):
        cls.from_env({**base, **env})


def test_unrelated_kvr_variables_and_other_tools_prefixes_are_ignored() -> None:
    env = {"KVR_MODEL": "m", "KVR_TEST_REDIS": "process", "KVR_SIM_WORKERS": "2", "KVR_X": "1"}
    assert RouterSettings.from_env(env).models == ("m",)
    # A router-only variable in the listener's environment (one ConfigMap for both).
    assert ListenerSettings.from_env({**env, "KVR_POLICY": "kv"}).model == "m"


def test_empty_variables_are_empty_text_or_unset() -> None:
    s = RouterSettings.from_env(
        {"KVR_MODEL": "m", "KVR_REDIS_URL": "", "KVR_PORT": "", "KVR_KV_EVENTS": ""}
    )
    assert (s.redis_url, s.port, s.kv_events) == ("", 8000, False)


def test_secrets_are_hidden_in_repr_errors_and_summary() -> None:
    s = ListenerSettings.from_env(
        {"KVR_MODEL": "m", "KVR_REDIS_PASSWORD": "pa ss/word", "KVR_REDIS_URL": "redis://r:1/0"}
    )
    assert "pa ss/word" not in repr(s) and "redis_password='***'" in repr(s)
    assert s.redis_connect_url == "redis://:pa%20ss%2Fword@r:1/0"
    assert "pa ss/word" not in str(ListenerSettings.from_env({"KVR_MODEL": "m"}).summary())
    with pytest.raises(SettingsError) as exc:
        RouterSettings.from_env({"KVR_MODEL": "m", "KVR_ADMIN_TOKENS": "tok-secret"})
    assert "tok-secret" not in str(exc.value) and "KVR_ADMIN_TOKEN" in str(exc.value)


@pytest.mark.parametrize(
    ("command", "env", "named"),
    [
        (["serve"], {"KVR_MODEL": "m", "KVR_POLICY": "fastest"}, "KVR_POLICY / --policy"),
        (["listen"], {"KVR_MODEL": "m", "KVR_REDIS_PASWORD": "x"}, "KVR_REDIS_PASSWORD"),
        (["listen"], {"KVR_MODEL": "m", "KVR_BLOCK_SIZE": "sixteen"}, "'sixteen'"),
        (["sim"], {"KVR_SIM_KV_EVENTS": "json"}, "'off', 'positional' or 'map'"),
    ],
)
def test_processes_stop_at_start_with_status_2_and_no_traceback(
    command: list[str], env: dict[str, str], named: str
) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kvrouter", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
    )
    assert res.returncode == 2, res.stderr
    assert named in res.stderr and "Traceback" not in res.stderr, res.stderr
