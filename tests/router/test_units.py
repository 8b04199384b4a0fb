"""Units without servers: the circuit breaker, registry sync, request parsing and tokenizing,
the vLLM metrics parser, the Prometheus text, and the CLI's handling of bad settings."""

from __future__ import annotations

from typing import Any

import pytest

from kvrouter.cli import main
from kvrouter.tokenizer import Tokenizer
from router_node.errors import APIError
from router_node.metrics import Metrics
from router_node.monitor import parse_vllm_cache_config
from router_node.request import CHAT, COMPLETIONS, parse_request, tokenize
from router_node.settings import RouterSettings, WorkerSpec
from router_node.workers import WorkerPool
from tests.support.metrics import parse

S = RouterSettings(
    models=("m",),
    workers=(WorkerSpec.parse("http://a:1"), WorkerSpec.parse("http://b:1#dp2")),
    eject_failures=2,
    eject_s=10,
    eject_max_s=25,
    clear_grace_s=30,
)


def test_circuit_breaker_trips_doubles_and_half_opens() -> None:
    pool = WorkerPool(S)
    a = pool.workers["a:1"]
    assert not pool.record_failure(a, now=0)
    assert pool.record_failure(a, now=1)  # second consecutive failure: open
    assert not a.available(5) and a.state(5) == "ejected"
    assert [w.id for w in pool.candidates("m", 5)] == ["b:1#dp2"]
    assert a.available(11) and a.state(11) == "half_open"
    assert pool.record_failure(a, now=12)  # half-open: one failure trips again, for 20 s
    assert not a.available(31) and a.available(32.5)
    assert pool.record_failure(a, now=40)  # capped at eject_max_s
    assert a.ejected_until == 65
    pool.record_success(a)
    assert a.state(70) == "up" and a.trips == 0
    assert not pool.record_failure(a, now=71)  # closed again: needs two failures


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    """An engine restart fails every request it runs at once: the first two open the circuit
    (10 s); the other ten were sent before it opened and count nothing, so the worker is back
    (half-open) after 10 s, not after eject_max_s."""
    pool = WorkerPool(S)
    a = pool.workers["a:1"]
    tripped = [pool.record_failure(a, now=1 + i / 1000) for i in range(12)]
    assert tripped == [False, True] + [False] * 10
    assert a.ejected_until == 1.001 + 10 and a.trips == 1
    assert a.state(11.5) == "half_open"
    assert pool.record_failure(a, now=12)  # half-open: a new failure trips again, for 20 s
    assert a.ejected_until == 32


def test_outage_clock_and_clearing_once() -> None:
    pool = WorkerPool(S)
    a = pool.workers["a:1"]
    pool.record_check(a, ok=False)
    assert pool.due_for_clearing(100) == []
    assert pool.due_for_clearing(129) == []
    assert pool.due_for_clearing(130) == [a]
    a.cleared = True
    assert pool.due_for_clearing(200) == []
    pool.record_check(a, ok=True)
    assert pool.due_for_clearing(201) == [] and a.down_since is None and not a.cleared


def test_dp_rank_header_and_registry_sync() -> None:
    pool = WorkerPool(S)
    assert pool.workers["b:1#dp2"].headers == {"X-data-parallel-rank": "2"}
    assert pool.workers["a:1"].headers == {}
    pool.sync_registry([("r1", "http://r:1", ("m",), 0, None), ("a:1", "http://x:1", (), 0, 0)])
    assert pool.workers["a:1"].url == "http://a:1"  # a static worker wins
    assert pool.workers["r1"].source == "registry"
    assert [w.id for w in pool.candidates("other", 0)] == ["a:1", "b:1#dp2"]  # r1 serves m only
    pool.sync_registry([])
    assert pool.workers["r1"].state(0) == "deregistered"
    pool.forget("r1")
    assert "r1" not in pool.workers


def test_vllm_cache_config_parser() -> None:
    text = (
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",'
        'num_gpu_blocks="27066",prefix_caching_hash_algo="sha256"} 1.0\n'
    )
    assert parse_vllm_cache_config(text) == (27066, 16)
    assert parse_vllm_cache_config("vllm:num_requests_running 0\n") is None
    assert parse_vllm_cache_config('vllm:cache_config_info{block_size="16"} 1\n') is None


def _req(endpoint: str, body: dict[str, Any], **headers: str) -> Any:
    return parse_request(endpoint, body, headers, S)


