"""Pluggable tokenization for the simulated workers' text prompts.

A worker only needs three things from a tokenizer: text to ids, ids to text, and a chat
conversation to ids. `Tokenizer` is that Protocol; `ByteTokenizer` is the deterministic
default (UTF-8 bytes, a trivial chat template) so the simulator has no model files. A real
HF tokenizer with the model's chat template can be dropped in to make the simulator
tokenize exactly like the router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


class ChatFormatError(ValueError):
    """A chat `messages` list that cannot be rendered."""


@runtime_checkable
class Tokenizer(Protocol):
    """What a simulated worker needs to turn text into tokens and back."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids (best effort; used only for response bodies)."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a chat conversation rendered with its template, ready to generate."""
        ...


def message_text(message: Mapping[str, Any]) -> str:
    """The text content of one OpenAI chat message (string or list of text parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ChatFormatError("only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatFormatError("a text content part needs a string 'text'")
            parts.append(text)
        return "".join(parts)
    raise ChatFormatError("message content must be a string or a list of parts")


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255); chat rendered as `<|role|>\\ncontent\\n` turns.

    Deterministic and dependency-free. Equal text prefixes give equal token prefixes, and a
    conversation's turn N renders as an extension of turn N-1, so prefix caching behaves as
    it does with real chat templates.
    """

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        out: list[str] = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ChatFormatError("each message must be an object")
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise ChatFormatError("each message needs a string 'role'")
            out.append(f"<|{role}|>\n{message_text(message)}\n")
        out.append("<|assistant|>\n")
        return self.encode("".join(out))
