"""The reference the parity tests hold the router to: transformers' own apply_chat_template
and tokenizer, fed the conversation vLLM builds from an OpenAI request.

The request rules below are written out again, independently of
kvrouter/tokenizer/preprocess.py, from vLLM's source (the files and commits listed in
docs/tokenization.md): if the router's implementation drifts from them, the property tests
see different tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TEXT_KEY = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
TEXT_KEY["thinking"] = "thinking"


def load(directory: Path) -> PreTrainedTokenizerBase:
    """transformers' tokenizer for a test tokenizer directory (local files only)."""
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _texts(content: Any) -> list[str | None]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    out: list[str | None] = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
            continue
        kind = part["type"]
        value = part.get(TEXT_KEY[kind])
        if value is None and kind in ("text", "refusal"):
            continue  # vLLM skips it
        out.append(value)
    return out


def vllm_message(message: dict[str, Any], content_format: str) -> dict[str, Any]:
    texts = _texts(message.get("content"))
    if content_format == "openai":
        content: Any = [{"type": "text", "text": t} for t in texts]
    else:
        content = "\n".join(t for t in texts if t)
    out: dict[str, Any] = {"role": message["role"], "content": content}
    if message["role"] == "assistant":
        calls = message.get("tool_calls")
        if calls:
            out["tool_calls"] = []
            for call in calls:
                call = json.loads(json.dumps(call))
                arguments = call["function"].get("arguments")
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        arguments = {}
                elif not isinstance(arguments, dict | list):
                    arguments = {}
                call["function"]["arguments"] = arguments
                out["tool_calls"].append(call)
        reasoning = message.get("reasoning", message.get("reasoning_content"))
        if reasoning is not None:
            out["reasoning"] = out["reasoning_content"] = reasoning
    if message["role"] == "tool":
        if "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(out["content"], list):
            out["content"] = "\n".join(p["text"] for p in out["content"])
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def vllm_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    dumped = []
    for tool in tools:
        fn = tool["function"]
        function = {
            "name": fn["name"],
            "description": fn.get("description"),
            "parameters": fn.get("parameters"),
            "strict": fn.get("strict"),
        }
        dumped.append({"type": "function", "function": function})
    return dumped


def chat_ids(hf: PreTrainedTokenizerBase, body: dict[str, Any], content_format: str) -> list[int]:
    """The prompt token ids vLLM computes for a chat completions body."""
    conversation = [vllm_message(m, content_format) for m in body["messages"]]
    kwargs = dict(body.get("chat_template_kwargs") or {})
    effort = body.get("reasoning_effort")
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        kwargs.setdefault("enable_thinking", effort != "none")
    prompt = hf.apply_chat_template(
        conversation,
        tools=vllm_tools(body.get("tools")),
        documents=body.get("documents"),
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        tokenize=False,
        **kwargs,
    )
    ids: list[int] = hf(prompt, add_special_tokens=body.get("add_special_tokens", False))[
        "input_ids"
    ]
    return ids


def completion_ids(hf: PreTrainedTokenizerBase, prompt: str, add_special_tokens: bool) -> list[int]:
    """The prompt token ids vLLM computes for a completions prompt string."""
    ids: list[int] = hf(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return ids


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages vLLM builds from a Responses API body (instructions, a string
    input, message items, function calls merged into the assistant turn before them, and
    function call outputs as tool messages)."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items:
        prev = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if item.get("type") == "function_call":
            call = {
                "id": item["call_id"],
                "function": {"name": item["name"], "arguments": item["arguments"]},
                "type": "function",
            }
            if prev is not None:
                prev.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif item.get("type") == "function_call_output":
            messages.append(
                {"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]}
            )
        else:
            messages.append(dict(item))
    return messages


def responses_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    return [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
        for t in tools
        if t.get("type") == "function"
    ]
