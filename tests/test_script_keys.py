"""Every key a Lua script touches is declared in its KEYS (issue #17, item 8).

Each script runs here instrumented: every ``redis.call`` in it (its own and the spliced
``_lib.lua`` helpers') goes through a checking wrapper that refuses a key which is neither one
of the call's KEYS nor built from a KEYS entry the script's header declares as a *key prefix*
(``KEYS[n]  head key prefix ...``). Those prefixes are the documented exceptions
(docs/redis-schema.md, "Keys a script touches"): the keys under them are only known inside the
call (the workers a lookup probes come from the head set it reads; the heads a trim or expiry
drops come from the worker's own head set), and a prefix carries the model's hash tag, so every
key built from it lies in the same Cluster slot as the declared ones.

The scripts are the shipped ones with only ``redis.call`` rerouted; they run against the real
standalone server and the 3-master Cluster. A mutated script that builds a key of its own must
fail the check (the last test), so the check is not vacuous.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from importlib import resources
from typing import Any

import pytest
from redis.exceptions import ResponseError

from kvrouter.index.arguments import pack_u64
from kvrouter.index.keys import KeySchema
from kvrouter.index.script_loader import LuaScript, load_scripts
from kvrouter.index.scripts import EngineBlock, RecordCall, ResidencyIndex, ScriptCall
from kvrouter.index.transport import ScriptTransport

M = "model-k"
T0 = int(time.time() * 1000) + 86_400_000
HOUR = 3_600_000

_PREFIX_LINE = re.compile(r"^KEYS\[(\d+)\]\s+[^\n]*\bprefix\b", re.MULTILINE)

# Commands whose every argument is a key; TIME has none; all others used take one key first.
_CHECKER = """
local KVR_ALL_KEYS = {EXISTS = true, UNLINK = true, DEL = true}
local KVR_NO_KEYS = {TIME = true}
local KVR_PREFIXES = {%s}
local function kvr_declared(k)
  for i = 1, #KEYS do
    if k == KEYS[i] then return true end
  end
  for _, i in ipairs(KVR_PREFIXES) do
    local p = KEYS[i]
    if #k > #p and string.sub(k, 1, #p) == p then return true end
  end
  return false
end
local function kvr_call(cmd, ...)
  local up = string.upper(cmd)
  if not KVR_NO_KEYS[up] then
    local args = {...}
    local last = KVR_ALL_KEYS[up] and #args or 1
    for i = 1, last do
      if not kvr_declared(args[i]) then
        error('KVR-UNDECLARED ' .. up .. ' ' .. tostring(args[i]))
      end
    end
  end
  return redis.call(cmd, ...)
end
"""


def prefix_slots(name: str) -> list[int]:
    """The KEYS positions the script's header declares as key prefixes."""
    pkg = resources.files("kvrouter.lua")
    raw = next(
        e.read_text(encoding="utf-8")
        for e in pkg.iterdir()
        if e.name.startswith(f"{name}-") and e.name.endswith(".lua")
    )
    header = raw[: raw.find("]]")]
    return [int(m.group(1)) for m in _PREFIX_LINE.finditer(header)]


def checked(script: LuaScript) -> LuaScript:
    """`script` with every redis.call going through the declared-keys check."""
    first, rest = script.source.split("\n", 1)
    if not first.startswith("#!"):
        first, rest = "", script.source
    body = rest.replace("redis.call(", "kvr_call(")
    assert "redis.pcall(" not in body, "the check covers redis.call only"
    slots = ", ".join(str(i) for i in prefix_slots(script.name))
    return LuaScript(
        name=script.name,
        num_keys=script.num_keys,
        source=f"{first}\n{_CHECKER % slots}{body}",
        read_only=script.read_only,
    )


class CheckedIndex(ResidencyIndex):
    """A ResidencyIndex whose scripts refuse undeclared keys; remembers which scripts ran."""

    def __init__(self, client: Any, scripts: dict[str, LuaScript]) -> None:
        super().__init__(client)
        self.transport = ScriptTransport(client, scripts)
        self.ran: set[str] = set()

    async def call(self, call: ScriptCall) -> Any:
        self.ran.add(call.script.name)
        return await super().call(call)

    _call = call

    async def run_pipeline(self, calls: Any, *, return_exceptions: bool = False) -> list[Any]:
        for c in calls:
            self.ran.add(c.script.name)
        return await super().run_pipeline(calls, return_exceptions=return_exceptions)


@pytest.fixture
def idx(any_client: Any) -> CheckedIndex:
    return CheckedIndex(any_client, {n: checked(s) for n, s in load_scripts().items()})


def test_prefix_declarations_are_the_documented_exceptions() -> None:
    """The scripts that may build keys, and from what: a new exception must be added here,
    in the script's header and in docs/redis-schema.md, or this fails."""
    got = {n: prefix_slots(n) for n in load_scripts() if prefix_slots(n)}
    assert got == {
        "lookup_chain": [1, 2, 4],
        "record_chain": [4],
        "clear_worker": [5],
        "store_engine_blocks": [5],
        "apply_engine_events": [5],
        "lookup_tiers": [1, 2, 3],
    }
    schema = KeySchema().model(M)
    # A prefix carries the model's hash tag: keys built from it share the declared keys' slot.
    for prefix in (
        schema.worker_prefix,
        schema.cut_prefix,
        schema.head_prefix,
        schema.tier_prefix,
        schema.tier_workers_prefix,
    ):
        assert "{" + M + "}" in prefix


