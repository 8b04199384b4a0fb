"""The segment path returns exactly the ids of whole-string tokenization, token for token.

The reference is the `tokenizers` library's own `encode` on the whole string, loaded fresh
from the same tokenizer.json: independent of every code path in kvrouter.tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from kvrouter.tokenizer import Tokenizer

from .conftest import VARIANTS

Reference = Callable[[str, bool], list[int]]

# Pieces that stress the splitter: whole and partial special tokens, every whitespace class
# (Unicode White_Space, Python-only isspace() characters, the "▁" meta symbol), contractions
# and digit runs the pre-tokenizer regex cares about, unseen scripts.
_SPECIALS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_3|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<unk>",
]
_TRICKY = [
    "<|",
    "|>",
    "<|eot",
    "_id|>",
    "[INST",
    "<s",
    "s>",
    "x<|",
    "<tool>",
    "ab ab",
    "ab",
    "==",
    "===",
    "the",
    "he",
    "Router",
    "cache",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \n ",
    "\r\n",
    "\u3000",
    "\xa0",
    "\x1c",
    "\u2028",
    "\u200b",
    "▁",
    " ▁ ",
    "'s",
    "'LL",
    "123456",
    "3.14",
    "🙂",
    "中文",
    "Привет",
    "e\u0301",
    "ﬁ",
    "Hello",
    " world",
    "ROUTER",
]
fragments = st.one_of(
    st.sampled_from(_SPECIALS),
    st.sampled_from(_TRICKY),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
    st.text(alphabet=" \n\tabcXYZ.!<>|_-", max_size=12),
)
texts = st.lists(fragments, max_size=24).map("".join)


def _reference(directory: Path) -> Reference:
    backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))

    def encode(text: str, add_special_tokens: bool) -> list[int]:
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)

    return encode


@pytest.fixture(scope="module")
def loaded(variant_dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, Reference]]:
    out: dict[str, tuple[Tokenizer, Reference]] = {}
    for name, directory in variant_dirs.items():
        if name == "dropout":
            continue
        # A small cache on some variants, so evictions happen during the property runs.
        entries = 32 if name in ("llama3", "strip_flags", "sentencepiece") else 4096
        out[name] = (Tokenizer.load(directory, cache_entries=entries), _reference(directory))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_segment_path_enabled_only_where_provable(
    name: str, loaded: dict[str, tuple[Tokenizer, Reference]]
) -> None:
    tok, _ = loaded[name]
    expected = VARIANTS[name][2]
    assert tok.segmented is expected, tok.fallback_reason
    if not expected:
        assert tok.fallback_reason


_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", list(VARIANTS))
@_SETTINGS
@given(text=texts, add_special_tokens=st.booleans())
def test_prompt_ids_equal_whole_string(
    name: str,
    text: str,
    add_special_tokens: bool,
    loaded: dict[str, tuple[Tokenizer, Reference]],
) -> None:
    tok, reference = loaded[name]
    expected = reference(text, add_special_tokens)
    assert tok.encode_prompt(text, add_special_tokens=add_special_tokens) == expected
    # Again, now that every segment is cached.
    assert tok.encode_prompt(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("name", list(VARIANTS))
@_SETTINGS
@given(parts=st.lists(texts, min_size=2, max_size=5))
def test_shared_prefixes_reuse_segments_exactly(
    name: str, parts: list[str], loaded: dict[str, tuple[Tokenizer, Reference]]
) -> None:
    """A growing prompt (as turns accumulate) reuses cached segments at every length."""
    tok, reference = loaded[name]
    for k in range(1, len(parts) + 1):
        prompt = "".join(parts[:k])
        assert tok.encode_prompt(prompt, add_special_tokens=False) == reference(prompt, False)


_roles = st.sampled_from(["system", "user", "assistant", "tool"])
_messages = st.lists(
    st.fixed_dictionaries({"role": _roles, "content": texts}), min_size=1, max_size=6
)


@pytest.mark.parametrize("name", ["llama3", "strip_flags", "normalized_added", "nfkc_lowercase"])
@_SETTINGS
@given(messages=_messages, add_generation_prompt=st.booleans())
def test_chat_ids_equal_whole_string_of_rendered_template(
    name: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    loaded: dict[str, tuple[Tokenizer, Reference]],
) -> None:
    tok, reference = loaded[name]
    rendered = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == reference(rendered, False)


_user_assistant = st.lists(texts, min_size=1, max_size=7)


@pytest.mark.parametrize("name", ["sentencepiece", "metaspace_always", "legacy_llama2"])
@_SETTINGS
@given(contents=_user_assistant)
def test_inst_chat_ids_equal_whole_string(
    name: str, contents: list[str], loaded: dict[str, tuple[Tokenizer, Reference]]
) -> None:
    tok, reference = loaded[name]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": c}
        for i, c in enumerate(contents)
    ]
    for turn in range(1, len(messages) + 1):
        rendered = tok.render_chat(messages[:turn], add_generation_prompt=False)
        ids = tok.encode_chat(messages[:turn], add_generation_prompt=False)
        assert ids == reference(rendered, False)


def test_metaspace_first_encodes_the_same_text_differently_by_position(
    loaded: dict[str, tuple[Tokenizer, Reference]],
) -> None:
    """The case the start-sensitive handling exists for: "hello" at offset 0 gets the "▁"
    prefix, after a special token it does not; both must come out right from one cache."""
    tok, reference = loaded["sentencepiece"]
    for text in ["hello world", "<s>hello world", "hello world", "[INST]hello world"]:
        assert tok.encode_prompt(text, add_special_tokens=False) == reference(text, False)
    at_start = tok.encode_prompt("hello world", add_special_tokens=False)
    after_special = tok.encode_prompt("<s>hello world", add_special_tokens=False)[1:]
    assert at_start != after_special


def test_two_pass_matching_of_normalized_tokens(
    loaded: dict[str, tuple[Tokenizer, Reference]],
) -> None:
    """Raw-matched tokens are extracted before normalized ones, whatever their position:
    in "x<|eot_id|>" the leftmost match "x<|" (normalized) loses to "<|eot_id|>"."""
    tok, reference = loaded["normalized_added"]
    for text in ["x<|eot_id|>", "the x<| he", "x<|x<|eot_id|>the"]:
        assert tok.encode_prompt(text, add_special_tokens=False) == reference(text, False)
    eot = tok.backend.token_to_id("<|eot_id|>")
    assert tok.encode_prompt("x<|eot_id|>", add_special_tokens=False)[-1] == eot


@pytest.mark.parametrize(
    "text",
    [
        "a <|eot_id|>   b",
        "a\u3000<|start_header_id|>b",
        "a\x1c<|start_header_id|>b",  # U+001C: isspace() in Python, not White_Space in Rust
        "<|end_header_id|>\n\n x",
        "   <|start_header_id|>",
        "<|eot_id|> <|start_header_id|> <|end_header_id|> ",
    ],
)
def test_strip_flags_examples(text: str, loaded: dict[str, tuple[Tokenizer, Reference]]) -> None:
    tok, reference = loaded["strip_flags"]
    assert tok.encode_prompt(text, add_special_tokens=False) == reference(text, False)


def test_dropout_tokenizer_falls_back(variant_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.load(variant_dirs["dropout"])
    assert not tok.segmented
    assert tok.fallback_reason is not None and "dropout" in tok.fallback_reason