def test_parse_request_fields_and_session() -> None:
    r = _req(COMPLETIONS, {"model": "m", "prompt": "x", "user": "u1", "cache_salt": "s"})
    assert (r.session_key, r.cache_salt, r.stream) == ("u1", "s", False)
    r = _req(CHAT, {"model": "m", "messages": [{"role": "user"}]}, **{"x-session-id": "h"})
    assert r.session_key == "h"
    bad = [
        (COMPLETIONS, {"prompt": "x"}, 400, "model"),
        (COMPLETIONS, {"model": "zz", "prompt": "x"}, 404, "model"),
        (COMPLETIONS, {"model": "m", "prompt": []}, 400, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": ["a", 1]}, 400, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": 5}, 400, "prompt"),
        (CHAT, {"model": "m", "messages": [{"content": "no role"}]}, 400, "messages"),
        (CHAT, {"model": "m", "messages": [{"role": "user"}], "cache_salt": 1}, 400, "cache_salt"),
    ]
    for endpoint, body, status, param in bad:
        with pytest.raises(APIError) as e:
            _req(endpoint, body)
        assert (e.value.status, e.value.param) == (status, param), body


def test_tokenize_paths(tokenizer: Tokenizer) -> None:
    r = _req(COMPLETIONS, {"model": "m", "prompt": [[1, 2, 3], [4, 5]]})
    tokenize(r, tokenizer, S)
    assert (r.token_ids, r.prompt_tokens) == ([1, 2, 3], 5)  # a batch: routed on the first

    r = _req(COMPLETIONS, {"model": "m", "prompt": "hello world"})
    tokenize(r, tokenizer, S)
    assert r.token_ids == tokenizer.encode_prompt("hello world")

    r = _req(COMPLETIONS, {"model": "m", "prompt": "hello", "add_special_tokens": False})
    tokenize(r, tokenizer, S)
    assert r.token_ids == tokenizer.encode_prompt("hello", add_special_tokens=False)

    msgs = [{"role": "user", "content": "what is the weather"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    r = _req(CHAT, {"model": "m", "messages": msgs, "tools": tools})
    tokenize(r, tokenizer, S)
    assert r.token_ids == tokenizer.encode_chat(msgs, tools=tools)
    assert r.token_ids != tokenizer.encode_chat(msgs)

    r = _req(CHAT, {"model": "m", "messages": msgs, "add_generation_prompt": False})
    tokenize(r, tokenizer, S)
    assert r.token_ids == tokenizer.encode_chat(msgs, add_generation_prompt=False)

    r = _req(CHAT, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    with pytest.raises(APIError) as e:
        tokenize(r, tokenizer, S)
    assert e.value.status == 400 and e.value.param == "messages"


def test_tokenize_without_a_tokenizer() -> None:
    r = _req(COMPLETIONS, {"model": "m", "prompt": [5, 6, 7]})
    tokenize(r, None, S)
    assert r.token_ids == [5, 6, 7]
    r = _req(COMPLETIONS, {"model": "m", "prompt": [5, "a"]})
    with pytest.raises(APIError, match="integers"):
        tokenize(r, None, S)
    r = _req(COMPLETIONS, {"model": "m", "prompt": [5, -1]})
    with pytest.raises(APIError, match="2\\*\\*32"):
        tokenize(r, None, S)
    r = _req(COMPLETIONS, {"model": "m", "prompt": "text"})
    tokenize(r, None, S)
    assert r.token_ids is None  # routed on load alone
    r = _req(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    tokenize(r, None, S)
    assert r.token_ids is None


def test_prometheus_text() -> None:
    m = Metrics()
    m.requests.labels("completions", "200", 'x"y\n').inc()
    for v in (0, 20, 5000):
        m.matched_tokens.labels("m").observe(v)
    m.matched_tokens_total.inc("m", 5020)
    m.tokenizer_cache.source = lambda: [("hits", 3.0)]
    other = Metrics()  # one registry per app: a second one starts from zero
    text = m.render()
    s = parse(text)
    assert s.value("kvrouter_requests_total", model='x"y\n') == 1
    assert s.value("kvrouter_matched_tokens_bucket", model="m", le="16.0") == 1
    assert s.value("kvrouter_matched_tokens_bucket", model="m", le="64.0") == 2
    assert s.value("kvrouter_matched_tokens_bucket", model="m", le="+Inf") == 3
    assert s.value("kvrouter_matched_tokens_sum", model="m") == 5020
    # the counter that shares the histogram's stem keeps its own name and type
    assert s.value("kvrouter_matched_tokens_total", model="m") == 5020
    assert "# TYPE kvrouter_matched_tokens_total counter" in text
    assert s.value("kvrouter_tokenizer_cache", stat="hits") == 3
    assert s.types["kvrouter_lookup_seconds"] == "histogram"
    assert not parse(other.render()).has("kvrouter_requests_total")


def test_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "m", "--policy", "fastest"]) == 2
    assert "KVR_POLICY / --policy" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--tokenizer", "/no/such/dir"]) == 2
    assert "/no/such/dir" in capsys.readouterr().err
