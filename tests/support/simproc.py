"""`kvrouter sim` as a child process, the way the router's end-to-end tests start a fleet."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def sim_process(workdir: Path, *args: str, timeout_s: float = 60.0) -> Iterator[dict[str, Any]]:
    """Run ``kvrouter sim --base-port 0 --ready-file ... <args>``; yield its ready file (the
    workers' ids and URLs) and stop it at the end. Its stderr goes to ``workdir/sim.log``,
    quoted when it exits before it is ready."""
    ready = workdir / "sim.json"
    log_path = workdir / "sim.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrouter", "sim", "--base-port", "0",
             "--ready-file", str(ready), *args],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "kvrouter sim did not start"
                time.sleep(0.05)
            yield json.loads(ready.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
