"""The locally trained test tokenizers: deterministic, and shaped like the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrouter.tokenizer import Tokenizer
from kvrouter.tokenizer.testing import KINDS, Kind, build_test_tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_same_inputs_same_bytes(kind: Kind, tmp_path: Path) -> None:
    a = build_test_tokenizer(tmp_path / "a", kind, vocab_size=600)
    b = build_test_tokenizer(tmp_path / "b", kind, vocab_size=600)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    c = build_test_tokenizer(tmp_path / "c", kind, vocab_size=600, seed=1)
    assert (a / "tokenizer.json").read_bytes() != (c / "tokenizer.json").read_bytes()


def test_llama3_kind_shape(llama3_dir: Path) -> None:
    data = json.loads((llama3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    kinds = [p["type"] for p in data["pre_tokenizer"]["pretokenizers"]]
    assert kinds == ["Split", "ByteLevel"]
    specials = {t["content"] for t in data["added_tokens"] if t["special"]}
    assert {
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    } <= specials
    tok = Tokenizer.load(llama3_dir)
    assert tok.vocab_size == 4000
    # Byte-level: any text round-trips, nothing is unknown.
    text = "Grüße 🙂 \x00 ok"
    assert tok.backend.decode(tok.encode_prompt(text, add_special_tokens=False)) == text


def test_sentencepiece_kind_shape(sp_dir: Path) -> None:
    data = json.loads((sp_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["pre_tokenizer"] == {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "first",
        "split": True,
    }
    tok = Tokenizer.load(sp_dir)
    assert tok.special_tokens["bos_token"] == "<s>"
    assert tok.encode_prompt("hello")[0] == tok.backend.token_to_id("<s>")
    assert tok.backend.token_to_id("<unk>") in tok.encode_prompt("\u0d05", add_special_tokens=False)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        build_test_tokenizer(tmp_path, "gpt5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        build_test_tokenizer(tmp_path, "llama3", vocab_size=10)
