"""The simulator's CPU offload tier (#17 item 7): evicted blocks go to a CPU tier of its own
capacity, announced as vLLM events with medium CPU, and a request that finds its prefix there
loads it back faster than it would recompute it."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from kvrouter.sim.events import BlockRemoved, BlockStored, decode_batch, encode_batch
from kvrouter.sim.scheduler import EngineConfig, Scheduler
from tests.sim.test_sim_scheduler import ROOT, prompt, simulate, ttft

# 30 GPU blocks of 4 tokens: one 100-token request (26 blocks with its output) fills it.
SMALL = EngineConfig(
    block_size=4,
    num_blocks=30,
    prefill_tokens_per_s=1000.0,
    decode_step_s=0.010,
    decode_step_s_per_seq=0.001,
    max_batch=8,
    max_batched_tokens=8192,
    max_model_len=10_000,
    cpu_load_tokens_per_s=10_000.0,
)


def run(cfg: EngineConfig) -> tuple[Scheduler, list[object]]:
    sched = Scheduler(cfg, ROOT)
    a = prompt(100)
    reqs = simulate(sched, [(0.0, a, 3), (1.0, prompt(100, base=9000), 3), (2.0, a, 3)])
    return sched, reqs


def test_evicted_blocks_are_offloaded_and_loaded_back() -> None:
    tiered, (a1, _, a2) = run(dataclasses.replace(SMALL, cpu_blocks=64))
    _, (_, _, p2) = run(SMALL)
    # Without the tier the second request evicted most of A's prompt: recomputed.
    assert p2.cached_tokens is not None and p2.cached_tokens < 96
    # With it, what the GPU lost is on the CPU tier: 96 tokens count as cached (as vLLM
    # counts connector-loaded tokens), and loading them is cheaper than the recompute.
    assert a2.cached_tokens == 96
    loaded = tiered.stats.cpu_loaded_tokens
    assert loaded > 0 and loaded + tiered.stats.prefix_hits_tokens == 96  # GPU head, CPU rest
    assert ttft(a2) < ttft(p2)
    assert ttft(a2) == pytest.approx(0.010 + 0.001 + 4 / 1000.0 + loaded / 10_000.0)
    assert ttft(a1) > ttft(a2)


def test_tier_events_are_vllm_format_with_medium_cpu() -> None:
    sched, _ = run(dataclasses.replace(SMALL, cpu_blocks=8))
    events = sched.cache.take_events()
    cpu_stored = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU"]
    cpu_removed = [e for e in events if isinstance(e, BlockRemoved) and e.medium == "CPU"]
    assert cpu_stored and all(e.token_ids == [] and len(e.block_hashes) == 1 for e in cpu_stored)
    # The tier holds 8 blocks: everything offloaded beyond that was removed from it again.
    assert len(cpu_stored) - len(cpu_removed) == sched.cache.num_cpu_cached == 8
    for enc in ("positional", "map"):
        payload = encode_batch(1.0, [cpu_stored[0], cpu_removed[0]], enc)
        body = msgpack.unpackb(payload, raw=False)[1]
        media = [ev[6] if enc == "positional" else ev["medium"] for ev in body[:1]]
        media += [ev[2] if enc == "positional" else ev["medium"] for ev in body[1:]]
        assert media == ["CPU", "CPU"]
        assert len(decode_batch(payload)[1]) == 2
