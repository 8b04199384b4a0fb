"""Start and stop a real redis-server process on loopback.

The demo uses this to run on an embedded default, the benchmarks to get a private server, and
the test suite for its fixtures (including killing and restarting servers in fault tests; the
tests' Redis Cluster, tests/support/redis_cluster.py, is built from these servers).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "install redis-server (Debian/Ubuntu: apt-get install redis-server redis-tools)"


class RedisUnavailable(RuntimeError):
    """No redis-server binary, or it would not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1, for processes started together: each bound
    while the others are, so no two are the same (successive `free_port` calls can return
    one port twice, since nothing holds it until its process binds it)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RedisUnavailable(
                f"redis-server on port {port} exited with code {proc.returncode}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RedisUnavailable(f"redis-server on port {port} did not listen within {timeout} s")


@dataclass
class RedisServer:
    """One redis-server child process. ``start()`` again after ``kill()`` reuses the port."""

    port: int = 0
    args: Sequence[str] = ()
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server, or do nothing if it runs: ``with RedisServer().start() as r``
        used to start a second one on the same port, which failed to bind while the first,
        no longer referenced, outlived the test."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable(f"redis-server not found on PATH: {INSTALL_HINT}")
        if self.port == 0:
            self.port = free_port()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kvr-redis-")
            self.workdir = Path(self._tmp.name)
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, timeout, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: the abrupt failure fault tests want."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
