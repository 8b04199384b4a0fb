"""vLLM's chat request preprocessing, reproduced so the router renders what the engine renders.

A router that renders a request differently from the engine computes block keys the engine
never caches, and nothing reports it. vLLM does not hand the OpenAI messages to the chat
template as received: it rewrites them first. The rules here follow vLLM's source (facts
only; see docs/tokenization.md for the files and commits they were read from):

- Content format. A template either prints ``message['content']`` as a string ("string")
  or loops over it as a list of parts ("openai"). vLLM decides by parsing the template:
  "openai" when some ``for`` loop iterates ``<message>['content']`` (or ``.content``, through
  filters, tests or slices), where ``<message>`` is the target of a ``for`` loop over
  ``messages`` or over a variable assigned from it; otherwise "string". A template that
  does not parse counts as "string". An operator can override it per model.
- Content parts. A string content is one text part; ``None`` is no parts. Text parts are
  ``text``, ``input_text``, ``output_text`` (their ``text``), ``refusal`` (``refusal``) and
  ``thinking`` (``thinking``); a ``text`` or ``refusal`` part whose value is missing is
  skipped (the others keep a null text in "openai" format). In "string" format the texts
  are joined with ``"\\n"``; in "openai" format each becomes ``{"type": "text", "text":
  ...}`` (a plain string content too). ``tool_reference`` parts render as their ``name``.
  Media parts (images, audio, video, embeddings) cannot be reproduced without the model's
  processor: see `UntokenizableContent`.
- Messages are rebuilt with only the fields templates see: role, content, then for
  assistants ``tool_calls`` (when not null) and ``reasoning`` (also as
  ``reasoning_content``; a request's ``reasoning_content`` is read as ``reasoning``), for
  tools ``tool_call_id`` (and list content flattened to one string when it is all text),
  ``name`` and ``task`` when strings, and ``tools`` for developer messages.
- ``tool_calls[].function.arguments`` given as a JSON string is parsed into an object, as
  transformers' tool-use templates expect; a string that is not JSON, or a value that is
  neither an object nor a list, becomes ``{}``. An empty ``tool_calls`` list is dropped.
- ``tools`` reach the template as vLLM's pydantic models dump them: ``{"type": "function",
  "function": {"name", "description", "parameters", "strict", ...extra}, ...extra}`` with
  ``null`` for the missing optional fields.
- ``chat_template_kwargs`` are overridden by the request's own ``add_generation_prompt``,
  ``continue_final_message``, ``documents`` (when not null) and ``reasoning_effort`` (when
  not null; it also sets ``enable_thinking`` unless the kwargs do), then filtered to the
  variables the template reads plus transformers' own apply_chat_template parameters;
  ``chat_template`` and ``tokenize`` there are errors.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.meta
import jinja2.nodes

from kvrouter.tokenizer.chat_template import make_environment
from kvrouter.tokenizer.errors import TokenizationRequestError, UntokenizableContent

ContentFormat = Literal["string", "openai"]
CONTENT_FORMATS: tuple[str, ...] = ("auto", "string", "openai")

# Part types whose value is text, and the key it is read from.
_TEXT_PART_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# vLLM skips these (with a warning) when their value is missing, instead of failing.
_SKIP_WHEN_MISSING = frozenset({"text", "refusal"})
# Media part types vLLM knows; each needs the model's multimodal processor to become tokens.
MEDIA_PART_TYPES = frozenset(
    {
        "image_url",
        "input_image",
        "image_pil",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "video_embeds",
        "prompt_embeds",
    }
)
# transformers' apply_chat_template parameters: vLLM passes these through even when the
# template does not mention them (they configure the call, not the template).
HF_APPLY_CHAT_TEMPLATE_PARAMS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_FORBIDDEN_KWARGS = frozenset({"chat_template", "tokenize"})


# -- content format detection ------------------------------------------------------------------


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_key_of(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _is_var(node.node, name)
            and isinstance(node.arg, jinja2.nodes.Const)
            and node.arg.value == key
        )
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _reads(node: jinja2.nodes.Node | None, name: str, key: str | None = None) -> bool:
    """True when `node` is `name` (or `name[key]`), possibly filtered, tested or sliced."""
    if node is None:
        return False
    if isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test):
        return _reads(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _reads(node.node, name, key)
    return _is_key_of(node, name, key) if key else _is_var(node, name)


def _aliases(root: jinja2.nodes.Template, name: str) -> Iterator[str]:
    """`name` and every variable assigned from it (transitively, by `{% set %}`)."""
    yield name
    queue, seen = [name], {name}
    while queue:
        current = queue.pop(0)
        for assign in root.find_all(jinja2.nodes.Assign):
            target = assign.target
            if (
                _reads(assign.node, current)
                and isinstance(target, jinja2.nodes.Name)
                and target.name not in seen
            ):
                seen.add(target.name)
                queue.append(target.name)
                yield target.name


def _loop_targets(root: jinja2.nodes.Template, sources: list[str], key: str | None) -> list[str]:
    targets = []
    for loop in root.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and any(
            _reads(loop.iter, source, key) for source in sources
        ):
            targets.append(loop.target.name)
    return targets


@lru_cache(maxsize=64)
def detect_content_format(source: str) -> ContentFormat:
    """The content format vLLM detects for a chat template ("string" when it cannot tell)."""
    try:
        root = make_environment().parse(source)
    except jinja2.TemplateError:
        return "string"
    message_vars = _loop_targets(root, list(_aliases(root, "messages")), None)
    return "openai" if _loop_targets(root, message_vars, "content") else "string"


@lru_cache(maxsize=64)
def template_variables(source: str) -> frozenset[str]:
    """The undeclared variables a template reads (what chat_template_kwargs may set)."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(make_environment().parse(source)))
    except jinja2.TemplateError:
        return frozenset()


