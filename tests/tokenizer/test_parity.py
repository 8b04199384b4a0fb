"""Token-exact parity with the engine: the router's ids against transformers' own
apply_chat_template and tokenizer, fed the conversation vLLM builds (tests/tokenizer/
vllm_reference.py), on generated conversations, for Llama-3, Qwen, Mistral and DeepSeek
style templates, chat and completions, with the segment cache on and off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvrouter.tokenizer import Tokenizer, UntokenizableContent
from kvrouter.tokenizer.preprocess import (
    detect_content_format,
    first_untokenizable,
    prepare_messages,
)
from kvrouter.tokenizer.testing import KINDS, Kind, build_test_tokenizer
from tests.tokenizer import vllm_reference as ref

# The content format vLLM detects for each test template (asserted below, then used by the
# reference): Llama-3's loops over content parts, the others print content as a string.
FORMATS: dict[Kind, str] = {
    "llama3": "openai",
    "qwen": "string",
    "sentencepiece": "string",
    "deepseek": "string",
}
# Templates that render tools and tool turns (the Mistral-style one only alternates turns).
TOOL_KINDS = {"llama3", "qwen", "deepseek"}

_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", params=KINDS)
def kind_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    kind: Kind = request.param
    return kind, build_test_tokenizer(tmp_path_factory.mktemp(kind), kind, vocab_size=2000)


@pytest.fixture(scope="module")
def reference(kind_dir: tuple[Kind, Path]) -> Any:
    return ref.load(kind_dir[1])


@pytest.fixture(scope="module", params=[True, False], ids=["cache", "nocache"])
def router_tok(request: pytest.FixtureRequest, kind_dir: tuple[Kind, Path]) -> Tokenizer:
    return Tokenizer.load(kind_dir[1], segment_cache=request.param)


# -- generated requests --------------------------------------------------------------------

_WORDS = (
    "the router cache token prefix Hello world résumé 東京 🙂 def f(x): return "
    '{"a": 1} <tag> & \' " \t tabs\n newline\n\n 42 3.14'
)
_words = st.sampled_from(_WORDS.split(" "))
text = st.lists(_words, min_size=0, max_size=12).map(" ".join) | st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20
)
nonempty_text = st.lists(_words, min_size=1, max_size=12).map(" ".join)


@st.composite
def content(draw: st.DrawFn, allow_none: bool = False) -> Any:
    """A message content as clients send it: a string, or a list of text parts."""
    choice = draw(st.integers(0, 3 if allow_none else 2))
    if choice == 0:
        return draw(nonempty_text)
    if choice == 3:
        return None
    parts: list[Any] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["text", "input_text", "text", "plain"]))
        value = draw(text) if parts else draw(nonempty_text)
        parts.append(value if kind == "plain" else {"type": kind, "text": value})
    return parts


@st.composite
def tool_call(draw: st.DrawFn, i: int) -> dict[str, Any]:
    args = draw(
        st.dictionaries(
            st.sampled_from(["city", "n", "unit", "q"]),
            st.integers(-5, 500) | nonempty_text | st.booleans(),
            max_size=3,
        )
    )
    shape = draw(st.sampled_from(["json", "json", "dict", "broken", "empty", "null"]))
    arguments: Any = {
        "json": json.dumps(args),
        "dict": args,
        "broken": '{"city": "Par',
        "empty": "",
        "null": None,
    }[shape]
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {
            "name": draw(st.sampled_from(["get_weather", "search"])),
            "arguments": arguments,
        },
    }


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & later",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "search"}},
]


@st.composite
def chat_body(draw: st.DrawFn, kind: Kind) -> dict[str, Any]:
    tools_ok = kind in TOOL_KINDS
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content())})
    for turn in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(content())})
        last = turn == 3 or draw(st.booleans())
        if last and draw(st.booleans()):
            break
        if tools_ok and draw(st.integers(0, 2)) == 0:
            calls = [draw(tool_call(k)) for k in range(draw(st.integers(1, 2)))]
            messages.append(
                {
                    "role": "assistant",
                    "content": draw(content(allow_none=True)),
                    "tool_calls": calls,
                }
            )
            for call in calls:
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": draw(content())}
                )
            if kind == "qwen":
                messages.append({"role": "assistant", "content": draw(nonempty_text)})
        else:
            messages.append({"role": "assistant", "content": draw(content())})
        if last:
            break
    body: dict[str, Any] = {"model": "m", "messages": messages}
    if tools_ok and draw(st.booleans()):
        body["tools"] = TOOLS
    if messages[-1]["role"] == "assistant" and draw(st.booleans()):
        body["add_generation_prompt"] = False
        if not messages[-1].get("tool_calls"):
            body["continue_final_message"] = draw(st.booleans())
    if draw(st.booleans()):
        body["add_special_tokens"] = draw(st.booleans())
    if kind == "qwen" and draw(st.booleans()):
        body["chat_template_kwargs"] = {"enable_thinking": draw(st.booleans())}
    if kind == "qwen" and draw(st.booleans()):
        body["reasoning_effort"] = draw(st.sampled_from(["none", "low", "high"]))
    if draw(st.booleans()):
        docs = st.fixed_dictionaries({"title": nonempty_text, "text": text})
        body["documents"] = draw(st.lists(docs, min_size=1, max_size=2))
    return body


def _expected_or_error(reference: Any, body: dict[str, Any], fmt: str) -> list[int] | None:
    try:
        return ref.chat_ids(reference, body, fmt)
    except Exception:  # the template rejects this conversation: the router must too
        return None


def test_content_formats_detected_as_vllm_detects(router_tok: Tokenizer, kind_dir: Any) -> None:
    assert router_tok.content_format() == FORMATS[kind_dir[0]]


@_SETTINGS
@given(data=st.data())
def test_chat_parity(
    data: st.DataObject, router_tok: Tokenizer, reference: Any, kind_dir: Any
) -> None:
    kind: Kind = kind_dir[0]
    body = data.draw(chat_body(kind))
    expected = _expected_or_error(reference, body, FORMATS[kind])
    event("rejected by the template" if expected is None else "rendered")
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017 - any 400-class error, as the engine
            router_tok.encode_chat_request(body)
        return
    assert router_tok.encode_chat_request(body) == expected
    # Twice: the second run is served from the segment cache when it is on.
    assert router_tok.encode_chat_request(body) == expected


@_SETTINGS
@given(prompt=text, add_special=st.booleans())
def test_completions_parity(
    prompt: str, add_special: bool, router_tok: Tokenizer, reference: Any
) -> None:
    expected = ref.completion_ids(reference, prompt, add_special)
    assert router_tok.encode_prompt(prompt, add_special_tokens=add_special) == expected


def test_content_parts_render_as_text_not_a_list_repr(router_tok: Tokenizer, kind_dir: Any) -> None:
    """The defect that started this: list content under a string-format template."""
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "again"}]
    listed = router_tok.render_chat([{"role": "user", "content": parts}])
    plain = router_tok.render_chat([{"role": "user", "content": "Hello\nagain"}])
    assert "[{" not in listed and "'type'" not in listed
    if FORMATS[kind_dir[0]] == "string":
        assert listed == plain


def test_tool_call_arguments_parsed_from_json(router_tok: Tokenizer, kind_dir: Any) -> None:
    if kind_dir[0] not in TOOL_KINDS:
        pytest.skip("this template has no tool calls")
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ]
    out = router_tok.render_chat(messages)
    assert '{"a": 1}' in out and '"{\\"a\\": 1}"' not in out
    assert call["function"]["arguments"] == '{"a": 1}', "the request itself is not changed"


def test_detection_follows_aliases_filters_and_slices() -> None:
    assert detect_content_format("{{ messages[0]['content'] }}") == "string"
    loop = "{% for m in msgs %}{% for p in m.content | list %}{{ p }}{% endfor %}{% endfor %}"
    assert detect_content_format("{% set msgs = messages[1:] %}" + loop) == "openai"
    assert detect_content_format(loop) == "string", "msgs is not derived from messages"
    assert detect_content_format("{% for x in %}") == "string", "unparseable: string"


def test_media_parts_are_reported_not_rendered(router_tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
        },
    ]
    with pytest.raises(UntokenizableContent) as info:
        router_tok.encode_chat_request({"messages": messages})
    assert info.value.reason == "image_url"
    assert first_untokenizable(messages) == (2, "image_url")
    assert first_untokenizable([{"role": "user", "content": [{"type": "x-new"}]}]) == (
        0,
        "unknown_part",
    )
    assert first_untokenizable(messages[:2]) is None


def test_missing_part_values_as_vllm_treats_them() -> None:
    parts = [{"type": "text"}, {"type": "input_text"}, {"type": "text", "text": ""}, "x"]
    message = [{"role": "user", "content": parts}]
    assert prepare_messages(message, "string")[0]["content"] == "x"
    assert prepare_messages(message, "openai")[0]["content"] == [
        {"type": "text", "text": None},
        {"type": "text", "text": ""},
        {"type": "text", "text": "x"},
    ]
    tool = [{"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "a"}, "b"]}]
    assert prepare_messages(tool, "openai")[0] == {
        "role": "tool",
        "content": "a\nb",
        "tool_call_id": "c",
    }


# Final messages whose continuation the old cut rule (find the stripped content, cut after it)
# got wrong or only got right by luck: whitespace only (the Hypothesis draw that found it was
# a lone tab under the Qwen template), empty, padded, and text that the template's own
# end-of-turn marker repeats.
CONTINUED = ["\t", "", "  ", "\n", "  padded  ", "end\n", "<|im_end|>", "im_end", "a\tb "]


@pytest.mark.parametrize("final", CONTINUED, ids=repr)
def test_continue_final_message_cuts_where_transformers_cuts(
    final: str, router_tok: Tokenizer, reference: Any, kind_dir: Any
) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Say something."},
            {"role": "assistant", "content": final},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    expected = _expected_or_error(reference, body, FORMATS[kind_dir[0]])
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017 - the engine rejects it too
            router_tok.encode_chat_request(body)
        return
    assert router_tok.encode_chat_request(body) == expected
    assert router_tok.encode_chat_request(body) == expected
