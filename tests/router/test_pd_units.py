"""Prefill/decode disaggregation, the pure parts: the pair choice (property-tested like
`decide`), worker roles from every source, and the protocol's bodies and params checks."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.discovery.kubernetes import ROLE_LABEL, endpoints_from_slices
from router_node.proxy import ParamsError, prefill_body, transfer_params
from router_node.scoring import (
    Candidate,
    PairConfig,
    ScoringConfig,
    decide,
    decide_pair,
    decode_cost,
    kv_cost,
)
from router_node.settings import RouterSettings, SettingsError, WorkerSpec
from router_node.workers import WorkerPool

CFG = ScoringConfig(block_size=16, prefill_weight=1.0, decode_weight=2.0, balance_abs=4)
PCFG = PairConfig(min_prefill_tokens=256, saturation_tokens=0, transfer_weight=0.1)


def cand(name: str, matched: int = 0, requests: int = 0, queued: int = 0) -> Candidate:
    return Candidate(name, matched, requests, queued)


# -- the pair choice --------------------------------------------------------------------------


def test_a_long_uncached_prompt_is_split_prefill_by_cache_decode_by_load() -> None:
    pre = [cand("p0", matched=0), cand("p1", matched=40)]
    dec = [cand("d0", requests=5), cand("d1", requests=1)]
    d = decide_pair(pre, dec, 1000, CFG, PCFG, random.Random(0))
    assert d.split and d.reason == "split"
    assert d.prefill == ("p1", "p0")  # the prefill worker holding 40 blocks
    assert d.decode == ("d1", "d0")  # the less loaded decode worker
    assert d.suffix_tokens == 1000
    assert d.prefill_costs["p1"] < d.prefill_costs["p0"]


def test_a_short_suffix_runs_whole_on_the_decode_worker() -> None:
    pre = [cand("p0")]
    dec = [cand("d0"), cand("d1", matched=60)]  # d1 holds 960 of 1000 tokens
    d = decide_pair(pre, dec, 1000, CFG, PCFG, random.Random(0))
    assert not d.split and d.reason == "short_suffix"
    assert d.prefill == () and d.decode[0] == "d1"
    assert d.suffix_tokens == 40


def test_a_short_prompt_skips_the_prefill_hop() -> None:
    d = decide_pair([cand("p0")], [cand("d0")], 100, CFG, PCFG, random.Random(0))
    assert not d.split and d.reason == "short_suffix" and d.decode == ("d0",)


def test_a_saturated_prefill_pool_runs_whole() -> None:
    pcfg = PairConfig(min_prefill_tokens=16, saturation_tokens=8000)
    pre = [cand("p0", queued=9000), cand("p1", queued=8000)]
    d = decide_pair(pre, [cand("d0")], 4000, CFG, pcfg, random.Random(0))
    assert not d.split and d.reason == "prefill_saturated"
    pre[1] = cand("p1", queued=7999)
    d = decide_pair(pre, [cand("d0")], 4000, CFG, pcfg, random.Random(0))
    assert d.split and d.prefill[0] == "p1"


def test_a_saturated_pool_still_takes_suffixes_too_long_to_prefill_locally() -> None:
    pcfg = PairConfig(min_prefill_tokens=16, saturation_tokens=8000, local_max_tokens=2048)
    pre = [cand("p0", queued=9000), cand("p1", queued=8000)]
    # 2,048 uncached tokens: a short enough stall to run whole on the decode worker.
    d = decide_pair(pre, [cand("d0")], 2048, CFG, pcfg, random.Random(0))
    assert not d.split and d.reason == "prefill_saturated"
    # One token more would stall its decodes longer: it queues on the prefill pool.
    d = decide_pair(pre, [cand("d0")], 2049, CFG, pcfg, random.Random(0))
    assert d.split and d.reason == "split" and d.prefill[0] == "p1"


def test_no_prefill_worker_and_no_decode_worker() -> None:
    d = decide_pair([], [cand("d0")], 4000, CFG, PCFG, random.Random(0))
    assert not d.split and d.reason == "no_prefill_worker"
    with pytest.raises(ValueError, match="no decode candidates"):
        decide_pair([cand("p0")], [], 4000, CFG, PCFG, random.Random(0))


def test_decode_cost_counts_load_and_the_blocks_to_pull() -> None:
    c = cand("d", matched=10, requests=3)
    # 2 x 3 requests + 0.1 x (1000 - 160) / 16 blocks to pull
    assert decode_cost(c, 1000, CFG, PCFG) == pytest.approx(6 + 0.1 * 52.5)


candidates = st.lists(
    st.builds(
        Candidate,
        worker=st.sampled_from([f"w{i}" for i in range(12)]),
        matched_blocks=st.integers(0, 200),
        requests=st.integers(0, 40),
        prefill_tokens=st.integers(0, 20_000),
    ),
    max_size=6,
    unique_by=lambda c: c.worker,
)
pair_configs = st.builds(
    PairConfig,
    min_prefill_tokens=st.integers(0, 4000),
    saturation_tokens=st.integers(0, 20_000),
    transfer_weight=st.floats(0, 2),
    local_max_tokens=st.integers(0, 4000),
)


@settings(max_examples=300, deadline=None)
@given(
    pre=candidates,
    dec=candidates.filter(bool),
    prompt=st.integers(0, 4000),
    pcfg=pair_configs,
    seed=st.integers(0, 2**32),
)
def test_pair_choice_properties(
    pre: list[Candidate], dec: list[Candidate], prompt: int, pcfg: PairConfig, seed: int
) -> None:
    d = decide_pair(pre, dec, prompt, CFG, pcfg, random.Random(seed))
    # Rankings are permutations of their pools; a whole request has no prefill ranking.
    assert sorted(d.decode) == sorted(c.worker for c in dec)
    assert sorted(d.prefill) == (sorted(c.worker for c in pre) if d.split else [])
    # Deterministic for a given rng state.
    assert d == decide_pair(pre, dec, prompt, CFG, pcfg, random.Random(seed))
    by_name = {c.worker: c for c in dec}
    saturated = pcfg.saturation_tokens > 0 and all(
        c.prefill_tokens >= pcfg.saturation_tokens for c in pre
    )
    lm = pcfg.local_max_tokens
    # The saturation fallback applies only to suffixes it allows to run locally.
    fallback = saturated and (lm == 0 or d.suffix_tokens <= lm)
    if d.split:
        # Split exactly when a prefill worker exists, the suffix is long enough and the pool
        # has room; the decode winner has the lowest decode cost, the prefill winner is the
        # kv policy's choice over the prefill pool.
        assert pre and not fallback and d.suffix_tokens >= pcfg.min_prefill_tokens
        best = min(decode_cost(c, prompt, CFG, pcfg) for c in dec)
        assert decode_cost(by_name[d.decode[0]], prompt, CFG, pcfg) == pytest.approx(best)
        assert d.suffix_tokens == max(0, prompt - by_name[d.decode[0]].matched_blocks * 16)
        kv = decide("kv", pre, prompt, CFG, random.Random(0))
        winner = next(c for c in pre if c.worker == d.prefill[0])
        assert kv_cost(winner, prompt, CFG) == pytest.approx(kv.costs[kv.worker]) or (
            kv.guarded and winner.worker not in kv.guarded
        )
    else:
        assert d.reason in ("short_suffix", "prefill_saturated", "no_prefill_worker")
        if d.reason == "no_prefill_worker":
            assert not pre
        elif d.reason == "prefill_saturated":
            # (A whole request's suffix is its kv pick's; the fallback weighed the suffix
            # of the decode worker with the lowest decode cost.)
            best = min(decode_cost(c, prompt, CFG, pcfg) for c in dec)
            suffixes = [
                max(0, prompt - c.matched_blocks * 16)
                for c in dec
                if decode_cost(c, prompt, CFG, pcfg) == pytest.approx(best)
            ]
            assert saturated and (lm == 0 or min(suffixes) <= lm)
        # Whole on the decode pool: ranked by the kv policy (it prefills locally).
        kv = decide("kv", dec, prompt, CFG, random.Random(seed))
        assert kv_cost(by_name[d.decode[0]], prompt, CFG) == pytest.approx(kv.costs[kv.worker]) or (
            kv.guarded and d.decode[0] not in kv.guarded
        )


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(1, 4000), seed=st.integers(0, 2**32), pcfg=pair_configs)
def test_a_fully_cached_prompt_is_never_split(prompt: int, seed: int, pcfg: PairConfig) -> None:
    """A decode worker holding every block has at most one block left (the last, partial
    one): below any threshold above a block, the hop is skipped."""
    held = prompt // 16
    dec = [cand("d0", matched=held)]
    d = decide_pair([cand("p0")], dec, prompt, CFG, pcfg, random.Random(seed))
    if pcfg.min_prefill_tokens > 16:
        assert not d.split


# -- roles --------------------------------------------------------------------------------------


def test_worker_spec_roles() -> None:
    assert WorkerSpec.parse("http://h:1").role == "both"
    s = WorkerSpec.parse("p0=http://h:1#dp2@prefill")
    assert (s.id, s.url, s.dp_rank, s.role) == ("p0", "http://h:1", 2, "prefill")
    assert WorkerSpec.parse("http://h:2@DECODE").role == "decode"
    # Only a role name after the last '@' is a role: user@host stays a URL.
    u = WorkerSpec.parse("http://user@gpu-host:2")
    assert (u.url, u.role) == ("http://user@gpu-host:2", "both")


def test_roles_from_flags_and_the_config_file(tmp_path: Any) -> None:
    conf = tmp_path / "r.toml"
    conf.write_text(
        '[[workers]]\nurl = "http://10.0.0.1:8000"\nrole = "prefill"\n'
        '[[workers]]\nurl = "http://10.0.0.2:8000"\n'
    )
    s = RouterSettings.load(None, {"KVR_MODEL": "m"}, config=str(conf))
    assert {w.url: w.role for w in s.workers} == {
        "http://10.0.0.1:8000": "prefill",
        "http://10.0.0.2:8000": "both",
    }
    env = RouterSettings.from_env({"KVR_WORKERS": "http://h:9@decode"}, models=("m",))
    assert [w.role for w in env.workers] == ["decode"]
    s = s.with_(workers=(*s.workers, *env.workers))
    pool = WorkerPool(s)
    assert pool.disaggregated
    assert pool.pools(0.0) == {
        "prefill": ["10.0.0.1:8000"],
        "decode": ["h:9"],
        "both": ["10.0.0.2:8000"],
    }
    conf.write_text('[[workers]]\nurl = "http://10.0.0.1:8000"\nrole = "gpu"\n')
    with pytest.raises(SettingsError, match="role"):
        RouterSettings.load(None, {"KVR_MODEL": "m"}, config=str(conf))


def test_role_from_the_endpointslice_label() -> None:
    def slice_(name: str, role: str | None, ip: str) -> dict[str, Any]:
        labels = {ROLE_LABEL: role} if role else {}
        return {
            "metadata": {"name": name, "labels": labels},
            "ports": [{"name": "http", "port": 8000}],
            "endpoints": [{"addresses": [ip]}],
        }

    problems: list[str] = []
    eps = endpoints_from_slices(
        [slice_("a", "prefill", "10.0.0.1"), slice_("b", None, "10.0.0.2"),
         slice_("c", "gpu", "10.0.0.3")],
        on_problem=problems.append,
    )  # fmt: skip
    assert {e.url: e.role for e in eps} == {
        "http://10.0.0.1:8000": "prefill",
        "http://10.0.0.2:8000": "both",
    }
    assert len(problems) == 1 and ROLE_LABEL in problems[0]


# -- the protocol ---------------------------------------------------------------------------------


def test_prefill_body_asks_for_one_token_kept_for_a_remote_decode() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 300,
        "max_completion_tokens": 300,
        "min_tokens": 20,
        "temperature": 0.3,
    }
    out = prefill_body(body)
    assert out["stream"] is False and out["max_tokens"] == 1
    assert out["max_completion_tokens"] == 1
    assert "stream_options" not in out and "min_tokens" not in out
    assert out["kv_transfer_params"]["do_remote_decode"] is True
    assert out["kv_transfer_params"]["do_remote_prefill"] is False
    assert out["temperature"] == 0.3 and out["messages"] == body["messages"]
    assert body["stream"] is True and "kv_transfer_params" not in body  # the original is kept


GOOD = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [1, 2, 3],
    "remote_engine_id": "e1",
    "remote_request_id": "r1",
    "remote_host": "10.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
}


def test_transfer_params_accepts_vllms_answer() -> None:
    assert transfer_params({"choices": [], "kv_transfer_params": GOOD}) == GOOD


@pytest.mark.parametrize(
    ("answer", "cause"),
    [
        ({"choices": []}, "missing_params"),
        ({"kv_transfer_params": None}, "missing_params"),
        ([1, 2], "malformed_params"),
        ({"kv_transfer_params": "x"}, "malformed_params"),
        ({"kv_transfer_params": {**GOOD, "remote_host": None}}, "malformed_params"),
        ({"kv_transfer_params": {**GOOD, "remote_port": "5600"}}, "malformed_params"),
        ({"kv_transfer_params": {**GOOD, "remote_port": 70000}}, "malformed_params"),
        ({"kv_transfer_params": {**GOOD, "remote_block_ids": "1,2"}}, "malformed_params"),
        ({"kv_transfer_params": {**GOOD, "remote_block_ids": [1, None]}}, "malformed_params"),
        ({"kv_transfer_params": {k: v for k, v in GOOD.items() if k != "remote_engine_id"}},
         "malformed_params"),
    ],
)  # fmt: skip
def test_transfer_params_rejects_bad_answers(answer: Any, cause: str) -> None:
    with pytest.raises(ParamsError) as err:
        transfer_params(answer)
    assert err.value.cause == cause


@pytest.mark.redis
async def test_role_from_the_redis_registry(redis_client: Any) -> None:
    from kvrouter.index.keys import KeySchema
    from router_node.registry import read_registry, register_worker

    schema = KeySchema("kvr")
    await register_worker(redis_client, schema, "p0", "http://10.0.0.1:8000", role="prefill")
    await register_worker(redis_client, schema, "b0", "http://10.0.0.2:8000")
    found = await read_registry(redis_client, schema, max_age_ms=60_000)
    assert {e.id: e.role for e in found} == {"p0": "prefill", "b0": "both"}
    with pytest.raises(ValueError, match="role"):
        await register_worker(redis_client, schema, "x", "http://10.0.0.3:8000", role="gpu")
