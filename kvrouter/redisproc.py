"""Start and stop real redis-server processes on loopback: one server, or a Redis Cluster.

The demo uses this to run on an embedded default, the benchmarks to get a private server, and
the test suite for its fixtures (including killing and restarting servers in fault tests).
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is also free and below 65536."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RedisUnavailable("no free port pair (port, port + 10000) for a cluster node")


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


@dataclass
class RedisClusterProcs:
    """A Redis Cluster of `masters` primaries (and `replicas` per primary) on loopback."""

    masters: int = 3
    replicas: int = 0
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterProcs:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisUnavailable(f"redis-cli not found on PATH: {INSTALL_HINT}")
        total = self.masters * (1 + self.replicas)
        for _ in range(total):
            node = RedisServer(
                port=free_cluster_port(),
                args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    # Replicas sync at once (the default waits 5 s for more replicas): a
                    # replica that never synced will not be promoted when its master dies.
                    "--repl-diskless-sync-delay",
                    "0",
                ),
            )
            self.nodes.append(node.start())
        create = [
            cli,
            "--cluster",
            "create",
            *[f"127.0.0.1:{n.port}" for n in self.nodes],
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        res = subprocess.run(create, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            self.close()
            raise RedisUnavailable(
                f"redis-cli --cluster create failed: {res.stdout[-500:]} {res.stderr[-500:]}"
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [self._cluster_state(cli, n.port) for n in self.nodes]
            if all(s == "ok" for s in states) and all(
                self._replica_synced(cli, n.port) for n in self.nodes
            ):
                return self
            time.sleep(0.1)
        self.close()
        raise RedisUnavailable(
            "the cluster did not reach cluster_state:ok with every replica in sync"
        )

    @staticmethod
    def _cli(cli: str, port: int, *args: str) -> str:
        """What `redis-cli -p <port> <args>` prints (empty if it fails)."""
        res = subprocess.run(
            [cli, "-p", str(port), *args], capture_output=True, text=True, timeout=5, check=False
        )
        return res.stdout

    @classmethod
    def _cluster_state(cls, cli: str, port: int) -> str:
        for line in cls._cli(cli, port, "cluster", "info").splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    @classmethod
    def _replica_synced(cls, cli: str, port: int) -> bool:
        """True for a primary, or a replica whose link to its primary is up (synced)."""
        info = cls._cli(cli, port, "info", "replication")
        return "role:slave" not in info or "master_link_status:up" in info

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        self.nodes.clear()

    def __enter__(self) -> RedisClusterProcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
