"""The demo's fallback when no redis-server is installed: fakeredis over TCP, with Lua. It
rejects the scripts' `#!lua` flags line; the index notices once and runs them without it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kvrouter.index.connection import connect
from kvrouter.index.scripts import EngineBlock, ResidencyIndex
from kvrouter.redisproc import free_port

fakeredis = pytest.importorskip("fakeredis", reason="pip install 'fakeredis[lua]' (the demo extra)")
pytest.importorskip("lupa", reason="fakeredis needs lupa for Lua: pip install 'fakeredis[lua]'")


@pytest.fixture
def fake_url() -> Iterator[str]:
    port = free_port()
    server = fakeredis.TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{port}/0"
    server.shutdown()
    server.server_close()


async def test_index_runs_on_fakeredis(fake_url: str) -> None:
    client = connect(fake_url)
    idx = ResidencyIndex(client)
    keys = list(range(1, 41))
    await idx.load()  # fakeredis accepts the flags line here and fails only when run
    await idx.record("m", "w1", keys, ttl_new_ms=60_000)
    assert not any(s.source.startswith("#!") for s in idx.scripts.values())
    await idx.record("m", "w2", keys[:10], ttl_new_ms=60_000)
    assert (await idx.lookup("m", keys)).depths == {"w1": 40, "w2": 10}
    await idx.evict("m", "w1", [keys[20]])
    assert (await idx.lookup("m", keys)).depth("w1") == 20
    blocks = [EngineBlock(1, None, keys[0]), EngineBlock(2, 1, keys[1])]
    assert (await idx.store_engine_blocks("m", "w3", blocks, ttl_ms=60_000)).stored == 2
    assert (await idx.release_engine_blocks("m", "w3", [2])).removed == 1
    assert await idx.clear_worker("m", "w2") == 10
    assert (await idx.lookup("m", keys)).depths == {"w1": 20, "w3": 1}
    await client.aclose()
