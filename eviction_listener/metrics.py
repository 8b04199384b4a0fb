"""The listener's counters, exported through prometheus_client, plus a rate-limited logger.

Counters are plain ints and Counters updated on the event loop (no locks, no per-increment
cost on the hot path); `ListenerCollector` reads them when Prometheus scrapes, into a
registry that belongs to one listener. Names and labels are listed in docs/notices.md
("Metrics").
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from eviction_listener.zmq_source import LogLimiter, SourceStats, add_stats

__all__ = [
    "DeprecatedAliases",
    "ListenerCollector",
    "ListenerMetrics",
    "ListenerState",
    "LogLimiter",
    "registry",
]

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
    tier_blocks: Counter[str] = field(default_factory=Counter)
    """Blocks stored / removed on lower storage tiers (medium CPU, ...), by op."""
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


@dataclass(frozen=True, slots=True)
class ListenerState:
    """The gauges a scrape reads from the listener itself, besides its counters."""

    sources: list[SourceStats]
    owned_workers: int
    live_listeners: int
    ready: bool


_P = "kvrouter_listener_"
# One prefix for both processes (kvrouter_*). The listener's old names stay as aliases for
# one release so dashboards and alerts can move; remove OLD_PREFIX in the release after.
OLD_PREFIX = "kvr_listener_"


def _counter(
    name: str, help_text: str, label: str | None = None, values: Iterable[tuple[str, float]] = ()
) -> CounterMetricFamily:
    fam = CounterMetricFamily(_P + name, help_text, labels=(label,) if label else None)
    for value_label, value in values:
        fam.add_metric((value_label,), value)
    return fam


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(_P + name, help_text, value=value)


class ListenerCollector(Collector):
    """Reads a listener's counters and state at scrape time (prometheus_client's custom
    collector: the counters stay plain ints on the hot path)."""

    def __init__(self, m: ListenerMetrics, state: Callable[[], ListenerState]) -> None:
        self.m = m
        self.state = state

    def collect(self) -> Iterator[Metric]:
        m = self.m
        st = self.state()
        total = SourceStats()
        for s in st.sources:
            add_stats(total, s)
        ev_rate, blk_rate = m.tick_rate()
        live = m.batches - m.replayed_batches
        yield _counter(
            "batches_total",
            "Engine event batches applied.",
            "source",
            [("live", live), ("replay", m.replayed_batches)],
        )
        yield _counter_value(
            "events_total", "Engine events received in delivered batches.", total.events
        )
        yield _counter(
            "blocks_total",
            "Block events (one per block hash) applied.",
            "op",
            [("stored", m.blocks_stored), ("removed", m.blocks_removed)],
        )
        yield _gauge(
            "batches_per_second", "Batches applied per second (last ~10 s).", round(ev_rate, 3)
        )
        yield _gauge(
            "blocks_per_second",
            "Block events applied per second (last ~10 s).",
            round(blk_rate, 3),
        )
        yield _counter(
            "tier_blocks_total",
            "Block events on lower storage tiers (a medium other than GPU) applied, by op.",
            "op",
            sorted(m.tier_blocks.items()),
        )
        yield _counter(
            "skipped_blocks_total",
            "Blocks not indexed, by reason (orphan = parent unknown).",
            "reason",
            sorted(m.skipped_blocks.items()),
        )
        yield _counter(
            "script_ops_total",
            "What the index scripts did, by kind.",
            "kind",
            sorted(m.applied.items()),
        )
        yield _gauge(
            "lag_seconds",
            "Now minus the newest applied batch's engine timestamp.",
            round(m.lag_seconds, 6),
        )
        yield _gauge(
            "notice_lag_seconds",
            "Now minus the newest notice's sender timestamp.",
            round(m.notice_lag_seconds, 6),
        )
        yield _counter_value("gaps_total", "Sequence gaps seen on engine streams.", total.gaps)
        yield _counter(
            "replays_total",
            "Replays from engines' buffers, by outcome.",
            "outcome",
            [("ok", total.replays_ok), ("failed", total.replays_failed)],
        )
        yield _counter_value(
            "restarts_total", "Engine restarts detected (seq went backwards).", total.restarts
        )
        yield _counter_value(
            "duplicates_total", "Live copies of replayed batches dropped.", total.duplicates
        )
        yield _counter(
            "resyncs_total",
            "Workers cleared by the event source, by reason.",
            "reason",
            sorted(total.resyncs.items()),
        )
        yield _counter(
            "clears_total", "Worker clears applied, by cause.", "cause", sorted(m.clears.items())
        )
        errors = [("decode_" + k, float(v)) for k, v in sorted(total.decode_errors.items())]
        errors += [("notice_" + k, float(v)) for k, v in sorted(m.notice_errors.items())]
        errors += [
            ("bad_frames", total.bad_frames),
            ("unknown_topic", total.unknown_topic),
            ("rank_mismatch", total.rank_mismatch),
            ("unknown_event_tag", total.skipped_events),
        ]
        yield _counter("errors_total", "Bad input skipped, by kind.", "kind", errors)
        yield _counter(
            "redis_errors_total",
            "Failed Redis calls (retried), by error.",
            "error",
            sorted(m.redis_errors.items()),
        )
        yield _counter(
            "notices_total",
            "Notices applied, by op.",
            "op",
            [*sorted(m.notices.items()), ("not_mine", m.notices_ignored)],
        )
        yield _gauge(
            "owned_workers", "Workers whose events this listener applies.", st.owned_workers
        )
        yield _gauge(
            "live_listeners", "Listener replicas with a fresh heartbeat.", st.live_listeners
        )
        yield _counter(
            "ownership_changes_total",
            "Workers taken over or handed over.",
            "change",
            [("acquired", m.takeovers), ("released", m.handovers), ("fenced", m.fenced)],
        )
        yield _counter_value("flushes_total", "Flushes (one Redis round trip each).", m.flushes)
        yield _counter_value(
            "flush_seconds_total", "Time spent in flushes.", round(m.flush_seconds, 6)
        )
        yield _gauge(
            "ready", "1 when ready (Redis reachable, ownership current).", 1 if st.ready else 0
        )


def _counter_value(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(_P + name, help_text, value=value)


class DeprecatedAliases(Collector):
    """Every family of `inner` again under its old ``kvr_listener_`` name (HELP says so)."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        for fam in self.inner.collect():
            yield fam
            old = OLD_PREFIX + fam.name.removeprefix(_P)
            alias = Metric(
                old, f"Deprecated alias of {fam.name} (removed in the next release).", fam.type
            )
            alias.samples = [
                s._replace(name=OLD_PREFIX + s.name.removeprefix(_P)) for s in fam.samples
            ]
            yield alias


def registry(m: ListenerMetrics, state: Callable[[], ListenerState]) -> CollectorRegistry:
    """A registry of its own for one listener, holding its `ListenerCollector` (and the old
    names as deprecated aliases)."""
    reg = CollectorRegistry()
    reg.register(DeprecatedAliases(ListenerCollector(m, state)))
    return reg


def render(reg: CollectorRegistry) -> str:
    """The registry in the Prometheus text format 0.0.4."""
    return generate_latest(reg).decode()
