"""Typed errors of the tokenizer package.

Two families, because the router treats them differently: `TokenizerLoadError` is an operator
problem found at start-up (bad path, bad files), while `TokenizationRequestError` and its
subclasses are caused by one request's content and become an HTTP 400 for that request only.
"""

from __future__ import annotations

from pathlib import Path


class TokenizerError(Exception):
    """Base class of every error raised by `kvrouter.tokenizer`."""


class TokenizerLoadError(TokenizerError):
    """A tokenizer directory or file cannot be loaded. Names the path and what is wrong."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load tokenizer from {self.path}: {reason}")


class TokenizationRequestError(TokenizerError):
    """The request's prompt or messages cannot be tokenized; the router answers 400.

    `str(err)` is a message fit for the client: it says what is wrong with the request and
    never includes server paths.
    """


class ChatTemplateError(TokenizationRequestError):
    """Rendering the chat template failed: no template, a template error or a bad argument."""


class InvalidTokenIdsError(TokenizationRequestError):
    """A pre-tokenized prompt holds something other than integers in [0, vocab_size)."""


class UntokenizableContent(TokenizerError):
    """The request holds content the router cannot turn into the engine's exact tokens
    (images, audio, video, embeddings, content part types it does not know).

    Not a client error: the engine may well serve it. `reason` is a short label for the
    metric (the part type, or "unknown_part"); the router routes on the text before it, or
    on load, and never on keys it cannot trust."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
