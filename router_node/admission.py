"""Priority admission: interactive requests go ahead of batch ones when a model's workers are
saturated, as llm-d's flow control and Dynamo's queue do, with the queue in the router.

Off unless ``worker_max_inflight`` is set. Then each model has ``worker_max_inflight`` slots
per worker that can take it (on this replica). A request holds a slot from the end of its
tokenization to the end of its response. Interactive requests may fill every slot; batch
requests only ``batch_share`` of them, so a burst of batch work leaves room for interactive
requests to start at once instead of queueing behind it. Waiting requests are admitted
interactive first (in arrival order), then batch; beyond ``priority_queue_max`` waiting, a
request gets 503 with ``Retry-After`` at once.

A request's priority comes from the ``x-kvrouter-priority`` header (``interactive``, the
default, or ``batch``; the name is the ``priority_header`` setting).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITIES = (INTERACTIVE, BATCH)


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass
class _ModelQueue:
    in_use: int = 0
    batch_in_use: int = 0
    waiting: dict[str, deque[asyncio.Future[None]]] = field(
        default_factory=lambda: {p: deque() for p in PRIORITIES}
    )


class Ticket:
    """A held slot; `release` (idempotent) gives it back and admits the next waiter."""

    def __init__(self, admission: Admission | None, model: str, priority: str) -> None:
        self._admission = admission
        self.model = model
        self.priority = priority

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.model, self.priority)


class Admission:
    """Slots per model on this replica; see the module docstring."""

    def __init__(
        self,
        per_worker: int,
        batch_share: float,
        queue_max: int,
        workers_for: Callable[[str], int],
    ) -> None:
        self.per_worker = per_worker
        self.batch_share = batch_share
        self.queue_max = queue_max
        self.workers_for = workers_for
        """Model -> how many workers can take it now (the slots scale with it)."""
        self.models: dict[str, _ModelQueue] = {}

    @property
    def enabled(self) -> bool:
        return self.per_worker > 0

    def waiting(self, model: str | None = None) -> int:
        queues = [self.models[model]] if model in self.models else []
        if model is None:
            queues = list(self.models.values())
        return sum(len(d) for q in queues for d in q.waiting.values())

    def _limits(self, model: str) -> tuple[int, int]:
        slots = self.per_worker * max(1, self.workers_for(model))
        return slots, max(1, math.floor(slots * self.batch_share))

    def _may_start(self, model: str, q: _ModelQueue, priority: str) -> bool:
        slots, batch_slots = self._limits(model)
        if q.in_use >= slots:
            return False
        if priority == BATCH:
            return q.batch_in_use < batch_slots and not q.waiting[INTERACTIVE]
        return True

    async def admit(self, model: str, priority: str) -> Ticket:
        """Wait for a slot (interactive ahead of batch). Raises QueueFull when the queue is
        at its bound."""
        if not self.enabled:
            return Ticket(None, model, priority)
        q = self.models.setdefault(model, _ModelQueue())
        ahead = q.waiting[INTERACTIVE] if priority == INTERACTIVE else any(q.waiting.values())
        if not ahead and self._may_start(model, q, priority):
            self._take(q, priority)
            return Ticket(self, model, priority)
        if self.waiting() >= self.queue_max:
            raise QueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q.waiting[priority].append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Admitted just as the client left: hand the slot on.
                self._release(model, priority)
            else:
                q.waiting[priority].remove(fut)
            raise
        return Ticket(self, model, priority)

    def _take(self, q: _ModelQueue, priority: str) -> None:
        q.in_use += 1
        if priority == BATCH:
            q.batch_in_use += 1

    def _release(self, model: str, priority: str) -> None:
        q = self.models[model]
        q.in_use -= 1
        if priority == BATCH:
            q.batch_in_use -= 1
        self._wake(model, q)

    def _wake(self, model: str, q: _ModelQueue) -> None:
        for priority in PRIORITIES:
            waiting = q.waiting[priority]
            while waiting and self._may_start(model, q, priority):
                fut = waiting.popleft()
                if fut.done():
                    continue
                self._take(q, priority)
                fut.set_result(None)
