"""Chat templates render as transformers renders them, and fail as typed 400-able errors."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kvrouter.tokenizer import (
    ChatTemplateError,
    TokenizationRequestError,
    Tokenizer,
    UntokenizableContent,
)
from kvrouter.tokenizer.chat_template import ChatTemplates

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


def render(template: str, messages: list[dict[str, Any]] | None = None, **kw: Any) -> str:
    return ChatTemplates({"default": template}, SPECIALS).render(messages or [], **kw)


def test_llama3_template_output(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    assert tok.render_chat(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.render_chat(messages, add_generation_prompt=False).endswith("Hi<|eot_id|>")


def test_tools_rendered_with_tojson_that_keeps_html_and_unicode(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    tools = [{"type": "function", "function": {"name": "f", "description": "a < b & c > d é"}}]
    out = tok.render_chat([{"role": "user", "content": "x"}], tools=tools)
    assert '"description": "a < b & c > d é"' in out  # no \u003c escapes, no \u00e9
    assert '\n    "type": "function"' in out  # indent=4 honoured


def test_sentencepiece_template_and_its_role_check(sp_dir: Path) -> None:
    tok = Tokenizer.load(sp_dir)
    messages = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert tok.render_chat(messages) == "<s>[INST] Sys.\n\nQ1 [/INST] A1</s>[INST] Q2 [/INST]"
    with pytest.raises(ChatTemplateError, match="Roles must alternate"):
        tok.render_chat([{"role": "assistant", "content": "A"}])


def test_environment_options() -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before it.
    template = "{% for m in messages %}\n    {% if m.role == 'stop' %}{% break %}{% endif %}\n"
    template += "[{{ m.content }}]\n{% endfor %}"
    messages = [{"role": "u", "content": "a"}, {"role": "stop"}, {"role": "u", "content": "b"}]
    assert render(template, messages) == "[a]\n"


def test_loopcontrols_continue() -> None:
    template = "{% for i in range(5) %}{% if i % 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}"
    assert render(template) == "024"


def test_generation_tag_is_transparent() -> None:
    template = (
        "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    )
    assert render(template, [{"content": "a"}, {"content": "b"}]) == "<a><b>"


def test_strftime_now() -> None:
    out = render("{{ strftime_now('%Y-%m-%d') }}")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", out)
    assert out[:4] == str(datetime.now().year) or out[:4] == str(datetime.now().year - 1)


def test_extra_kwargs_are_variables_and_override_special_tokens() -> None:
    template = "{{ bos_token }}|{{ enable_thinking }}|{{ add_generation_prompt }}"
    templates = ChatTemplates({"default": template}, SPECIALS)
    out = templates.render([], template_kwargs={"enable_thinking": False, "bos_token": "B"})
    assert out == "B|False|True"


def test_reserved_kwargs_rejected(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    with pytest.raises(ChatTemplateError, match="may not redefine messages"):
        tok.render_chat([], messages=[])


def test_raise_exception_becomes_chat_template_error(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    with pytest.raises(ChatTemplateError, match="Unknown role: wizard") as info:
        tok.encode_chat([{"role": "wizard", "content": "x"}])
    assert isinstance(info.value, TokenizationRequestError)


@pytest.mark.parametrize(
    ("template", "messages", "message"),
    [
        ("{{ messages[0].content + 1 }}", [{"content": "a"}], "TypeError"),
        (
            "{{ messages[0]['content'].missing.deeper }}",
            [{"content": "a"}],
            "has no attribute 'missing'",
        ),
        ("{{ messages.append(1) }}", [{"content": "a"}], "chat template error"),  # sandbox
        ("{{ ''.__class__.__mro__ }}", [], "chat template error"),
        ("{{ 1 / 0 }}", [], "ZeroDivisionError"),
    ],
)
def test_template_failures_are_typed(
    template: str, messages: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        render(template, messages)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "messages must be a list"),
        ({"role": "user"}, "messages must be a list"),
        ([{"role": "user"}, "text"], r"messages\[1\] must be an object"),
    ],
)
def test_bad_messages(messages: Any, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        render("x", messages)


def test_template_selection() -> None:
    templates = ChatTemplates({"default": "D", "tool_use": "T", "rag": "R"}, SPECIALS)
    assert templates.render([]) == "D"
    assert templates.render([], tools=[{"name": "f"}]) == "T"
    assert templates.render([], template_name="rag") == "R"
    with pytest.raises(ChatTemplateError, match="unknown chat template 'nope'"):
        templates.render([], template_name="nope")
    no_default = ChatTemplates({"tool_use": "T", "rag": "R"}, SPECIALS)
    with pytest.raises(ChatTemplateError, match="no default"):
        no_default.render([])
    assert no_default.render([], tools=[]) == "T"


def test_model_without_template(llama3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "bare.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.load(tmp_path / "bare.json")
    assert tok.chat_template_names == ()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


def test_continue_final_message(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "The colour is  "},
    ]
    out = tok.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    # The template trims the content; the cut keeps what the template wrote, and drops the
    # end-of-turn token so the model continues the message.
    assert out.endswith("<|end_header_id|>\n\nThe colour is")
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "Sure"}]
    out = tok.render_chat(
        [{"role": "assistant", "content": parts}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert out.endswith("firstSure")
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        tok.render_chat(messages, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="at least one message"):
        tok.render_chat([], add_generation_prompt=False, continue_final_message=True)
    # An image part: vLLM needs the model's processor for it, so the router cannot render
    # it exactly and says so (it then routes on the text before it).
    with pytest.raises(UntokenizableContent, match="unknown type 'image'"):
        tok.render_chat(
            [{"role": "assistant", "content": [{"type": "image"}]}],
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_continue_final_message_the_template_drops() -> None:
    templates = ChatTemplates({"default": "{{ messages | length }}"}, SPECIALS)
    with pytest.raises(ChatTemplateError, match="does not reproduce the final message"):
        templates.render(
            [{"role": "assistant", "content": "xyz"}],
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_encode_chat_tokenizes_without_adding_bos_again(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    bos = tok.backend.token_to_id("<|begin_of_text|>")
    messages = [{"role": "user", "content": "Hello"}]
    ids = tok.encode_chat(messages)
    assert ids[0] == bos and ids[1] != bos
    # A request may ask for add_special_tokens=True (vLLM allows it): then BOS appears twice.
    assert tok.encode_chat(messages, add_special_tokens=True)[:2] == [bos, bos]
