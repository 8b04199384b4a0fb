"""The multi-turn benchmark function: shape and exactness, never its timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrouter.tokenizer import Tokenizer
from kvrouter.tokenizer.bench import build_conversation, main, multiturn_speedup, turn_prompts


def test_multiturn_speedup_reports_exact_result(llama3_dir: Path) -> None:
    result = multiturn_speedup(llama3_dir, turns=3, target_tokens=1500, repeats=2)
    assert result["exact"] is True
    assert result["turn"] == 3 and result["repeats"] == 2
    assert 1200 <= result["prompt_tokens"] <= 1800
    assert 0 < result["new_segment_tokens"] < result["prompt_tokens"]
    for key in ("cached_ms", "uncached_ms", "tokenizers_encode_ms", "speedup"):
        assert result[key] > 0


def test_conversation_shape_and_size(sp_dir: Path) -> None:
    tok = Tokenizer.load(sp_dir)
    convo = build_conversation(tok, turns=4, target_tokens=2000, seed=3)
    assert [m["role"] for m in convo] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    prompts = turn_prompts(convo)
    assert len(prompts) == 4 and prompts[-1] == convo and prompts[0] == convo[:2]
    assert build_conversation(tok, turns=4, target_tokens=2000, seed=3) == convo


def test_bad_arguments(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    with pytest.raises(ValueError, match="turns"):
        build_conversation(tok, turns=1, target_tokens=5000, seed=0)
    with pytest.raises(ValueError, match="too small"):
        build_conversation(tok, turns=10, target_tokens=500, seed=0)
    with pytest.raises(ValueError, match="repeats"):
        multiturn_speedup(llama3_dir, repeats=0)


def test_unsegmentable_tokenizer_is_refused(variant_dirs: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="segment cache unavailable"):
        multiturn_speedup(variant_dirs["single_word"], turns=2, target_tokens=400, repeats=1)


def test_main_prints_one_json_line(llama3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--tokenizer", str(llama3_dir), "--turns", "2", "--tokens", "600", "--repeats", "1"]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and '"exact": true' in lines[0]
