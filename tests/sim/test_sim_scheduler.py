"""The timing model and batching, stepped in simulated time against hand-computed cases.

Unless a test says otherwise: block size 4, prefill 1000 tokens/s, a step costs 10 ms plus
1 ms per sequence, so prefilling 100 uncached tokens alone takes 10 + 1 + 100 = 111 ms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest

from kvrouter.sim.events import BlockRemoved, BlockStored
from kvrouter.sim.kvcache import root_digest
from kvrouter.sim.scheduler import (
    EngineConfig,
    RequestRejected,
    RequestState,
    Scheduler,
    SimRequest,
    filler_tokens,
    step_time_s,
)

CFG = EngineConfig(
    block_size=4,
    num_blocks=256,
    prefill_tokens_per_s=1000.0,
    decode_step_s=0.010,
    decode_step_s_per_seq=0.001,
    max_batch=8,
    max_batched_tokens=8192,
    max_model_len=10_000,
)
ROOT = root_digest("m")


def prompt(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def simulate(
    sched: Scheduler,
    arrivals: Sequence[tuple[float, list[int], int]],
    *,
    max_span_s: float = 0.0,
    repeats_log: list[int] | None = None,
) -> list[SimRequest]:
    """Drive the scheduler as the engine does, in simulated time, until all requests finish.

    Requests arriving during a step join at the next step boundary; an arrival cuts a run of
    repeated decode steps at the boundary after it, as the engine's driver does.
    """
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    reqs: list[SimRequest | None] = [None] * len(arrivals)
    now = 0.0
    while pending or sched.has_work:
        while pending and pending[0][1][0] <= now + 1e-12:
            i, (t, toks, max_tokens) = pending.pop(0)
            reqs[i] = sched.add(str(i), toks, max_tokens, t)
        if not sched.has_work:
            now = pending[0][1][0]
            continue
        plan = sched.plan(max_span_s)
        assert plan is not None
        repeats = plan.max_repeats
        if repeats > 1 and pending and pending[0][1][0] < now + plan.step_s * repeats:
            repeats = max(1, math.ceil((pending[0][1][0] - now) / plan.step_s - 1e-9))
        now += plan.step_s * repeats
        sched.execute(plan, repeats, now)
        if repeats_log is not None:
            repeats_log.append(repeats)
    out = [r for r in reqs if r is not None]
    assert len(out) == len(arrivals)
    return out


def ttft(r: SimRequest) -> float:
    assert r.first_token_s is not None
    return r.first_token_s - r.arrival_s


def e2e(r: SimRequest) -> float:
    assert r.finish_s is not None
    return r.finish_s - r.arrival_s


def test_step_time_formula() -> None:
    assert step_time_s(CFG, 1, 100) == pytest.approx(0.111)
    assert step_time_s(CFG, 3, 0) == pytest.approx(0.013)
    assert step_time_s(CFG, 2, 50) == pytest.approx(0.062)


def test_single_request_prefill_then_decode() -> None:
    (r,) = simulate(Scheduler(CFG, ROOT), [(0.0, prompt(100), 3)])
    assert ttft(r) == pytest.approx(0.111)
    assert e2e(r) == pytest.approx(0.111 + 2 * 0.011)
    assert r.state is RequestState.FINISHED
    assert r.num_generated == 3
    assert r.cached_tokens == 0
    assert list(r.output_tokens) == list(filler_tokens(r._filler_offset, 0, 3))


def test_repeat_prompt_hits_all_but_the_capped_block() -> None:
    sched = Scheduler(CFG, ROOT)
    _, b = simulate(sched, [(0.0, prompt(100), 3), (1.0, prompt(100), 3)])
    # 100 tokens = 25 full blocks; the hit is capped at 99 tokens -> 24 blocks = 96 tokens.
    assert b.cached_tokens == 96
    assert ttft(b) == pytest.approx(0.010 + 0.001 + 0.004)
    assert sched.stats.prefix_queries_tokens == 200
    assert sched.stats.prefix_hits_tokens == 96
    assert sched.stats.prompt_tokens == 100 + 4


def test_exact_block_multiple_hits_one_block_less() -> None:
    sched = Scheduler(CFG, ROOT)
    _, b = simulate(sched, [(0.0, prompt(8), 1), (1.0, prompt(8), 1)])
    assert b.cached_tokens == 4


def test_same_prefix_admitted_in_one_step_is_computed_once() -> None:
    """As vLLM v1 (allocate_slots caches a chunk's full blocks when the step is scheduled), a
    request admitted behind another in the same step reuses the prefix that step computes."""
    sched = Scheduler(CFG, ROOT)
    shared = prompt(96)
    a, b = simulate(sched, [(0.0, shared + prompt(4, 7000), 1), (0.0, shared + prompt(4, 8000), 1)])
    assert a.cached_tokens == 0
    assert b.cached_tokens == 96  # 24 full blocks of 4, all scheduled in A's step
    # One step computes A's 100 tokens and B's 4: 10 + 2 x 1 + 104 ms.
    assert ttft(a) == ttft(b) == pytest.approx(0.116)
    assert sched.stats.prompt_tokens == 104


def test_batch_limit_queues_the_second_request() -> None:
    sched = Scheduler(dataclasses.replace(CFG, max_batch=1), ROOT)
    a, b = simulate(sched, [(0.0, prompt(100, 1), 2), (0.0, prompt(100, 5000), 2)])
    assert ttft(a) == pytest.approx(0.111)
    assert e2e(a) == pytest.approx(0.122)
    # B waits for A to leave the batch at 0.122, then prefills alone.
    assert ttft(b) == pytest.approx(0.122 + 0.111)
    assert e2e(b) == pytest.approx(0.122 + 0.111 + 0.011)


def test_two_requests_share_steps_and_step_time_grows_with_batch() -> None:
    a, b = simulate(Scheduler(CFG, ROOT), [(0.0, prompt(100, 1), 2), (0.0, prompt(100, 5000), 2)])
    assert ttft(a) == ttft(b) == pytest.approx(0.010 + 0.002 + 0.200)
    assert e2e(a) == e2e(b) == pytest.approx(0.212 + 0.012)


def test_chunked_prefill_within_the_token_budget() -> None:
    sched = Scheduler(dataclasses.replace(CFG, max_batched_tokens=64), ROOT)
    (r,) = simulate(sched, [(0.0, prompt(100), 1)])
    assert ttft(r) == pytest.approx((0.010 + 0.001 + 0.064) + (0.010 + 0.001 + 0.036))
    assert e2e(r) == ttft(r)  # max_tokens=1: the prefill's token is the last


def test_arrival_joins_at_the_next_step_boundary_and_shares_it() -> None:
    a, b = simulate(Scheduler(CFG, ROOT), [(0.0, prompt(8, 1), 10), (0.02, prompt(100, 500), 1)])
    assert ttft(a) == pytest.approx(0.019)  # 10 + 1 + 8 ms
    # A decodes 0.019 -> 0.030; B arrived at 0.02 and joins then; the shared step costs
    # 10 + 2 x 1 + 100 ms.
    assert b.first_token_s == pytest.approx(0.030 + 0.112)
    assert ttft(b) == pytest.approx(0.122)


def test_coalesced_decode_steps_match_single_steps() -> None:
    arrivals = [(0.0, prompt(30, 1), 40), (0.0, prompt(50, 900), 25), (0.3, prompt(9, 3), 7)]
    single, multi = Scheduler(CFG, ROOT), Scheduler(CFG, ROOT)
    r1 = simulate(single, arrivals)
    log: list[int] = []
    r2 = simulate(multi, arrivals, max_span_s=0.2, repeats_log=log)
    assert max(log) > 1 and len(log) < 40  # steps really were coalesced
    for x, y in zip(r1, r2, strict=True):
        assert x.first_token_s == pytest.approx(y.first_token_s)
        assert x.finish_s == pytest.approx(y.finish_s)
        assert x.tokens == y.tokens
    assert single.cache.cached_hashes() == multi.cache.cached_hashes()


def test_plan_offers_repeats_bounded_by_span_and_remaining_tokens() -> None:
    sched = Scheduler(CFG, ROOT)
    req = sched.add("a", prompt(8), 10, 0.0)
    plan = sched.plan(1.0)
    assert plan is not None and plan.prefill and plan.max_repeats == 1
    sched.execute(plan, 1, plan.step_s)
    plan = sched.plan(0.05)  # 0.05 / 0.011 -> 4 steps
    assert plan is not None and plan.decode == [req] and plan.max_repeats == 4
    sched.execute(plan, 2, 1.0)  # cut short after 2 steps (an arrival)
    assert req.num_generated == 3
    plan = sched.plan(10.0)
    assert plan is not None and plan.max_repeats == 7  # only 7 tokens left


def test_generated_blocks_are_cached_with_the_prompt_as_parent() -> None:
    sched = Scheduler(CFG, ROOT)
    (r,) = simulate(sched, [(0.0, prompt(6), 6)])
    events = [e for e in sched.cache.take_events() if isinstance(e, BlockStored)]
    # Prompt block 0 at prefill; block 1 (2 prompt + 2 generated tokens) once computed;
    # 12 tokens total, the last one sampled but never computed -> block 2 stays partial.
    assert [len(e.block_hashes) for e in events] == [1, 1]
    assert events[1].parent_block_hash == events[0].block_hashes[0]
    assert events[1].token_ids == list(r.tokens[4:8])
    assert r.hashes[:2] == [events[0].block_hashes[0], events[1].block_hashes[0]]


def test_preemption_when_decode_runs_out_of_blocks() -> None:
    cfg = dataclasses.replace(CFG, num_blocks=6)
    sched = Scheduler(cfg, ROOT)
    a, b = simulate(sched, [(0.0, prompt(8, 1), 10), (0.0, prompt(8, 100), 10)])
    # Both hold 3 blocks after their first decode; A's 4th block (at its 5th decode)
    # finds none free, so B (admitted last) is preempted and re-queued.
    assert sched.stats.preemptions == 1
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert a.num_generated == b.num_generated == 10
    assert b.finish_s is not None and a.finish_s is not None and b.finish_s > a.finish_s
    assert b.cached_tokens == 0  # reported from the first admission
    assert sched.cache.num_free == 6


def test_preempted_blocks_are_evicted_tail_first() -> None:
    cfg = dataclasses.replace(CFG, num_blocks=6)
    sched = Scheduler(cfg, ROOT)
    sched.add("a", prompt(8, 1), 10, 0.0)
    b = sched.add("b", prompt(8, 100), 10, 0.0)
    now = 0.0
    removed: list[int] = []
    while sched.stats.preemptions == 0:
        plan = sched.plan()
        assert plan is not None
        removed += [
            h for e in sched.cache.take_events() if isinstance(e, BlockRemoved)
            for h in e.block_hashes
        ]  # fmt: skip
        now += plan.step_s
        sched.execute(plan, 1, now)
    # B held 3 full blocks; A's new block evicted B's last one only.
    assert removed == [b.hashes[2]]
    assert sched.cache.is_cached(b.hashes[0]) and sched.cache.is_cached(b.hashes[1])


def test_abort_frees_blocks_and_skips_the_request() -> None:
    sched = Scheduler(CFG, ROOT)
    r = sched.add("a", prompt(40), 100, 0.0)
    plan = sched.plan()
    assert plan is not None
    sched.abort(r, "client went away")
    sched.execute(plan, 1, plan.step_s)
    assert r.state is RequestState.ABORTED and r.num_generated == 0
    assert sched.cache.num_free == CFG.num_blocks
    assert not sched.has_work


def test_requests_that_can_never_run_are_rejected() -> None:
    sched = Scheduler(dataclasses.replace(CFG, num_blocks=4, max_model_len=100), ROOT)
    with pytest.raises(RequestRejected, match="maximum context length"):
        sched.add("a", prompt(90), 20, 0.0)
    with pytest.raises(RequestRejected, match="blocks"):
        sched.add("a", prompt(15), 2, 0.0)  # 17 tokens = 5 blocks > 4
    with pytest.raises(RequestRejected):
        sched.add("a", [], 2, 0.0)
    sched.add("a", prompt(14), 2, 0.0)  # 16 tokens = 4 blocks fits


def test_restart_empties_everything_without_events() -> None:
    sched = Scheduler(CFG, ROOT)
    simulate(sched, [(0.0, prompt(40), 2)])
    sched.cache.take_events()
    r = sched.add("b", prompt(40), 5, 1.0)
    victims = sched.restart()
    assert victims == [r] and r.state is RequestState.ABORTED
    assert sched.cache.cached_hashes() == set() and sched.cache.take_events() == []
    assert sched.stats.prefix_queries_tokens == 0


def test_prefill_chunks_get_their_blocks_step_by_step() -> None:
    """As in vLLM, a chunked prefill allocates (and so evicts) only the blocks of the chunk
    scheduled in each step, not the whole prompt's at admission."""
    cfg = dataclasses.replace(CFG, max_batched_tokens=16)
    sched = Scheduler(cfg, ROOT)
    r = sched.add("a", prompt(40), 1, 0.0)  # 40 tokens = 10 blocks of 4; 16 tokens a step
    blocks_after_each_plan = []
    t = 0.0
    while r.state is not RequestState.FINISHED:
        plan = sched.plan()
        assert plan is not None
        blocks_after_each_plan.append(len(r.table.block_ids))
        t += plan.step_s
        sched.execute(plan, 1, t)
    # chunks of 16, 16 and 8 tokens: 4, then 8, then 10 blocks; then one decode step (the
    # 41st token opens an 11th block)
    assert blocks_after_each_plan[:3] == [4, 8, 10]
