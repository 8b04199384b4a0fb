"""The simulator's prefill/decode pieces: pulled KV admitted as computed (and announced),
the transfer time, and the interference that makes the split worth it."""

from __future__ import annotations

import pytest

from kvrouter.sim.events import BlockStored
from kvrouter.sim.kvcache import root_digest
from kvrouter.sim.scheduler import EngineConfig, Scheduler, step_time_s
from kvrouter.sim.settings import SettingsError, SimSettings

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


def prompt(n: int) -> list[int]:
    return list(range(1000, 1000 + n))


def test_pulled_tokens_skip_prefill_and_are_announced() -> None:
    sched = Scheduler(CFG, ROOT)
    req = sched.add("0", prompt(102), 3, 0.0)
    req.remote_tokens = 100  # a decode leg: the prefill worker computed the prompt
    plan = sched.plan()
    assert plan is not None
    # 100 pulled tokens (25 blocks) count as computed; the last block's 2 tokens are
    # prefilled here: 10 ms + 1 ms + 2 tokens at 1000/s.
    assert plan.prefill == [(req, 2)]
    assert plan.step_s == pytest.approx(0.013)
    stored = [e for e in sched.cache.take_events() if isinstance(e, BlockStored)]
    assert sum(len(e.block_hashes) for e in stored) == 25  # the pulled blocks, now cached
    assert req.cached_tokens == 0  # local hits only, as the engine reports them


def test_pulled_tokens_stop_short_of_the_last_prompt_token() -> None:
    sched = Scheduler(CFG, ROOT)
    req = sched.add("0", prompt(100), 3, 0.0)
    req.remote_tokens = 100
    plan = sched.plan()
    assert plan is not None
    # Whole blocks short of the last token: 96 pulled, 4 computed (one to sample from).
    assert plan.prefill == [(req, 4)]


def test_a_prefill_chunk_stretches_the_decode_steps_batched_with_it() -> None:
    # The interference the split removes: 8 decodes alone, then with a 2,000-token chunk.
    alone = step_time_s(CFG, 8, 0)
    mixed = step_time_s(CFG, 9, 2000)
    assert alone == pytest.approx(0.018)
    assert mixed == pytest.approx(0.019 + 2.0)
    assert mixed / alone > 100


def test_transfer_time_and_roles() -> None:
    s = SimSettings(workers=4, prefill_workers=1, kv_bytes_per_token=100_000,
                    transfer_gb_per_s=10.0)  # fmt: skip
    assert s.transfer_s(50_000) == pytest.approx(0.5)  # 5 GB over 10 GB/s
    assert [s.role(i) for i in range(4)] == ["prefill", "decode", "decode", "decode"]
    assert SimSettings(workers=2).role(0) == "both"
    with pytest.raises(SettingsError, match="prefill-workers"):
        SimSettings(workers=2, prefill_workers=2)
    with pytest.raises(SettingsError, match="transfer-gb-per-s"):
        SimSettings(transfer_gb_per_s=0)
