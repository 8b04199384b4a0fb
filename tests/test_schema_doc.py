"""docs/redis-schema.md is executable: each `$ redis-cli ...` line runs with the real
redis-cli against a real server holding the documented example, and its output must match
the lines the doc shows under it (timestamps and TTLs normalized)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kvrouter.index.connection import connect
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import EngineBlock, ResidencyIndex

DOC = Path(__file__).resolve().parent.parent / "docs" / "redis-schema.md"
pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(
        shutil.which("redis-cli") is None,
        reason="redis-cli not on PATH (apt-get install redis-tools)",
    ),
]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line inside ```console blocks."""
    out: list[tuple[str, list[str]]] = []
    in_block = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```console"):
            in_block = True
        elif line.startswith("```"):
            in_block = False
        elif in_block and line.startswith("$ "):
            out.append((line[2:], []))
        elif in_block and out:
            out[-1][1].append(line)
    return out


def normalize(lines: list[str]) -> list[str]:
    return [re.sub(r"\d{10,}", "<t>", ln.rstrip()) for ln in lines if ln.strip()]


async def populate(url: str) -> None:
    """The example the doc describes, at the real current time."""
    now = int(time.time() * 1000)
    client = connect(url)
    await client.flushall()
    idx = ResidencyIndex(client)
    keys = BlockHasher("llama-3-8b", block_size=16).keys(list(range(64)))
    await idx.record("llama-3-8b", "vllm-0:8000", keys, ttl_new_ms=600_000, now_ms=now)
    await idx.record("llama-3-8b", "vllm-1:8000", keys[:2], ttl_new_ms=30_000, now_ms=now + 1500)
    await idx.evict("llama-3-8b", "vllm-0:8000", [keys[3]], mark_holes=True, now_ms=now + 2000)
    await idx.store_engine_blocks(
        "llama-3-8b",
        "vllm-1:8000",
        [EngineBlock(17705339885301241772, None, keys[0])],
        ttl_ms=600_000,
        now_ms=now + 2100,
    )
    await idx.acquire_lease(
        "llama-3-8b", "vllm-0:8000", "7f3a9c", prefill_tokens=48, ttl_ms=300_000, now_ms=now
    )
    await client.aclose()


def test_doc_has_commands() -> None:
    cmds = documented_commands()
    assert len(cmds) >= 12
    assert all("redis-cli" in c for c, _ in cmds)


def test_documented_redis_cli_commands(redis_url: str) -> None:
    asyncio.run(populate(redis_url))
    port = urlsplit(redis_url).port
    for command, expected in documented_commands():
        # Every redis-cli in the line talks to the test server; --no-raw gives the same
        # formatting a terminal shows (unless the doc asks for --raw).
        shell = re.sub(r"\bredis-cli\b(?! --raw)", f"redis-cli -p {port} --no-raw", command)
        shell = shell.replace("redis-cli --raw", f"redis-cli -p {port} --raw")
        res = subprocess.run(
            ["bash", "-c", shell], capture_output=True, text=True, timeout=20, check=False
        )
        assert res.returncode == 0, f"{command}\n{res.stderr}"
        assert "ERR" not in res.stdout and "(error)" not in res.stdout, f"{command}\n{res.stdout}"
        got = normalize(res.stdout.splitlines())
        if not expected:
            assert got, f"{command} printed nothing"
            continue
        want = normalize(expected)
        if "--scan" in command:
            assert sorted(got) == sorted(want), command
        else:
            assert got == want, f"{command}\n got: {got}\nwant: {want}"
