"""Fault and hostile-input tests: a collector of measured figures, and the report it writes.

Tests call ``reliability.add(section, row)`` with what they measured. With
``--reliability-report PATH`` the session ends by writing PATH (docs/reliability.md) from
those rows: the table is always the figures of the run that wrote it, never typed by hand.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SECTIONS = {
    "faults": "Faults under a steady load",
    "hostile": "Hostile input",
    "security": "Security",
    "soak": "Soak",
}

INTRO = """\
# Reliability: faults, hostile input and security, measured

**Generated** by `{command}` on {date} ({machine}). Do not edit by hand: rerun the
command. Every row is one test of `tests/faults/` against real processes on loopback
(redis-server {redis}, `kvrouter sim` workers, `kvrouter listen`, `kvrouter serve`); the
figures are what that run measured, and "reproduce" is the command that runs that test alone.

Fault figures: **failed** = requests that did not complete (non-200, or a stream without
`[DONE]` or with an error event), not counting **excused** ones (streams already running on
a worker when it was killed: they end with an OpenAI-style error event and `[DONE]`, the only
loss the design allows); **recovery** = seconds from the heal (or the fault, for worker
faults) until the router's `/ready` is `ready` and a request sent after that hit the shared
index (`x-kvrouter-matched-tokens` > 0); **stale** = residency records still naming the dead or
restarted worker after the clear grace period (`kvr:{{m}}:wrk:<worker>`; `-` where no worker
died). The load: 4 to 6 concurrent clients replaying 6 conversations that share 48-token
prefixes (half streaming); router health checks every 0.3 s, clear grace 1.5 s
(`tests/support/faults.py`, `FAST_ROUTER_ENV`).
"""


@dataclass
class Collector:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(section, []).append(row)


_COLLECTOR = Collector()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        default=None,
        help="write the measured fault/hostile-input/security table to this markdown file",
    )


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Collector]:
    """``reliability.add(section, {...})``: a row of the report, tagged with this test."""
    yield _COLLECTOR
    nodeid = request.node.nodeid
    for rows in _COLLECTOR.rows.values():
        for row in rows:
            row.setdefault("reproduce", f'PYTHONPATH=. python -m pytest "{nodeid}" -m ""')


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "?"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for part in out.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return "?"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "not recovered" if v != v else f"{v:.2f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "reproduce"]
    cols.append("reproduce")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_cell(r.get(c)) for c in cols[:-1]] + [f"`{r.get('reproduce', '')}`"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--reliability-report")
    if not path or not _COLLECTOR.rows:
        return
    import shlex
    import sys

    soak = os.environ.get("KVR_SOAK_S")
    command = (f"KVR_SOAK_S={soak} " if soak else "") + "PYTHONPATH=. python -m pytest "
    command += shlex.join(sys.argv[1:])
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
    machine += f"Python {platform.python_version()}"
    parts = [
        INTRO.format(
            command=command,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            machine=machine,
            redis=_redis_version(),
        )
    ]
    extra = Path(__file__).with_name("reliability_notes.md")
    for key, title in SECTIONS.items():
        if key in _COLLECTOR.rows:
            parts.append(f"## {title}\n\n{_table(_COLLECTOR.rows[key])}\n")
    if extra.exists():
        parts.append(extra.read_text(encoding="utf-8"))
    Path(path).write_text("\n".join(parts), encoding="utf-8")
