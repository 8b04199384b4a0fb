"""Shared pieces of the benchmarks: percentiles, a private redis-server, the JSON last line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kvrouter.redisproc import RedisServer, RedisUnavailable


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


@contextmanager
def redis_server(extra: Sequence[str] = ()) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port; yields its URL.

    Uses REDIS_URL instead when set (the benchmark then flushes that database: point it at a
    scratch server only).
    """
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    try:
        with RedisServer(args=tuple(extra)) as server:
            yield server.url
    except RedisUnavailable as exc:
        raise SystemExit(str(exc)) from None


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    """Rows of as many columns as `header`, left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def emit_json(obj: dict[str, Any]) -> None:
    """The last stdout line of every benchmark: one JSON object."""
    print(json.dumps(obj, sort_keys=False), flush=True)