async def test_every_script_touches_only_declared_keys(idx: CheckedIndex) -> None:
    chain = [0x1000 + i for i in range(40)]
    other = [0x2000 + i for i in range(8)]
    # Records: held and new parts, a second worker, then a capacity trim that drops heads.
    r = await idx.record(M, "w1", chain, ttl_new_ms=30_000, ttl_held_ms=HOUR, held=8, now_ms=T0)
    assert r.added == 40
    await idx.record(M, "w2", chain[:16], ttl_new_ms=HOUR, now_ms=T0)
    await idx.record(M, "w1", other, ttl_new_ms=HOUR, capacity=20, now_ms=T0 + 1)
    # Expiry: a record written long after w1's 30 s records died drops them and their heads.
    await idx.record(M, "w1", other[:2], ttl_new_ms=HOUR, now_ms=T0 + 120_000)
    got = await idx.lookup(M, chain, now_ms=T0 + 2)
    assert got.depth("w2") == 16
    assert await idx.evict(M, "w2", chain[4:6], now_ms=T0 + 3) == 2
    assert (await idx.lookup(M, chain, now_ms=T0 + 4)).depth("w2") == 4
    # Feedback: w2's engine had 2 blocks of the chain.
    assert await idx.correct_chain(M, "w2", chain[2:4], now_ms=T0 + 4, cut_us=1) == (
        2,
        0,
    )
    assert (await idx.lookup(M, chain, now_ms=T0 + 5)).depth("w2") == 2

    # The listener's scripts.
    blocks = [EngineBlock(500, None, chain[0]), EngineBlock(501, 500, chain[1])]
    stored = await idx.store_engine_blocks(M, "w3", blocks, ttl_ms=HOUR, capacity=4, now_ms=T0)
    assert stored.stored == 2
    resolved = await idx.resolve_engine_blocks(M, "w3", [500, 501, 502])
    assert resolved == [chain[0], chain[1], None]
    await idx.release_engine_blocks(M, "w3", [501], now_ms=T0 + 1)
    claim = await idx.call(idx.claim_worker_call(M, "w4", epoch=1, ttl_ms=HOUR))
    assert claim.claimed
    ops = "RSSDC" + "RS"
    fields = pack_u64([600, chain[0], 601, 600, chain[1], 602, 601, chain[2], 602])
    fields += pack_u64([700, chain[0], 701, 700, chain[1]])
    applied = await idx.call(
        idx.apply_engine_events_call(
            M, "w4", ops, fields, epoch=1, seq=0, ttl_ms=HOUR, capacity=1, now_ms=T0
        )
    )
    assert applied.status == 1
    owner = await idx.call(idx.own_worker_call("w4", "listener-a", lease_ms=60_000))
    assert owner.held

    # Lower storage tiers: stores, a removal, a clear, and the tier lookup.
    tier = await idx.store_tier_blocks(
        M, "w5", "CPU", "SSDC", pack_u64([800, chain[0], 801, chain[1], 801]), ttl_ms=HOUR,
        capacity=1, now_ms=T0,
    )  # fmt: skip
    assert tier.stored == 2
    await idx.store_tier_blocks(
        M, "w5", "CPU", "S", pack_u64([800, chain[0]]), ttl_ms=HOUR, now_ms=T0
    )
    got = await idx.lookup_with_tiers(M, chain, ["CPU", "DISK"], now_ms=T0 + 1)
    assert got.tiers["CPU"]["w5"] == (0, 1)

    # Leases and the rate limit bucket.
    await idx.acquire_lease(M, "w1", "lease1", prefill_tokens=64, ttl_ms=60_000)
    assert await idx.release_lease(M, "w1", "lease1", prefill_tokens=64)
    bucket = KeySchema().rate_bucket("a127.0.0.1")
    allowed, _ = await idx.call(ScriptCall(idx.scripts["take_token"], [bucket], ["5.0", 5, 0]))
    assert int(allowed) == 1

    assert await idx.clear_worker(M, "w1") >= 1
    assert idx.ran == set(load_scripts()), "a script this test does not run is not checked"


async def test_a_script_building_its_own_key_fails_the_check(idx: CheckedIndex) -> None:
    """The check bites: evict_blocks rewritten to also drop the worker's head set, a key it
    builds from its wrk key (same hash tag and slot, so Redis itself would run it), is
    refused."""
    s = load_scripts()["evict_blocks"]
    anchor = "batches(hexes, 1, 'ZREM', lru_key)"
    assert anchor in s.source
    built = anchor + "\nredis.call('UNLINK', (string.gsub(wrk_key, ':wrk:', ':head:@')))"
    mutated = replace(s, source=s.source.replace(anchor, built))
    idx.transport.scripts["evict_blocks"] = checked(mutated)
    await idx.record(M, "w1", [1, 2, 3], ttl_new_ms=HOUR, now_ms=T0)
    with pytest.raises(ResponseError, match=r"KVR-UNDECLARED UNLINK kvr:\{model-k\}:head:@w1"):
        await idx.evict(M, "w1", [3], now_ms=T0 + 1)
    # The same mutation unchecked runs fine: Redis alone would not have caught it.
    idx.transport.scripts["evict_blocks"] = mutated
    assert await idx.evict(M, "w1", [2], now_ms=T0 + 2) == 1


async def test_record_call_keys_match_the_script(idx: CheckedIndex) -> None:
    """A router's record sends plain ZADDs before the script: those keys are the script's
    own KEYS too (wrk and lru), so the record touches nothing undeclared either."""
    call = idx.record_call(M, "w1", [1, 2], ttl_new_ms=HOUR, now_ms=T0)
    assert isinstance(call, RecordCall)
    _, zadds, _ = call.commands(T0 * 1000)
    assert {z[1] for z in zadds} <= set(call.keys)
