"""Request shapes beyond plain chat and completions: what the router tokenizes, what it
marks as inexact (and so routes on a prefix or on load), and what it rejects."""

from __future__ import annotations

from typing import Any

import pytest

from kvrouter.tokenizer import Tokenizer
from router_node.errors import APIError
from router_node.request import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LOAD_ONLY,
    RESPONSES,
    ParsedRequest,
    parse_request,
    tokenize,
)
from tests.router.conftest import MODEL, settings_for

SETTINGS = settings_for("redis://127.0.0.1:1", [])


def run(endpoint: str, body: dict[str, Any], tok: Tokenizer | None) -> ParsedRequest:
    req = parse_request(endpoint, {"model": MODEL, **body}, {}, SETTINGS)
    tokenize(req, tok, SETTINGS)
    return req


def test_truncation_keeps_an_exact_prefix_only_from_the_right(tokenizer: Tokenizer) -> None:
    prompt = "the router cache token prefix " * 4
    full = tokenizer.encode_prompt(prompt)
    right = run(
        COMPLETIONS,
        {"prompt": prompt, "truncate_prompt_tokens": 5, "truncation_side": "right"},
        tokenizer,
    )
    assert right.token_ids == full[:5] and right.inexact == "truncate_prompt_tokens"
    left = run(COMPLETIONS, {"prompt": prompt, "truncate_prompt_tokens": 5}, tokenizer)
    assert left.token_ids is None and left.prompt_tokens == 0
    assert not left.count_is_exact and not right.count_is_exact


def test_embeddings_text_is_tokenized_like_a_prompt(tokenizer: Tokenizer) -> None:
    req = run(EMBEDDINGS, {"input": ["first text", "second"]}, tokenizer)
    assert req.token_ids == tokenizer.encode_prompt("first text")
    assert req.prompt_tokens == len(req.token_ids) + len(tokenizer.encode_prompt("second"))
    assert req.count_is_exact
    chat_style = run(EMBEDDINGS, {"messages": [{"role": "user", "content": "x"}]}, tokenizer)
    assert chat_style.inexact == "embeddings_messages" and chat_style.token_ids is None
    with pytest.raises(APIError) as e:
        run(EMBEDDINGS, {"input": 3}, tokenizer)
    assert e.value.status == 400 and "'input'" in e.value.message


def test_responses_render_as_the_chat_they_stand_for(tokenizer: Tokenizer) -> None:
    req = run(RESPONSES, {"instructions": "Be brief.", "input": "Hi"}, tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert req.token_ids == tokenizer.encode_chat_request({"messages": chat})
    partial = run(
        RESPONSES,
        {
            "input": [
                {"role": "user", "content": "Say hello"},
                {
                    "type": "message",
                    "role": "assistant",
                    "status": "incomplete",
                    "content": [{"type": "output_text", "text": "Hel"}],
                },
            ]
        },
        tokenizer,
    )
    continued = tokenizer.encode_chat_request(
        {
            "messages": [
                {"role": "user", "content": "Say hello"},
                {"role": "assistant", "content": "Hel"},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
        }
    )
    assert partial.token_ids == continued
    with pytest.raises(APIError) as e:
        run(RESPONSES, {"input": {"role": "user"}}, tokenizer)
    assert e.value.status == 400


def test_no_tokenizer_and_load_only_endpoints(tokenizer: Tokenizer) -> None:
    assert run(RESPONSES, {"input": "Hi"}, None).token_ids is None
    assert run(LOAD_ONLY, {"query": "q", "documents": ["d"]}, tokenizer).token_ids is None
    embeds = run(COMPLETIONS, {"prompt_embeds": "AAAA"}, tokenizer)
    assert embeds.inexact == "prompt_embeds" and embeds.token_ids is None
    req = run(
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"},
        tokenizer,
    )
    assert req.inexact == "request_chat_template"


def test_bad_chat_template_kwargs_are_400(tokenizer: Tokenizer) -> None:
    for kwargs in ({"tokenize": True}, {"chat_template": "x"}, "nope"):
        with pytest.raises(APIError) as e:
            run(
                CHAT,
                {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": kwargs},
                tokenizer,
            )
        assert e.value.status == 400
