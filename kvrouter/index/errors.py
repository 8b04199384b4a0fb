"""Errors of the index layer. Lua scripts reply ``KVR <code> <argument>: <message>``; the codes
are mirrored here once and turned into typed exceptions in one place (``from_reply``)."""

from __future__ import annotations

from enum import IntEnum


class ScriptErrorCode(IntEnum):
    BAD_WORKER = -1
    BAD_BLOCKS = -2
    BAD_ARGUMENT = -3


class IndexError_(Exception):
    """Base of everything the index layer raises on purpose."""


class ScriptArgumentError(IndexError_, ValueError):
    """A script argument was rejected (by the Python wrapper or by the script itself)."""

    def __init__(self, argument: str, message: str, code: ScriptErrorCode | None = None) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.code = code if code is not None else ScriptErrorCode.BAD_ARGUMENT


class ScriptReplyError(IndexError_):
    """A script failed in a way that is not a bad argument (should not happen; logged)."""


def from_reply(message: str) -> IndexError_ | None:
    """Turn a ``KVR <code> <argument>: <message>`` error reply into a typed exception.

    Returns None when the message is not one of ours (the caller re-raises the original).
    """
    # redis-py may prefix the reply with the script location; find our marker anywhere.
    at = message.find("KVR ")
    if at < 0:
        return None
    rest = message[at + 4 :]
    code_text, _, tail = rest.partition(" ")
    try:
        code = ScriptErrorCode(int(code_text))
    except ValueError:
        return ScriptReplyError(message)
    argument, _, text = tail.partition(": ")
    return ScriptArgumentError(argument.strip(), text.strip(), code)
