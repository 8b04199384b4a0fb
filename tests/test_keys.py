"""The key schema: names, validation, and one Cluster slot per model."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from kvrouter.index.keys import KeyNameError, KeySchema, validate_worker_id


def test_model_keys_share_one_slot() -> None:
    k = KeySchema().model("meta-llama/Llama-3.1-8B-Instruct")
    names = [
        k.worker("10.0.0.5:8000"),
        k.cut("w"),
        k.engine_map("w"),
        k.head("00ff"),
        k.workers,
        k.load,
        k.leases,
        k.meta,
        k.worker_prefix,
        k.cut_prefix,
        k.head_prefix,
    ]
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert all(n.startswith("kvr:{meta-llama/Llama-3.1-8B-Instruct}:") for n in names)


def test_documented_names() -> None:
    s = KeySchema()
    k = s.model("m")
    assert k.worker("w1") == "kvr:{m}:wrk:w1"
    assert k.cut("w1") == "kvr:{m}:cut:w1"
    assert k.head("0123456789abcdef") == "kvr:{m}:head:0123456789abcdef"
    assert k.engine_map("w1#dp1") == "kvr:{m}:emap:w1#dp1"
    assert (
        k.load == "kvr:{m}:load" and k.leases == "kvr:{m}:lease" and k.workers == "kvr:{m}:workers"
    )
    assert k.notices == "kvr:{m}:notices" and k.meta == "kvr:{m}:meta"
    assert s.registry == "kvr:registry" and s.heartbeats == "kvr:heartbeat"
    assert s.listener_owner("w1") == "kvr:listener:owner:w1"
    assert KeySchema("tenant7").model("m").worker("w") == "tenant7:{m}:wrk:w"


@pytest.mark.parametrize("bad", ["", "a b", "a|b", "a\nb", "x" * 300, "tab\tbed", "\x00"])
def test_bad_worker_ids(bad: str) -> None:
    with pytest.raises(KeyNameError):
        validate_worker_id(bad)


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "line\nbreak", "x" * 300])
def test_bad_models(bad: str) -> None:
    with pytest.raises(KeyNameError):
        KeySchema().model(bad)


@pytest.mark.parametrize("bad", ["", "a:b", "{x}", "has space", "é"])
def test_bad_prefix(bad: str) -> None:
    with pytest.raises(KeyNameError):
        KeySchema(bad)
