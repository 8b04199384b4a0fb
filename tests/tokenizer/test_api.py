"""The calls the router makes: prompts, pre-tokenized ids, stats, threads, fallbacks."""

from __future__ import annotations

import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from kvrouter.tokenizer import (
    InvalidTokenIdsError,
    TokenizationRequestError,
    Tokenizer,
    TokenizerError,
)
from kvrouter.tokenizer.segments import AddedTokenSplitter
from kvrouter.tokenizer.testing import synthetic_text


@pytest.fixture(scope="module")
def tok(llama3_dir: Path) -> Tokenizer:
    return Tokenizer.load(llama3_dir)


def test_encode_prompt_adds_bos_once(tok: Tokenizer) -> None:
    bos = tok.backend.token_to_id("<|begin_of_text|>")
    ids = tok.encode_prompt("Hello world")
    assert ids[0] == bos and bos not in ids[1:]
    assert ids[1:] == tok.encode_prompt("Hello world", add_special_tokens=False)
    # A prompt that already starts with BOS text gets a second one, as in the engine.
    assert tok.encode_prompt("<|begin_of_text|>Hi")[:2] == [bos, bos]
    assert tok.encode_prompt("") == [bos]
    assert tok.encode_prompt("", add_special_tokens=False) == []


def test_encode_prompt_rejects_non_strings(tok: Tokenizer) -> None:
    with pytest.raises(TokenizationRequestError, match="prompt must be a string"):
        tok.encode_prompt(["not", "a", "string"])  # type: ignore[arg-type]


def test_validate_token_ids_accepts_valid(tok: Tokenizer) -> None:
    ids = [0, 5, tok.vocab_size - 1]
    assert tok.validate_token_ids(ids) == ids
    assert tok.validate_token_ids(tuple(ids)) == ids
    assert tok.validate_token_ids([]) == []


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, -1], r"prompt\[1\] = -1 is outside the vocabulary \[0, 4000\)"),
        ([1, 4000], r"prompt\[1\] = 4000 is outside"),
        ([1, 2**40], "outside"),
        ([1, True], r"prompt\[1\] is not an integer"),
        ([1.0], r"prompt\[0\] is not an integer"),
        ([1, "2"], r"prompt\[1\] is not an integer"),
        ([[1, 2]], r"prompt\[0\] is not an integer"),
        ([1, None], r"prompt\[1\] is not an integer"),
        ("123", "must be a list of integers"),
        (b"\x01", "must be a list of integers"),
        (7, "must be a list of integers"),
        ({"a": 1}, "must be a list of integers"),
    ],
)
def test_validate_token_ids_rejects(tok: Tokenizer, ids: Any, message: str) -> None:
    with pytest.raises(InvalidTokenIdsError, match=message) as info:
        tok.validate_token_ids(ids)
    assert isinstance(info.value, TokenizationRequestError)
    assert isinstance(info.value, TokenizerError)


def test_cache_stats_count_reuse_across_turns(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    rng = random.Random(1)
    messages: list[dict[str, str]] = [{"role": "user", "content": synthetic_text(rng, 200)}]
    tok.encode_chat(messages)
    first = tok.cache_stats()
    messages += [
        {"role": "assistant", "content": synthetic_text(rng, 200)},
        {"role": "user", "content": synthetic_text(rng, 200)},
    ]
    tok.encode_chat(messages)
    second = tok.cache_stats()
    assert second.hits > first.hits
    # Turn 2 tokenized only its two new messages: the cache grew by roughly their size.
    new = tok.encode_prompt(
        messages[1]["content"] + messages[2]["content"], add_special_tokens=False
    )
    assert second.tokens - first.tokens <= len(new) + 10
    tok.clear_cache()
    assert tok.cache_stats().entries == 0


def test_threads_share_one_cache_safely(llama3_dir: Path) -> None:
    """Executor threads tokenizing at once, with a cache small enough to evict constantly."""
    tok = Tokenizer.load(llama3_dir, cache_entries=8)
    reference = HFTokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    rng = random.Random(7)
    pieces = [synthetic_text(rng, 30) for _ in range(12)]
    specials = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    prompts = [
        "".join(rng.choice(pieces) + rng.choice(specials) for _ in range(rng.randint(1, 8)))
        for _ in range(200)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda p: tok.encode_prompt(p, add_special_tokens=False), prompts))
    for prompt, ids in zip(prompts, results, strict=True):
        assert ids == reference.encode(prompt, add_special_tokens=False).ids
    assert tok.cache_stats().evictions > 0


def test_segment_cache_can_be_turned_off(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir, segment_cache=False)
    assert not tok.segmented
    assert tok.fallback_reason == "segment cache disabled by configuration"
    assert tok.encode_prompt("a<|eot_id|>b") == Tokenizer.load(llama3_dir).encode_prompt(
        "a<|eot_id|>b"
    )
    assert tok.cache_stats().misses == 0


def test_fallback_is_logged_with_its_reason(
    variant_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kvrouter.tokenizer.tokenizer"):
        tok = Tokenizer.load(variant_dirs["single_word"])
    assert not tok.segmented
    assert "single_word" in caplog.text and str(variant_dirs["single_word"]) in caplog.text
    assert (
        tok.encode_prompt("the cache x")
        == HFTokenizer.from_file(str(variant_dirs["single_word"] / "tokenizer.json"))
        .encode("the cache x")
        .ids
    )


@pytest.mark.parametrize(
    "processor",
    [
        {"type": "BertProcessing", "cls": ["<|begin_of_text|>", 0], "sep": ["<|eot_id|>", 4]},
        {"type": "RobertaProcessing", "cls": ["<|begin_of_text|>", 0], "sep": ["<|eot_id|>", 4]},
        {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|eot_id|>", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [0], "tokens": ["x"]},
                "<|eot_id|>": {"id": "<|eot_id|>", "ids": [4], "tokens": ["y"]},
            },
        },
        None,
    ],
)
def test_post_processors_add_their_tokens_once(
    llama3_dir: Path, tmp_path: Path, processor: dict[str, Any] | None
) -> None:
    data = json.loads((llama3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = processor
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    reference = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.segmented
    for text in ["", "Hello world", "a<|eot_id|>b", "<|begin_of_text|>x"]:
        assert tok.encode_prompt(text) == reference.encode(text).ids


def test_self_check_disables_a_wrong_segment_path(
    llama3_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the splitter ever disagreed with the library (a tokenizers release changing its
    rules), the load-time self-check turns the segment path off instead of serving it."""
    real_split = AddedTokenSplitter.split

    def lossy_split(self: AddedTokenSplitter, text: str) -> list[str | int]:
        return [p for p in real_split(self, text) if not (isinstance(p, str) and p == " ")]

    monkeypatch.setattr(AddedTokenSplitter, "split", lossy_split)
    with caplog.at_level(logging.ERROR, logger="kvrouter.tokenizer.tokenizer"):
        tok = Tokenizer.load(llama3_dir)
    assert not tok.segmented
    assert tok.fallback_reason is not None and "self-check" in tok.fallback_reason
    assert "self-check disagreed" in caplog.text
    assert (
        tok.encode_prompt("x<|eot_id|> ")
        == HFTokenizer.from_file(str(llama3_dir / "tokenizer.json")).encode("x<|eot_id|> ").ids
    )
