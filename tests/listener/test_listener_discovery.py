"""Engines from the worker registry in Redis (KVR_DISCOVERY=redis)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from eviction_listener.discovery import RedisRegistryDiscovery
from kvrouter.index.keys import KeySchema

pytestmark = pytest.mark.redis


async def test_registry_entries_with_kv_events(redis_client: Any) -> None:
    schema = KeySchema()
    now = int(time.time() * 1000)
    entries = {
        "a": {
            "url": "http://a:8000",
            "models": ["m"],
            "kv_events": {"endpoint": "tcp://a:5557", "replay": "tcp://a:5558"},
        },
        "a#dp1": {
            "url": "http://a:8001",
            "kv_events": {"endpoint": "tcp://a:5558", "block_size": 32},
        },
        "other-model": {
            "url": "http://b:8000",
            "models": ["x"],
            "kv_events": {"endpoint": "tcp://b:5557"},
        },
        "no-events": {"url": "http://c:8000"},
        "stale": {"url": "http://d:8000", "kv_events": {"endpoint": "tcp://d:5557"}},
        "broken": {"url": "http://e:8000", "kv_events": {"endpoint": "nonsense"}},
    }
    for wid, desc in entries.items():
        await redis_client.hset(schema.registry, wid, json.dumps(desc))
        await redis_client.zadd(schema.heartbeats, {wid: now - (10**6 if wid == "stale" else 0)})
    specs = await RedisRegistryDiscovery(redis_client, schema, "m").engines()
    by_id = {w: s for s in specs for w in s.worker_ids()}
    assert set(by_id) == {"a", "a#dp1"}
    assert by_id["a"].replay_endpoint == "tcp://a:5558"
    (ep,) = by_id["a#dp1"].endpoints()
    assert (ep.endpoint, ep.dp_rank, by_id["a#dp1"].block_size) == ("tcp://a:5558", 1, 32)
