"""Security with real processes: Redis over TLS (certificates generated with the openssl CLI)
and an ACL user limited to the `kvr:` keys and channels and the commands kvrouter needs;
admin token checks in constant time; secrets never in logs, repr, /metrics or /ready;
workers only from configured sources."""

from __future__ import annotations

import asyncio
import hmac
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ResidencyIndex
from kvrouter.redisproc import RedisServer, free_port
from router_node.registry import read_registry, register_worker
from tests.support import faults
from tests.support.metrics import parse

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("openssl") is None,
        reason="needs redis-server and openssl",
    ),
]

PASSWORD = "Pw-7f3a9c1e-d0nt-l0g-me"
ADMIN_TOKEN = "Adm-5b2e8d4a-s3cret-t0ken"

# The minimal command set, found from the Lua scripts' redis.call()s and the Python callers
# (docs/reliability.md lists it); the test runs router and listener with exactly this.
KVR_COMMANDS = (
    # connection: ping (health, reconnect), client handshake
    "+ping +hello +auth "
    # scripts: load and run ours only (no EVAL of arbitrary code)
    "+script|load +evalsha +evalsha_ro "
    # called from inside the Lua scripts (ACLs apply there too); zcount also by feedback
    "+exists +hdel +hget +hgetall +hincrby +hmget +hset +pexpire +pexpireat +time +unlink "
    "+zadd +zcard +zcount +zmscore +zrangebyscore +zrem +zremrangebyrank +zremrangebyscore "
    "+zrevrangebyscore +zscore "
    # listener: notices (pub/sub: the model's channel and every worker's own), ownership and
    # the registry read outside scripts
    "+subscribe +unsubscribe +psubscribe +punsubscribe +publish"
)
# Redis checks a PSUBSCRIBE pattern literally against the user's channel patterns, so the
# listener's pattern of the workers' own notice channels is granted as written.
CHANNELS = f"&kvr:* &kvr:{{{faults.MODEL}}}:notices:*"
ACL_RULES = f"on >{PASSWORD} resetkeys ~kvr:* resetchannels {CHANNELS} -@all {KVR_COMMANDS}"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 (SAN IP), signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=kvrouter-test-ca", cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
             cwd=d)  # fmt: skip


class TlsRedis:
    def __init__(self, tmp: Path) -> None:
        make_certs(tmp)
        self.dir = tmp
        self.tls_port = free_port()
        self.server = RedisServer(
            args=(
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(tmp / "server.crt"),
                "--tls-key-file", str(tmp / "server.key"),
                "--tls-ca-cert-file", str(tmp / "ca.crt"),
                "--tls-auth-clients", "no",
            )
        ).start()  # fmt: skip
        # The plain port is the operator's (loopback only): it creates the ACL user.
        self.admin = redis.Redis(port=self.server.port, decode_responses=True)
        self.admin.execute_command("ACL", "SETUSER", "kvr", *ACL_RULES.split())

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://kvr:{password}@127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.ca}"

    def close(self) -> None:
        self.admin.close()
        self.server.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    r = TlsRedis(tmp_path_factory.mktemp("tls"))
    try:
        yield r
    finally:
        r.close()


def _logs(stack: faults.Stack) -> str:
    return "".join(p.read_text(errors="replace") for p in stack.workdir.glob("*.log"))


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


async def test_router_and_listener_over_tls_with_acl_user(
    tls_redis: TlsRedis, reliability: Any
) -> None:
    tls_redis.admin.execute_command("ACL", "LOG", "RESET")
    stack = faults.Stack(
        tls_redis.url(),
        router_env={"KVR_ADMIN_TOKEN": ADMIN_TOKEN, "KVR_LOG_LEVEL": "debug"},
    )
    load = faults.Load("")
    try:
        await stack.start()
        load.url = stack.router_url
        await load.start()
        await asyncio.sleep(2.0)
        # The listener's notice path, through the same ACL user over TLS.
        from eviction_listener.notices import publish_notice
        from kvrouter.index.connection import connect

        c = connect(tls_redis.url())
        try:
            await publish_notice(c, faults.MODEL, "store", "w0", tokens=list(range(64)))
            # Feedback's one read outside scripts (blocks used since a witness: ZCOUNT).
            assert await ResidencyIndex(c).used_since(faults.MODEL, "w0", 0) >= 0
        finally:
            await c.aclose()
        stack.sim("w1").proc.kill()  # the clear path (clear_worker) runs too
        await asyncio.sleep(3.0)
        await load.stop()
        ready = await _get_text(f"{stack.router_url}/ready")
        metrics = await _get_text(f"{stack.router_url}/metrics")
        lmetrics = await _get_text(f"{stack.listener_url}/metrics")
        logs = _logs(stack)
    finally:
        await load.stop()
        await stack.close()
    failed, _ = load.failures("w1", float("inf"))
    hits = sum(o.matched > 0 for o in load.outcomes)
    denied = tls_redis.admin.execute_command("ACL", "LOG")
    assert not denied, denied
    assert '"status": "ready"' in ready and '"redis": "up"' in ready
    assert failed == 0, load.failure_samples()
    assert hits > 0
    assert parse(lmetrics).value("kvr_listener_batches_total", source="live") > 0
    stale = len(await faults.worker_records(tls_redis.server.url, "w1"))
    assert stale == 0
    for secret in (PASSWORD, ADMIN_TOKEN):
        assert secret not in logs
        assert secret not in metrics and secret not in ready
    assert "***" in logs  # the start-up line shows the URL, redacted
    reliability.add("security", {
        "check": "router + listener over TLS (openssl-generated CA) as ACL user `kvr` "
                 "(~kvr:* &kvr:*, the command list below), steady load, a worker killed",
        "result": f"{len(load.outcomes)} requests, {failed} failed, {hits} cache hits; "
                  f"ACL LOG denials: {len(denied)}; records of the dead worker: {stale}; "
                  "password and admin token in logs (debug level), /metrics, /ready: 0",
    })  # fmt: skip


