"""Many simulated workers in one process, and the ready file that tells others where they are.

Ready file / stdout line (one JSON object)::

    {"pid": 1234, "model": "sim-llama-3-8b", "block_size": 16, "num_gpu_blocks": 26624,
     "capacity_tokens": 425984, "time_scale": 1.0, "kv_events": "positional",
     "workers": [{"id": "sim-0", "url": "http://127.0.0.1:8100", "host": "127.0.0.1",
                  "port": 8100, "events_endpoint": "tcp://127.0.0.1:5557",
                  "replay_endpoint": "tcp://127.0.0.1:5558", "topic": "", "dp_rank": 0},
                 ...]}

`events_endpoint` / `replay_endpoint` are null when `--kv-events off`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq.asyncio

from kvrouter.sim.settings import SimSettings
from kvrouter.sim.tokenizer import Tokenizer
from kvrouter.sim.worker import SimWorker, WorkerInfo


@dataclass(frozen=True, slots=True)
class FleetInfo:
    """What a benchmark or test needs to reach a running fleet."""

    pid: int
    model: str
    block_size: int
    num_gpu_blocks: int
    capacity_tokens: int
    time_scale: float
    kv_events: str
    workers: tuple[WorkerInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "model": self.model,
            "block_size": self.block_size,
            "num_gpu_blocks": self.num_gpu_blocks,
            "capacity_tokens": self.capacity_tokens,
            "time_scale": self.time_scale,
            "kv_events": self.kv_events,
            "workers": [w.to_json() for w in self.workers],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FleetInfo:
        """Parse a ready file written by `kvrouter sim --ready-file`."""
        workers = tuple(WorkerInfo(**w) for w in data["workers"])
        return cls(**{**data, "workers": workers})


def read_ready_file(path: str | os.PathLike[str]) -> FleetInfo:
    """Load a fleet's ready file."""
    return FleetInfo.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def write_ready_file(path: str | os.PathLike[str], info: FleetInfo) -> None:
    """Write the ready file atomically, so a poller never reads half of it."""
    target = Path(path)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info.to_json()) + "\n", encoding="utf-8")
    os.replace(tmp, target)


class SimFleet:
    """`settings.workers` workers on the current event loop; `async with` or start/close."""

    def __init__(self, settings: SimSettings, *, tokenizer: Tokenizer | None = None) -> None:
        self.settings = settings
        self._zmq: zmq.asyncio.Context | None = (
            zmq.asyncio.Context() if settings.kv_events != "off" else None
        )
        s = settings
        self.workers: list[SimWorker] = []
        for i in range(s.workers):
            ev = s.kv_events_base_port
            self.workers.append(
                SimWorker(
                    f"sim-{i}",
                    s,
                    port=s.base_port + i if s.base_port else 0,
                    events_port=ev + 2 * i if ev else 0,
                    replay_port=ev + 2 * i + 1 if ev else 0,
                    zmq_ctx=self._zmq,
                    tokenizer=tokenizer,
                    speed=s.speed_of(i),
                    role=s.role(i),
                )
            )
        self.info: FleetInfo | None = None

    async def start(self) -> FleetInfo:
        """Start every worker; on failure the ones already started are stopped again."""
        infos: list[WorkerInfo] = []
        try:
            for worker in self.workers:
                infos.append(await worker.start())
        except BaseException:
            await self.close()
            raise
        s = self.settings
        self.info = FleetInfo(
            pid=os.getpid(),
            model=s.model,
            block_size=s.block_size,
            num_gpu_blocks=s.num_gpu_blocks,
            capacity_tokens=s.num_gpu_blocks * s.block_size,
            time_scale=s.time_scale,
            kv_events=s.kv_events,
            workers=tuple(infos),
        )
        return self.info

    def worker(self, worker_id: str) -> SimWorker:
        """A worker by id (`sim-<i>`)."""
        for w in self.workers:
            if w.worker_id == worker_id:
                return w
        raise KeyError(worker_id)

    async def close(self) -> None:
        """Stop every worker and the ZMQ context. Idempotent."""
        for worker in self.workers:
            await worker.stop()
        if self._zmq is not None:
            self._zmq.destroy(linger=0)  # no socket left open can hold the shutdown
            self._zmq = None

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
