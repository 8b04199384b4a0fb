"""OpenAI request bodies: validate what routing needs, and tokenize as the engine will.

The router reads only what it routes on (model, prompt or messages, stream, cache_salt, the
session key, a few chat-template switches) and forwards the body untouched, so fields it does
not know about reach the engine as the client sent them. Validation errors are `APIError`s
(400/404/413) naming the offending field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from kvrouter.index.hashing import TokenIdError, tokens_to_bytes
from router_node.errors import APIError, bad_request, not_found, too_large
from router_node.settings import RouterSettings

if TYPE_CHECKING:  # routing imports this module: the annotation only
    from router_node.routing import RoutedModel

COMPLETIONS = "completions"
CHAT = "chat"
RESPONSES = "responses"
"""The Responses API: rendered as the chat it stands for (vLLM serves it that way)."""
EMBEDDINGS = "embeddings"
"""Embeddings: text input tokenized like a completions prompt, for prefix affinity."""
LOAD_ONLY = "load_only"
"""Score, rerank, tokenize, detokenize: routed on load alone (the body names the model)."""
TEXT_ENDPOINTS = (COMPLETIONS, CHAT, RESPONSES, EMBEDDINGS)


class PromptTokenizer(Protocol):
    """What the router needs from a tokenizer (kvrouter.tokenizer.Tokenizer provides it)."""

    def encode_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        /,
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        **template_kwargs: Any,
    ) -> list[int]: ...

    def validate_token_ids(self, ids: object) -> list[int]: ...


@dataclass(slots=True)
class ParsedRequest:
    """The routing-relevant part of one request (the body is forwarded as received)."""

    endpoint: str
    model: str
    stream: bool
    body: dict[str, Any]
    cache_salt: str | None = None
    session_key: str | None = None
    token_ids: list[int] | None = None
    """The prompt the engine will see (the first prompt of a batch); None when it cannot be
    known here (text without a tokenizer): the request is then routed on load alone."""
    prompt_tokens: int = 0
    """Tokens over every prompt of the request (0 when unknown)."""
    token_bytes: bytes | None = None
    """`token_ids` packed as uint32 (set when the check already packed them; hashing reuses
    it instead of converting 4k ids again)."""
    texts: list[str] = field(default_factory=list)
    inexact: str | None = None
    """Why the router could not tokenize the whole prompt exactly (an image part, prompt
    embeddings, state stored on the worker...): `token_ids` then hold only the exact text
    prefix before it (possibly none), and the request is not checked for a mismatch."""

    @property
    def count_is_exact(self) -> bool:
        """True when `prompt_tokens` is what the engine will count (so a worker's differing
        usage.prompt_tokens means a wrong tokenizer or template here)."""
        return self.inexact is None and self.token_ids is not None and self.prompt_tokens > 0

    resolved: RoutedModel | None = None
    """The model with its tokenizer, hasher and scoring, resolved once by parse_request
    (None when no resolver was given: the plain configured-name check)."""


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        # orjson: a 4k-token pre-tokenized body parses in a third of json's time.
        body = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def parse_request(
    endpoint: str,
    body: dict[str, Any],
    headers: Mapping[str, str],
    settings: RouterSettings,
    resolve: Callable[[str], RoutedModel | None] | None = None,
) -> ParsedRequest:
    """Check the fields routing needs. Raises APIError (400 malformed, 404 unknown model).

    `resolve` turns a model name into what routing needs, or None when the router does not
    serve it (the app passes `Router.resolve`, which also knows the adapters its workers
    list); it runs once, and the result rides on the request. Without it a name must be
    configured."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    resolved = resolve(model) if resolve is not None else None
    if resolved is None and (resolve is not None or model not in settings.models):
        raise not_found(f"The model `{model}` does not exist.", "model", "model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise bad_request("'cache_salt' must be a string", "cache_salt")
    session = headers.get(settings.session_header) or body.get("user")
    if session is not None and not isinstance(session, str):
        raise bad_request("'user' must be a string", "user")
    req = ParsedRequest(endpoint, model, stream, body, salt, session or None, resolved=resolved)
    if endpoint == COMPLETIONS:
        if body.get("prompt") is not None or body.get("prompt_embeds") is None:
            _check_prompt(body.get("prompt"))
    elif endpoint == CHAT:
        _check_messages(body.get("messages"))
    elif endpoint == RESPONSES:
        value = body.get("input")
        if not isinstance(value, str | list):
            raise bad_request("'input' must be a string or a list of items", "input")
    elif endpoint == EMBEDDINGS and "messages" not in body:
        _check_prompt(body.get("input"), "input")
    return req


def _check_prompt(prompt: Any, name: str = "prompt") -> None:
    # Shape only, from the first element: a token list is checked in C when it is tokenized
    # (a per-token Python loop here would cost more than the rest of the request path).
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        head = prompt[0]
        if isinstance(head, str) and all(isinstance(p, str) for p in prompt):
            return
        if isinstance(head, list) and all(isinstance(p, list) and p for p in prompt):
            return  # a batch of token lists
        if isinstance(head, int) and not isinstance(head, bool):
            return  # one token list
    raise bad_request(
        f"'{name}' must be a string, a list of strings, a list of token ids "
        "or a list of token-id lists (non-empty)",
        name,
    )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", "messages")


def _check_ids(ids: Any, tokenizer: PromptTokenizer | None) -> tuple[list[int], bytes | None]:
    if tokenizer is not None:
        return tokenizer.validate_token_ids(ids), None
    # Without a tokenizer the vocabulary is unknown: check only what hashing needs, integers
    # in [0, 2**32), in C (array() rejects floats, strings and nulls); the engine checks the
    # vocabulary.
    try:
        if not isinstance(ids, list) or not ids:
            raise TokenIdError("expected a non-empty list")
        packed = tokens_to_bytes(ids)
    except TokenIdError as exc:
        raise bad_request(
            f"'prompt': token ids must be integers in [0, 2**32): {exc}", "prompt"
        ) from None
    return ids, packed


def tokenize(
    req: ParsedRequest, tokenizer: PromptTokenizer | None, settings: RouterSettings
) -> None:
    """Fill `token_ids` and `prompt_tokens` (CPU work; the caller may run it in a thread).

    Raises APIError 400 for content the tokenizer rejects and 413 over the token limit.
    Tokenizer errors derive from TokenizationRequestError; imported lazily so the router
    starts without the tokenizer's imports when none is configured.
    """
    try:
        _tokenize(req, tokenizer)
    except APIError:
        raise
    except Exception as exc:
        from kvrouter.tokenizer.errors import TokenizationRequestError

        if isinstance(exc, TokenizationRequestError):
            raise bad_request(str(exc), _param(req.endpoint)) from None
        raise
    _apply_truncation(req)
    limit = settings.max_prompt_tokens
    if limit and req.prompt_tokens > limit:
        param = _param(req.endpoint)
        raise too_large(
            f"the prompt has {req.prompt_tokens} tokens; this router accepts at most {limit}",
            param,
        )


def _apply_truncation(req: ParsedRequest) -> None:
    """vLLM's ``truncate_prompt_tokens`` cuts the prompt the router just tokenized: kept
    from the left (the default) every block key changes, so route on load; kept from the
    right (``truncation_side: "right"``) the first N tokens are still an exact prefix."""
    keep = req.body.get("truncate_prompt_tokens")
    if keep is None or req.token_ids is None:
        return
    req.inexact = req.inexact or "truncate_prompt_tokens"
    if req.body.get("truncation_side") == "right" and type(keep) is int and keep >= 0:
        req.token_ids = req.token_ids[:keep]
        req.token_bytes = None
    else:
        req.token_ids = None
        req.token_bytes = None
    req.prompt_tokens = len(req.token_ids or ())


def _param(endpoint: str) -> str:
    return {CHAT: "messages", RESPONSES: "input", EMBEDDINGS: "input"}.get(endpoint, "prompt")


def _tokenize(req: ParsedRequest, tokenizer: PromptTokenizer | None) -> None:
    body = req.body
    if req.endpoint == LOAD_ONLY:
        return
    if req.endpoint == RESPONSES:
        if tokenizer is None:
            return
        from kvrouter.tokenizer.errors import UntokenizableContent
        from kvrouter.tokenizer.preprocess import responses_to_chat_body

        try:
            chat = responses_to_chat_body(body)
        except UntokenizableContent as exc:
            req.inexact = exc.reason
            return
        _tokenize_chat(req, tokenizer, chat)
        return
    if req.endpoint == EMBEDDINGS:
        if "messages" in body:
            # vLLM's chat-style embeddings have their own template defaults; not modelled.
            req.inexact = "embeddings_messages"
            return
        _tokenize_prompts(req, tokenizer, body.get("input"), body.get("add_special_tokens", True))
        return
    if req.endpoint == CHAT:
        if tokenizer is None:
            return
        _tokenize_chat(req, tokenizer, body)
        return
    if body.get("prompt_embeds") is not None:
        # The engine splices embeddings the router cannot see: route on load.
        req.inexact = "prompt_embeds"
        return
    _tokenize_prompts(req, tokenizer, body["prompt"], body.get("add_special_tokens", True))


def _tokenize_chat(req: ParsedRequest, tokenizer: PromptTokenizer, body: Mapping[str, Any]) -> None:
    if body.get("chat_template") is not None:
        # A per-request template (vLLM needs --trust-request-chat-template for it): the
        # router renders only the model's own templates.
        req.inexact = "request_chat_template"
        return
    encode_request = getattr(tokenizer, "encode_chat_request", None)
    if encode_request is not None:
        from kvrouter.tokenizer.errors import TokenizerError, UntokenizableContent
        from kvrouter.tokenizer.preprocess import first_untokenizable

        try:
            ids = encode_request(body)
        except UntokenizableContent as exc:
            # Route on the exact text before the first part the router cannot render: the
            # messages before it, rendered without a generation prompt, are a prefix of the
            # engine's prompt (the part's own message starts after them).
            req.inexact = exc.reason
            messages = body.get("messages") or []
            first = first_untokenizable(messages)
            ids = []
            if first is not None and first[0] > 0:
                prefix = {
                    **body,
                    "messages": messages[: first[0]],
                    "add_generation_prompt": False,
                    "continue_final_message": False,
                }
                try:
                    ids = encode_request(prefix)
                except TokenizerError:
                    ids = []
            req.token_ids, req.prompt_tokens = (ids or None), len(ids)
            return
        req.token_ids, req.prompt_tokens = ids, len(ids)
        return
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    flags = {}
    for name, default in (
        ("add_generation_prompt", True),
        ("continue_final_message", False),
        ("add_special_tokens", False),
    ):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise bad_request(f"'{name}' must be a boolean", name)
        flags[name] = value
    ids = tokenizer.encode_chat(
        body["messages"],
        tools=body.get("tools"),
        documents=body.get("documents"),
        **flags,
        **{k: v for k, v in kwargs.items() if k not in flags},
    )
    req.token_ids, req.prompt_tokens = ids, len(ids)


def _tokenize_prompts(
    req: ParsedRequest, tokenizer: PromptTokenizer | None, prompt: Any, add_special: Any
) -> None:
    if not isinstance(add_special, bool):
        raise bad_request("'add_special_tokens' must be a boolean", "add_special_tokens")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt[0], str | list):
        prompts = prompt
    else:
        prompts = [prompt]
    total = 0
    first: list[int] | None = None
    for p in prompts:
        packed = None
        if isinstance(p, str):
            if tokenizer is None:
                total = 0
                first = None
                break
            ids = tokenizer.encode_prompt(p, add_special_tokens=add_special)
        else:
            ids, packed = _check_ids(p, tokenizer)
        total += len(ids)
        if first is None:
            first = ids
            req.token_bytes = packed
    req.token_ids, req.prompt_tokens = first, total