# -- messages ----------------------------------------------------------------------------------


def _part_text(part: Mapping[str, Any], index: str) -> tuple[str | None, Any]:
    """(kind, value) of one content part: kind is "text", "tool_reference" or None to skip.
    Raises UntokenizableContent for media and unknown part types."""
    part_type = part.get("type")
    if part.get("uuid") is None and isinstance(part_type, str):
        if part_type in _TEXT_PART_KEYS:
            value = part.get(_TEXT_PART_KEYS[part_type])
            if value is None and part_type in _SKIP_WHEN_MISSING:
                return None, None
            if value is not None and not isinstance(value, str):
                raise TokenizationRequestError(f"{index}: a {part_type} part needs a string")
            return "text", value
        if part_type == "tool_reference":
            return "tool_reference", part.get("name")
        if part_type in MEDIA_PART_TYPES:
            raise UntokenizableContent(part_type, f"{index} is a {part_type} part")
        raise UntokenizableContent("unknown_part", f"{index} has unknown type {part_type!r}")
    # No type (or a uuid): vLLM recognises a media part by its key.
    for key in MEDIA_PART_TYPES:
        if key in part:
            raise UntokenizableContent(key, f"{index} is a {key} part")
    if part.get("type") is None and "tool_reference" in part:
        return "tool_reference", part.get("name")
    raise UntokenizableContent("unknown_part", f"{index} has no recognised 'type'")