def test_acl_user_is_confined(tls_redis: TlsRedis, reliability: Any) -> None:
    ctx_kwargs = {"ssl": True, "ssl_ca_certs": str(tls_redis.ca)}
    user = redis.Redis(port=tls_redis.tls_port, username="kvr", password=PASSWORD,
                       decode_responses=True, **ctx_kwargs)  # type: ignore[arg-type]  # fmt: skip
    denied = []
    try:
        assert user.ping()
        for cmd in (
            ("SET", "other:key", "1"),
            ("GET", "other:key"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "*"),
            ("KEYS", "*"),
            ("EVAL", "return 1", "0"),
            ("SHUTDOWN",),
            ("SCRIPT", "FLUSH"),
            ("PUBLISH", "other-channel", "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*cmd)
            denied.append(" ".join(cmd[:2]))
    finally:
        user.close()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=tls_redis.tls_port, username="kvr", password="wrong",
                    **ctx_kwargs).ping()  # type: ignore[arg-type]  # fmt: skip
    # Plaintext to the TLS port and TLS with an unknown CA both fail.
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=tls_redis.tls_port, username="kvr", password=PASSWORD,
                    socket_timeout=2).ping()  # fmt: skip
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=tls_redis.tls_port, username="kvr", password=PASSWORD, ssl=True,
                    ssl_cert_reqs=ssl.CERT_REQUIRED, socket_timeout=2).ping()  # fmt: skip
    reliability.add("security", {
        "check": "ACL user `kvr` outside its grant; wrong password; plaintext to the TLS "
                 "port; TLS without the CA",
        "result": "NOPERM for " + ", ".join(denied) + "; WRONGPASS; connection refused "
                  "(plaintext); certificate verify failed (unknown CA)",
    })  # fmt: skip


async def test_wrong_redis_password_is_not_logged(tls_redis: TlsRedis, reliability: Any) -> None:
    wrong = "Wr0ng-pw-9e1d-must-not-leak"
    stack = faults.Stack(tls_redis.url(wrong), listener=False, workers=1,
                         router_env={"KVR_LOG_LEVEL": "debug"})  # fmt: skip
    try:
        await stack.start()
        status = await faults.ready_status(stack.router_url)
        await asyncio.sleep(1.0)
        logs = _logs(stack)
    finally:
        await stack.close()
    assert status == "degraded"
    assert wrong not in logs
    reliability.add("security", {
        "check": "router given a wrong Redis password (debug logging)",
        "result": f"starts, /ready {status} (routes on local load); password in logs: 0",
    })  # fmt: skip


def test_settings_repr_redacts_secrets() -> None:
    from eviction_listener.settings import ListenerSettings
    from router_node.app import settings_summary
    from router_node.settings import RouterSettings

    url = f"rediss://kvr:{PASSWORD}@127.0.0.1:1/0"
    rs = RouterSettings(models=("m",), redis_url=url, admin_token=ADMIN_TOKEN,
                        redis_password=PASSWORD)  # fmt: skip
    ls = ListenerSettings(model="m", redis_url=url)
    for text in (repr(rs), str(rs), repr(ls), str(ls), repr(settings_summary(rs))):
        assert PASSWORD not in text and ADMIN_TOKEN not in text, text


