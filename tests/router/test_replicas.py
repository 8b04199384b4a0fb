"""Router replicas behind one front: each starts its round-robin at its own position."""

from __future__ import annotations

import random

from router_node.metrics import Metrics
from router_node.routing import Router
from router_node.settings import RouterSettings, WorkerSpec
from router_node.shared_index import SharedIndex
from router_node.workers import WorkerPool


def _router(seed: int | None) -> Router:
    settings = RouterSettings(
        redis_url="",
        models=("m",),
        workers=tuple(WorkerSpec(f"w{i}", f"http://127.0.0.1:{9000 + i}") for i in range(8)),
        policy="round_robin",
        discovery="static",
    )
    metrics = Metrics()
    rng = None if seed is None else random.Random(seed)
    return Router(settings, WorkerPool(settings), SharedIndex(settings, metrics), metrics, rng)


def test_replicas_start_round_robin_at_different_positions() -> None:
    # Unseeded, as in production: 8 replicas on 8 workers all starting at the same worker
    # would happen with probability 8**-7 if the offsets were random, and always if not.
    starts = {_router(None).sequence % 8 for _ in range(8)}
    assert len(starts) > 1
    # Seeded: reproducible, and the offset does not consume the policies' random draws.
    a, b = _router(7), _router(7)
    assert a.sequence == b.sequence
    assert a.rng.random() == random.Random(7).random()
