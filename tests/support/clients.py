"""OpenAI clients closed on the test's own loop.

An ``openai.AsyncOpenAI`` nobody closes is closed by its ``__del__`` when the garbage collector
gets to it: that schedules ``aclose()`` on whichever loop runs then, often a later test's or
none, and the suite logs "Task exception was never retrieved ... Event loop is closed". Wrap a
client in `closed_after_test` and the autouse fixture in tests/conftest.py closes it when the
test ends.
"""

from __future__ import annotations

from openai import AsyncOpenAI

_CLIENTS: list[AsyncOpenAI] = []


def closed_after_test(client: AsyncOpenAI) -> AsyncOpenAI:
    """`client`, closed when the test that made it ends."""
    _CLIENTS.append(client)
    return client


async def close_clients() -> None:
    """Close every client registered since the last call."""
    while _CLIENTS:
        await _CLIENTS.pop().close()