def _content(content: Any, fmt: ContentFormat, index: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        # The common case, without building a part list (same result: one text part).
        return content if fmt == "string" else [{"type": "text", "text": content}]
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise TokenizationRequestError(f"{index}.content must be a string, a list or null")
    texts: list[str] = []
    wrapped: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        where = f"{index}.content[{j}]"
        kind: str | None
        value: Any
        if isinstance(part, str):
            kind, value = "text", part
        elif isinstance(part, Mapping):
            kind, value = _part_text(part, where)
        else:
            raise TokenizationRequestError(f"{where} must be an object or a string")
        if kind is None:
            continue
        if value:
            # vLLM drops falsy strings in "string" format (an empty part adds no "\n"), but
            # keeps the part's dict in "openai" format.
            texts.append(value)
        wrapped.append(
            {"type": "tool_reference", "name": value}
            if kind == "tool_reference"
            else {"type": "text", "text": value}
        )
    if fmt == "openai":
        return wrapped
    return "\n".join(texts)


def _parse_arguments(tool_calls: list[Any]) -> list[Any]:
    out = []
    for call in tool_calls:
        call = copy.deepcopy(call)
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    function["arguments"] = json.loads(arguments)
                except ValueError:
                    function["arguments"] = {}
            elif not isinstance(arguments, dict | list):
                function["arguments"] = {}
        out.append(call)
    return out


def prepare_messages(messages: Sequence[Any], fmt: ContentFormat) -> list[dict[str, Any]]:
    """The conversation vLLM hands to the chat template (copies; the input is not changed).

    Raises TokenizationRequestError for malformed messages and UntokenizableContent for
    content the router cannot reproduce."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TokenizationRequestError("messages must be a list of message objects")
    conversation: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        index = f"messages[{i}]"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizationRequestError(f"{index} must be an object with a string 'role'")
        role = message["role"]
        out: dict[str, Any] = {
            "role": role,
            "content": _content(message.get("content"), fmt, index),
        }
        reasoning = message.get("reasoning")
        if reasoning is None:
            reasoning = message.get("reasoning_content")
        if role == "assistant":
            tool_calls = message.get("tool_calls")
            if tool_calls is not None:
                if not isinstance(tool_calls, list):
                    raise TokenizationRequestError(f"{index}.tool_calls must be a list")
                if tool_calls:
                    out["tool_calls"] = _parse_arguments(tool_calls)
            if reasoning is not None:
                out["reasoning"] = reasoning
                out["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in message:
                out["tool_call_id"] = message["tool_call_id"]
            content = out["content"]
            if isinstance(content, list) and all(part.get("type") == "text" for part in content):
                out["content"] = "\n".join(part["text"] for part in content)
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        if isinstance(message.get("task"), str):
            out["task"] = message["task"]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    return conversation


def prepare_tools(tools: Any) -> list[dict[str, Any]] | None:
    """`tools` as vLLM's pydantic models dump them for the template."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise TokenizationRequestError("tools must be a list")
    if not tools:
        raise TokenizationRequestError("tools must not be an empty array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise TokenizationRequestError(f"tools[{i}] must be an object with a 'function'")
        if tool.get("type", "function") != "function":
            raise TokenizationRequestError(f"tools[{i}].type must be 'function'")
        function = tool["function"]
        if not isinstance(function.get("name"), str):
            raise TokenizationRequestError(f"tools[{i}].function.name must be a string")
        dumped_function = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
            "strict": function.get("strict"),
        }
        dumped_function.update(
            (k, copy.deepcopy(v)) for k, v in function.items() if k not in dumped_function
        )
        dumped = {"type": "function", "function": dumped_function}
        dumped.update((k, copy.deepcopy(v)) for k, v in tool.items() if k not in dumped)
        out.append(dumped)
    return out


def template_kwargs(
    body: Mapping[str, Any], template_source: str | None
) -> tuple[dict[str, Any], bool, bool, Any]:
    """(extra template variables, add_generation_prompt, continue_final_message, documents)
    for a chat request, merged and filtered as vLLM does."""
    user = body.get("chat_template_kwargs")
    if user is None:
        user = {}
    if not isinstance(user, Mapping):
        raise TokenizationRequestError("chat_template_kwargs must be an object")
    forbidden = _FORBIDDEN_KWARGS.intersection(user)
    if forbidden:
        raise TokenizationRequestError(
            f"chat_template_kwargs may not contain {', '.join(sorted(forbidden))}"
        )
    merged: dict[str, Any] = dict(user)
    for name, default in (("add_generation_prompt", True), ("continue_final_message", False)):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise TokenizationRequestError(f"{name} must be a boolean")
        merged[name] = value
    for name in ("documents", "reasoning_effort"):
        value = body.get(name)
        if value is not None and value != "auto":
            merged[name] = value
    effort = body.get("reasoning_effort")
    if effort is not None and "enable_thinking" not in user:
        merged["enable_thinking"] = effort != "none"
    accepted = HF_APPLY_CHAT_TEMPLATE_PARAMS | (
        template_variables(template_source) if template_source is not None else frozenset()
    )
    kept = {k: v for k, v in merged.items() if k in accepted}
    add_generation_prompt = bool(kept.pop("add_generation_prompt", True))
    continue_final_message = bool(kept.pop("continue_final_message", False))
    documents = kept.pop("documents", None)
    for name in HF_APPLY_CHAT_TEMPLATE_PARAMS:
        # The call's own parameters configure transformers; they are not template variables.
        kept.pop(name, None)
    return kept, add_generation_prompt, continue_final_message, documents


def first_untokenizable(messages: Sequence[Any]) -> tuple[int, str] | None:
    """(index of the first message holding content the router cannot reproduce, reason),
    or None when every message is text."""
    for i, message in enumerate(messages):
        try:
            prepare_messages([message], "openai")
        except UntokenizableContent as exc:
            return i, exc.reason
        except TokenizationRequestError:
            return None
    return None


# -- the Responses API -------------------------------------------------------------------------


def _responses_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Flat Responses function tools (``{"type": "function", "name", ...}``) in the chat
    completions shape; built-in tools (web search, MCP, ...) never reach the template."""
    if not tools:
        return None
    if not isinstance(tools, list):
        raise TokenizationRequestError("tools must be a list")
    out = []
    for tool in tools:
        if isinstance(tool, Mapping) and tool.get("type") == "function":
            function = {k: v for k, v in tool.items() if k != "type"}
            out.append({"type": "function", "function": function})
    return out or None


def _item_text(content: Any) -> str:
    """The text vLLM takes from an assistant item's content: the first part's text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        first = content[0]
        if isinstance(first, Mapping):
            text = first.get("text", "")
            return text if isinstance(text, str) else ""
        return first if isinstance(first, str) else ""
    return ""


def _reasoning_text(item: Mapping[str, Any]) -> str:
    for key in ("content", "summary"):
        value = item.get(key)
        if isinstance(value, list) and value:
            first = value[0]
            text = first.get("text", "") if isinstance(first, Mapping) else first
            return text if isinstance(text, str) else ""
    return ""


def responses_to_chat_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses API body as the chat completions body vLLM renders for it.

    ``instructions`` become a leading system message and ``input`` the messages that follow
    (a string is one user message). Items: ``function_call`` becomes an assistant tool call
    (merged into the assistant message before it), ``function_call_output`` a tool message,
    ``reasoning`` the assistant's reasoning, an assistant ``message`` its first text part;
    other messages pass as they are (their ``input_text`` parts are text). A final message
    or reasoning item whose status is ``in_progress`` or ``incomplete`` is continued
    rather than answered. Raises TokenizationRequestError for shapes it cannot read and
    UntokenizableContent for stored state (``previous_response_id``, ``conversation``)
    the router never sees.
    """
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise UntokenizableContent(
                key, f"{key}: the conversation so far is stored on the worker"
            )
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    request_input = body.get("input")
    continue_final = False
    if isinstance(request_input, str):
        messages.append({"role": "user", "content": request_input})
    elif isinstance(request_input, list):
        for i, item in enumerate(request_input):
            if not isinstance(item, Mapping):
                raise TokenizationRequestError(f"input[{i}] must be an object")
            message = _from_item(item, messages[-1] if messages else None)
            if message is not None:
                messages.append(message)
        if request_input:
            last = request_input[-1]
            continue_final = last.get("type", "message") in ("message", "reasoning") and last.get(
                "status"
            ) in ("in_progress", "incomplete")
    else:
        raise TokenizationRequestError("input must be a string or a list of items")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    tools = _responses_tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    if continue_final:
        chat["add_generation_prompt"] = False
        chat["continue_final_message"] = True
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    for key in ("chat_template_kwargs", "add_special_tokens", "cache_salt"):
        if key in body:
            chat[key] = body[key]
    return chat


def _from_item(item: Mapping[str, Any], prev: dict[str, Any] | None) -> dict[str, Any] | None:
    """One Responses input item as a chat message, or None when it was merged into `prev`."""
    assistant = prev if prev is not None and prev.get("role") == "assistant" else None
    kind = item.get("type")
    if kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            "type": "function",
        }
        if assistant is not None:
            calls = assistant.get("tool_calls")
            if calls is None:
                assistant["tool_calls"] = [call]
                return None
            if isinstance(calls, list):
                calls.append(call)
                return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "function_call_output":
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise UntokenizableContent("encrypted_reasoning", "encrypted reasoning content")
        text = _reasoning_text(item)
        if assistant is not None and assistant.get("reasoning") is None:
            assistant["reasoning"] = text
            return None
        return {"role": "assistant", "reasoning": text}
    if item.get("role") == "assistant":
        text = _item_text(item.get("content"))
        if assistant is not None and assistant.get("content") is None:
            assistant["content"] = text
            return None
        return {"role": "assistant", "content": text}
    if not isinstance(item.get("role"), str):
        raise UntokenizableContent(
            "unknown_item", f"input item of type {kind!r} is not a message the router renders"
        )
    return dict(item)
