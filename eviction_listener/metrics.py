"""The listener's counters and their Prometheus text exposition, plus a rate-limited logger.

Counters are plain ints and Counters updated on the event loop (no locks); the HTTP handler
renders them on demand. Names and labels are listed in docs/notices.md ("Metrics").
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from eviction_listener.zmq_source import LogLimiter, SourceStats, add_stats

__all__ = ["ListenerMetrics", "LogLimiter", "render"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ListenerMetrics:
    """Everything the listener counts (monotonic unless named as a gauge)."""

    batches: int = 0
    replayed_batches: int = 0
    blocks_stored: int = 0
    """Blocks of GPU BlockStored events handed to the index (before orphan/skip checks)."""
    blocks_removed: int = 0
    skipped_blocks: Counter[str] = field(default_factory=Counter)
    clears: Counter[str] = field(default_factory=Counter)
    notices: Counter[str] = field(default_factory=Counter)
    notice_errors: Counter[str] = field(default_factory=Counter)
    notices_ignored: int = 0
    """Notices for workers another listener replica is responsible for."""
    notice_reconnects: int = 0
    redis_errors: Counter[str] = field(default_factory=Counter)
    applied: Counter[str] = field(default_factory=Counter)
    """What the scripts did: stored, duplicates, released, removed, unknown, holes, ..."""
    fenced: int = 0
    already_applied: int = 0
    flushes: int = 0
    flush_calls: int = 0
    flush_seconds: float = 0.0
    resolve_round_trips: int = 0
    resolved_parents: int = 0
    dropped_items: int = 0
    """Queued items of workers this listener gave up before they were applied."""
    takeovers: int = 0
    handovers: int = 0
    lag_seconds: float = 0.0
    """Gauge: now minus the newest applied batch's engine timestamp."""
    notice_lag_seconds: float = 0.0
    _window: deque[tuple[float, int, int]] = field(default_factory=deque)

    def observe_lag(self, lag: float) -> None:
        self.lag_seconds = lag

    def observe_notice_lag(self, lag: float) -> None:
        self.notice_lag_seconds = lag

    def tick_rate(self) -> tuple[float, float]:
        """(events/s, blocks/s) over the last ~10 s, sampled at each call."""
        now = time.monotonic()
        blocks = self.blocks_stored + self.blocks_removed
        w = self._window
        w.append((now, self.batches, blocks))
        while len(w) > 2 and now - w[0][0] > 10.0:
            w.popleft()
        t0, b0, k0 = w[0]
        dt = now - t0
        if dt <= 0:
            return 0.0, 0.0
        return (self.batches - b0) / dt, (blocks - k0) / dt


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(
            f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
            for k, v in labels.items()
        )
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def render(
    m: ListenerMetrics,
    sources: Iterable[SourceStats],
    *,
    owned_workers: int,
    live_listeners: int,
    ready: bool,
) -> str:
    """Prometheus text format 0.0.4."""
    total = SourceStats()
    for s in sources:
        add_stats(total, s)
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(samples)

    p = "kvr_listener_"
    ev_rate, blk_rate = m.tick_rate()
    metric(
        p + "batches_total",
        "counter",
        "Engine event batches applied.",
        [
            _line(p + "batches_total", m.batches - m.replayed_batches, {"source": "live"}),
            _line(p + "batches_total", m.replayed_batches, {"source": "replay"}),
        ],
    )
    metric(
        p + "events_total",
        "counter",
        "Engine events received in delivered batches.",
        [_line(p + "events_total", total.events)],
    )
    metric(
        p + "blocks_total",
        "counter",
        "Block events (one per block hash) applied.",
        [
            _line(p + "blocks_total", m.blocks_stored, {"op": "stored"}),
            _line(p + "blocks_total", m.blocks_removed, {"op": "removed"}),
        ],
    )
    metric(
        p + "batches_per_second",
        "gauge",
        "Batches applied per second (last ~10 s).",
        [_line(p + "batches_per_second", round(ev_rate, 3))],
    )
    metric(
        p + "blocks_per_second",
        "gauge",
        "Block events applied per second (last ~10 s).",
        [_line(p + "blocks_per_second", round(blk_rate, 3))],
    )
    metric(
        p + "skipped_blocks_total",
        "counter",
        "Blocks not indexed, by reason (orphan = parent unknown).",
        [
            _line(p + "skipped_blocks_total", v, {"reason": k})
            for k, v in sorted(m.skipped_blocks.items())
        ],
    )
    metric(
        p + "script_ops_total",
        "counter",
        "What the index scripts did, by kind.",
        [_line(p + "script_ops_total", v, {"kind": k}) for k, v in sorted(m.applied.items())],
    )
    metric(
        p + "lag_seconds",
        "gauge",
        "Now minus the newest applied batch's engine timestamp.",
        [_line(p + "lag_seconds", round(m.lag_seconds, 6))],
    )
    metric(
        p + "notice_lag_seconds",
        "gauge",
        "Now minus the newest notice's sender timestamp.",
        [_line(p + "notice_lag_seconds", round(m.notice_lag_seconds, 6))],
    )
    metric(
        p + "gaps_total",
        "counter",
        "Sequence gaps seen on engine streams.",
        [_line(p + "gaps_total", total.gaps)],
    )
    metric(
        p + "replays_total",
        "counter",
        "Replays from engines' buffers, by outcome.",
        [
            _line(p + "replays_total", total.replays_ok, {"outcome": "ok"}),
            _line(p + "replays_total", total.replays_failed, {"outcome": "failed"}),
        ],
    )
    metric(
        p + "restarts_total",
        "counter",
        "Engine restarts detected (seq went backwards).",
        [_line(p + "restarts_total", total.restarts)],
    )
    metric(
        p + "duplicates_total",
        "counter",
        "Live copies of replayed batches dropped.",
        [_line(p + "duplicates_total", total.duplicates)],
    )
    metric(
        p + "resyncs_total",
        "counter",
        "Workers cleared by the event source, by reason.",
        [_line(p + "resyncs_total", v, {"reason": k}) for k, v in sorted(total.resyncs.items())],
    )
    metric(
        p + "clears_total",
        "counter",
        "Worker clears applied, by cause.",
        [_line(p + "clears_total", v, {"cause": k}) for k, v in sorted(m.clears.items())],
    )
    errors = [
        _line(p + "errors_total", v, {"kind": "decode_" + k})
        for k, v in sorted(total.decode_errors.items())
    ]
    errors += [
        _line(p + "errors_total", v, {"kind": "notice_" + k})
        for k, v in sorted(m.notice_errors.items())
    ]
    errors += [
        _line(p + "errors_total", total.bad_frames, {"kind": "bad_frames"}),
        _line(p + "errors_total", total.unknown_topic, {"kind": "unknown_topic"}),
        _line(p + "errors_total", total.rank_mismatch, {"kind": "rank_mismatch"}),
        _line(p + "errors_total", total.skipped_events, {"kind": "unknown_event_tag"}),
    ]
    metric(p + "errors_total", "counter", "Bad input skipped, by kind.", errors)
    metric(
        p + "redis_errors_total",
        "counter",
        "Failed Redis calls (retried), by error.",
        [
            _line(p + "redis_errors_total", v, {"error": k})
            for k, v in sorted(m.redis_errors.items())
        ],
    )
    metric(
        p + "notices_total",
        "counter",
        "Notices applied, by op.",
        [_line(p + "notices_total", v, {"op": k}) for k, v in sorted(m.notices.items())]
        + [_line(p + "notices_total", m.notices_ignored, {"op": "not_mine"})],
    )
    metric(
        p + "owned_workers",
        "gauge",
        "Workers whose events this listener applies.",
        [_line(p + "owned_workers", owned_workers)],
    )
    metric(
        p + "live_listeners",
        "gauge",
        "Listener replicas with a fresh heartbeat.",
        [_line(p + "live_listeners", live_listeners)],
    )
    metric(
        p + "ownership_changes_total",
        "counter",
        "Workers taken over or handed over.",
        [
            _line(p + "ownership_changes_total", m.takeovers, {"change": "acquired"}),
            _line(p + "ownership_changes_total", m.handovers, {"change": "released"}),
            _line(p + "ownership_changes_total", m.fenced, {"change": "fenced"}),
        ],
    )
    metric(
        p + "flushes_total",
        "counter",
        "Flushes (one Redis round trip each).",
        [_line(p + "flushes_total", m.flushes)],
    )
    metric(
        p + "flush_seconds_total",
        "counter",
        "Time spent in flushes.",
        [_line(p + "flush_seconds_total", round(m.flush_seconds, 6))],
    )
    metric(
        p + "ready",
        "gauge",
        "1 when ready (Redis reachable, ownership current).",
        [_line(p + "ready", 1 if ready else 0)],
    )
    return "\n".join(out) + "\n"
