"""A real Redis Cluster of redis-server processes on loopback, for the tests' fixtures and
fault scenarios (a primary killed, a replica promoted)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

from kvrouter.redisproc import INSTALL_HINT, RedisServer, RedisUnavailable, free_port


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
