"""Load-time analysis: which configurations are provably exact, and post-processor affixes."""

from __future__ import annotations

from typing import Any

import pytest

from kvrouter.tokenizer.segments import (
    AddedTokenRule,
    AddedTokenSplitter,
    SpecialAffixes,
    analyze,
    post_processor_affixes,
)

BPE: dict[str, Any] = {"model": {"type": "BPE", "dropout": None}}


def _plan(extra: dict[str, Any], rules: list[AddedTokenRule] | None = None, **kw: Any) -> Any:
    return analyze({**BPE, **extra}, rules or [], encode_special_tokens=kw.get("est", False))


def test_plain_byte_level_is_exact() -> None:
    plan = _plan({"pre_tokenizer": {"type": "ByteLevel"}}, [AddedTokenRule("<s>", 1)])
    assert plan.exact and plan.reason is None and not plan.start_sensitive


@pytest.mark.parametrize(
    ("extra", "rules", "reason"),
    [
        ({"model": {"type": "Mystery"}}, [], "model type 'Mystery'"),
        ({"model": {"type": "BPE", "dropout": 0.1}}, [], "dropout"),
        ({"normalizer": {"type": "FancyNorm"}}, [], "normalizer type 'FancyNorm'"),
        (
            {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Magic"}]}},
            [],
            "pre-tokenizer type 'Magic'",
        ),
        ({}, [AddedTokenRule("x", 1, single_word=True)], "single_word"),
        (
            {"normalizer": {"type": "NFC"}},
            [AddedTokenRule("x", 1, normalized=True)],
            "matched after normalization",
        ),
        (
            {},
            [AddedTokenRule("<e>", 1, rstrip=True), AddedTokenRule(" x", 2)],
            "starting with space",
        ),
        ({}, [AddedTokenRule("a", 1), AddedTokenRule("a", 2)], "share the same content"),
    ],
)
def test_unprovable_configurations_fall_back(
    extra: dict[str, Any], rules: list[AddedTokenRule], reason: str
) -> None:
    plan = _plan(extra, rules)
    assert not plan.exact
    assert plan.reason is not None and reason in plan.reason


def test_split_special_tokens_falls_back() -> None:
    plan = analyze(BPE, [AddedTokenRule("<s>", 1)], encode_special_tokens=True)
    assert not plan.exact and plan.reason is not None and "split_special_tokens" in plan.reason


def test_metaspace_first_inside_a_sequence_gets_an_inner_tokenizer() -> None:
    pre = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits"}, {"type": "Metaspace", "prepend_scheme": "first"}],
    }
    plan = _plan({"pre_tokenizer": pre})
    assert plan.exact and plan.start_sensitive
    assert plan.inner_tokenizer_json is not None
    assert '"prepend_scheme": "never"' in plan.inner_tokenizer_json
    assert '"first"' not in plan.inner_tokenizer_json


def test_splitter_pieces() -> None:
    splitter = AddedTokenSplitter(
        [
            AddedTokenRule("<a>", 1),
            AddedTokenRule("<ab>", 2),
            AddedTokenRule("", 3),  # empty tokens never match, as in tokenizers
            AddedTokenRule("[L]", 4, lstrip=True),
            AddedTokenRule("[R]", 5, rstrip=True),
        ]
    )
    assert splitter.split("") == []
    assert splitter.split("x<ab>y<a>") == ["x", 2, "y", 1]
    assert splitter.split("x  [L]y[R] \u3000 z") == ["x", 4, "y", 5, "z"]
    assert splitter.split("[R]  [L]") == [5, 4]


@pytest.mark.parametrize(
    ("processor", "expected"),
    [
        (None, ((), ())),
        ({"type": "ByteLevel"}, ((), ())),
        (
            {"type": "BertProcessing", "cls": ["[CLS]", 101], "sep": ["[SEP]", 102]},
            ((101,), (102,)),
        ),
        ({"type": "RobertaProcessing", "cls": ["<s>", 0], "sep": ["</s>", 2]}, ((0,), (2,))),
        ({"type": "BertProcessing", "cls": ["[CLS]"]}, None),
        (
            {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<s>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "</s>", "type_id": 0}},
                ],
                "special_tokens": {"<s>": {"ids": [1]}, "</s>": {"ids": [2, 3]}},
            },
            ((1,), (2, 3)),
        ),
        (
            {
                "type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A"}}, {"Sequence": {"id": "A"}}],
                "special_tokens": {},
            },
            None,
        ),
        (
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<missing>"}}, {"Sequence": {"id": "A"}}],
                "special_tokens": {},
            },
            None,
        ),
        (
            {
                "type": "Sequence",
                "processors": [
                    {"type": "ByteLevel"},
                    {"type": "RobertaProcessing", "cls": ["<s>", 0], "sep": ["</s>", 2]},
                    {"type": "BertProcessing", "cls": ["[CLS]", 9], "sep": ["[SEP]", 8]},
                ],
            },
            ((9, 0), (2, 8)),
        ),
        ({"type": "Sequence", "processors": [{"type": "Unknown"}]}, None),
        ({"type": "SomethingNew"}, None),
        ("not a dict", None),
    ],
)
def test_post_processor_affixes(processor: Any, expected: Any) -> None:
    result = post_processor_affixes(processor)
    if expected is None:
        assert result is None
    else:
        assert result == SpecialAffixes(*expected)