async def test_admin_token_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, reliability: Any
) -> None:
    from router_node import app as app_module
    from router_node.app import RouterServer
    from router_node.settings import RouterSettings, WorkerSpec
    from tests.support.fake_worker import FakeWorker

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    body = {"model": "m", "prompt": [1, 2, 3]}
    async with FakeWorker(model="m") as w:
        base = RouterSettings(models=("m",), workers=(WorkerSpec.parse(w.url),), redis_url="",
                              host="127.0.0.1", port=0, health_interval_s=0)  # fmt: skip
        async with (
            RouterServer(base.with_(admin_token=ADMIN_TOKEN)) as r,
            aiohttp.ClientSession() as s,
        ):
            results = {}
            for name, header in (
                ("missing", None),
                ("wrong", "Bearer nope"),
                ("prefix of the token", f"Bearer {ADMIN_TOKEN[:-1]}"),
                ("basic scheme", f"Basic {ADMIN_TOKEN}"),
                ("right", f"Bearer {ADMIN_TOKEN}"),
            ):
                headers = {"Authorization": header} if header else {}
                async with s.post(f"{r.url}/debug/route", json=body, headers=headers) as resp:
                    results[name] = resp.status
                    if resp.status != 200:
                        err = (await resp.json())["error"]
                        assert err["type"] == "authentication_error"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with (
            RouterServer(base) as r,
            aiohttp.ClientSession() as s,
            s.post(f"{r.url}/debug/route", json=body, headers=auth) as resp,
        ):
            off = resp.status
    assert results == {"missing": 401, "wrong": 401, "prefix of the token": 401,
                       "basic scheme": 401, "right": 200}  # fmt: skip
    assert off == 403
    assert any(b == ADMIN_TOKEN.encode() for _, b in calls), "not hmac.compare_digest"
    reliability.add("security", {
        "check": "POST /debug/route: token missing, wrong, a prefix, Basic scheme, right; "
                 "no token configured",
        "result": f"{results}; off: {off}; compared with hmac.compare_digest "
                  f"({len(calls)} calls seen)",
    })  # fmt: skip


async def test_workers_only_from_configured_sources(tls_redis: TlsRedis, reliability: Any) -> None:
    """A worker registered in Redis is ignored by a static router; request headers and body
    fields cannot name a worker; bad registry URLs are skipped by a registry router."""
    hits: list[str] = []

    async def canary(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", canary)
    runner = web.AppRunner(app)
    await runner.setup()
    cport = free_port()
    await web.TCPSite(runner, "127.0.0.1", cport).start()
    canary_url = f"http://127.0.0.1:{cport}"
    from kvrouter.index.connection import connect

    client = connect(tls_redis.url())
    schema = KeySchema()
    stack = faults.Stack(tls_redis.url(), listener=False, workers=1)
    try:
        await register_worker(client, schema, "evil", canary_url, models=(faults.MODEL,))
        await stack.start()
        async with aiohttp.ClientSession() as s:
            for i in range(10):
                body = {"model": faults.MODEL, "prompt": [i, 1, 2], "max_tokens": 1,
                        "worker": canary_url, "base_url": canary_url}  # fmt: skip
                headers = {
                    "x-kvrouter-worker": "evil",
                    "Host": f"127.0.0.1:{cport}",
                    "X-Forwarded-Host": f"127.0.0.1:{cport}",
                    "X-data-parallel-rank": "1",
                }
                async with s.post(f"{stack.router_url}/v1/completions", json=body,
                                  headers=headers) as r:  # fmt: skip
                    assert r.status == 200
                    assert r.headers["x-kvrouter-worker"] == "w0"
            async with s.get(f"{stack.router_url}/ready") as r:
                workers = set((await r.json())["workers"])
        # A registry router skips entries whose URL is not http(s)://host:port.
        await client.hset(schema.registry, "bad1", '{"url": "file:///etc/passwd"}')
        await client.hset(schema.registry, "bad2", '{"url": "http://h:1/path?x=1"}')
        await client.hset(schema.registry, "bad3", "not json")
        now = int(time.time() * 1000)
        await client.zadd(schema.heartbeats, {"bad1": now, "bad2": now, "bad3": now})
        read = {w.id for w in await read_registry(client, schema, max_age_ms=60_000)}
    finally:
        await stack.close()
        await client.aclose()
        await runner.cleanup()
    assert hits == []
    assert workers == {"w0"}
    assert read == {"evil"}
    reliability.add("security", {
        "check": "static router; a worker registered in Redis; requests naming another "
                 "worker in headers (x-kvrouter-worker, Host, X-Forwarded-Host) and body "
                 "fields; registry entries with file://, a path, not JSON",
        "result": f"canary worker got {len(hits)} requests; /ready lists {sorted(workers)}; "
                  f"registry read keeps {sorted(read)} (bad URLs skipped)",
    })  # fmt: skip
