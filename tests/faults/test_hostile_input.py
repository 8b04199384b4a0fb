"""Hostile input against real router and listener processes: every HTTP operation of the
router's own OpenAPI description fuzzed with hypothesis, hand-made bad bodies, slow clients,
bogus notices on the pub/sub channel and bogus ZMQ frames from an engine. After every case:
the processes are alive, the answer is an OpenAI-style error (or a success), and the index
is intact (keys in the schema, members 16 hex digits, integer scores)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis
import requests
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrouter.redisproc import RedisServer, free_port
from tests.support import faults
from tests.support.metrics import parse

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

ADMIN = "hostile-admin-token"
MAX_BODY = 256 * 1024
MAX_PROMPT = 2048
HEADER_TIMEOUT_S = 1.0


class Hostile:
    def __init__(self) -> None:
        self.redis = RedisServer().start()
        self.zmq_ctx = zmq.Context()
        self.pub = self.zmq_ctx.socket(zmq.PUB)
        self.zport = free_port()
        self.pub.bind(f"tcp://127.0.0.1:{self.zport}")
        self.stack = faults.Stack(
            self.redis.url,
            workers=2,
            sim_args=["--time-scale", "50", "--max-model-len", "4096"],
            extra_engines=[f"zfake=tcp://127.0.0.1:{self.zport}"],
            router_env={
                "KVR_ADMIN_TOKEN": ADMIN,
                "KVR_MAX_BODY_BYTES": str(MAX_BODY),
                "KVR_MAX_PROMPT_TOKENS": str(MAX_PROMPT),
                # A short header read timeout, so the slowloris case sees clients dropped.
                "KVR_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            },
        )
        self.http = requests.Session()

    @property
    def url(self) -> str:
        return self.stack.router_url

    def alive(self) -> None:
        assert self.stack.router_proc is not None and self.stack.router_proc.alive(), (
            self.stack.router_proc.tail() if self.stack.router_proc else ""
        )
        assert self.stack.listener_proc is not None and self.stack.listener_proc.alive(), (
            self.stack.listener_proc.tail() if self.stack.listener_proc else ""
        )
        assert self.http.get(f"{self.url}/health", timeout=5).status_code == 200

    def intact(self) -> None:
        problems = faults.check_index_sync(self.redis.url)
        assert not problems, problems

    def listener_errors(self) -> dict[str, float]:
        m = parse(self.http.get(f"{self.stack.listener_url}/metrics", timeout=5).text)
        kinds = m.label_values("kvr_listener_errors_total", "kind")
        return {kind: m.value("kvr_listener_errors_total", kind=kind) for kind in kinds}

    def close(self) -> None:
        asyncio.run(self.stack.close())
        self.pub.close(linger=0)
        self.zmq_ctx.term()
        self.redis.close()
        self.http.close()


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    h = Hostile()
    try:
        asyncio.run(h.stack.start())
        yield h
    finally:
        h.close()


def assert_openai_error(resp: requests.Response) -> dict[str, Any]:
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.text[:200]
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str), body
    return body


def check_answer(resp: requests.Response) -> None:
    """A success, or a clear client error; never a crash (500) of the router."""
    assert resp.status_code != 500, resp.text[:300]
    if resp.status_code >= 400:
        assert_openai_error(resp)
    if resp.status_code == 503:
        assert "Retry-After" in resp.headers


# -- the OpenAPI description -------------------------------------------------------------------
def test_openapi_lists_every_route(hostile: Hostile) -> None:
    from router_node.app import create_app
    from router_node.settings import RouterSettings

    spec = hostile.http.get(f"{hostile.url}/openapi.json", timeout=5).json()
    listed = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    app = create_app(RouterSettings(models=("m",), redis_url=""))
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert routes == listed


def _operations() -> list[tuple[str, str]]:
    from router_node.openapi import openapi_spec

    return [(m, p) for p, ops in openapi_spec()["paths"].items() for m in ops]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def from_schema(schema: dict[str, Any], spec: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under the (small) JSON Schema subset the router's description uses."""
    if "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return from_schema(node, spec)
    if "oneOf" in schema:
        return st.one_of([from_schema(s, spec) for s in schema["oneOf"]])
    types = schema.get("type")
    if types is None:
        return JSON
    if isinstance(types, list):
        return st.one_of([from_schema({**schema, "type": t}, spec) for t in types])
    if types == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if types == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    if types == "boolean":
        return st.booleans()
    if types == "null":
        return st.none()
    if types == "array":
        return st.lists(from_schema(schema.get("items", {}), spec),
                        min_size=schema.get("minItems", 0), max_size=40)  # fmt: skip
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    fixed = st.fixed_dictionaries(
        {k: from_schema(v, spec) for k, v in props.items() if k in required},
        optional={k: from_schema(v, spec) for k, v in props.items() if k not in required},
    )
    return fixed


def _body_strategy(spec: dict[str, Any], op: dict[str, Any]) -> st.SearchStrategy[Any]:
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    valid = from_schema(schema, spec)
    mutated = st.builds(
        lambda good, key, bad: {**good, key: bad} if isinstance(good, dict) else good,
        valid,
        st.sampled_from(["model", "prompt", "messages", "stream", "max_tokens", "cache_salt"]),
        JSON,
    )
    return st.one_of(valid, mutated, JSON)


@pytest.mark.parametrize(("method", "path"), _operations())
def test_fuzz_operation(hostile: Hostile, method: str, path: str, reliability: Any) -> None:
    from router_node.openapi import openapi_spec

    spec = openapi_spec()
    op = spec["paths"][path][method]
    statuses: dict[int, int] = {}
    model = faults.MODEL

    def send(body: Any) -> None:
        if isinstance(body, dict) and "model" in body and isinstance(body["model"], str):
            # Mostly the served model, so fuzzing reaches past the model check to the worker.
            body["model"] = model if len(body["model"]) % 4 else body["model"]
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = min(body["max_tokens"], 64) if body["max_tokens"] > 0 else (
                body["max_tokens"])  # fmt: skip
        headers = {"Authorization": f"Bearer {ADMIN}"}
        resp = hostile.http.request(
            method.upper(),
            f"{hostile.url}{path}",
            data=None if body is None else json.dumps(body),
            headers=headers,
            timeout=15,
        )
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        check_answer(resp)
        hostile.intact()

    if "requestBody" in op:
        strategy = _body_strategy(spec, op)

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(strategy)
        def run(body: Any) -> None:
            send(body)

        run()
    else:
        for _ in range(3):
            send(None)
    hostile.alive()
    reliability.add("hostile", {
        "case": f"fuzz {method.upper()} {path} (hypothesis, from /openapi.json)",
        "tried": sum(statuses.values()),
        "outcome": ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())),
        "index intact": "yes",
    })  # fmt: skip


# -- hand-made bad input -------------------------------------------------------------------------
def _raw(hostile: Hostile, payload: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    port = int(hostile.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


M = faults.MODEL


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


BAD_CASES: list[tuple[str, bytes, int]] = [
    ("body over KVR_MAX_BODY_BYTES (Content-Length)",
     _post("/v1/completions", b"{" + b" " * (MAX_BODY + 10) + b"}"), 413),
    ("body over the limit, chunked (no Content-Length)",
     b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
     + b"".join(b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n",
     413),
    ("deep JSON (100k nested arrays)", _post("/v1/completions", b"[" * 100_000), 400),
    ("deep JSON in a field", _post("/v1/completions",
     b'{"model":"' + M.encode() + b'","prompt":' + b"[" * 5000 + b"]" * 5000 + b"}"), 400),
    ("invalid UTF-8", _post("/v1/completions", b'{"model":"\xff\xfe","prompt":"a\xc3"}'), 400),
    ("not JSON", _post("/v1/completions", b"model=x&prompt=y"), 400),
    ("JSON but not an object", _post("/v1/completions", b"[1,2,3]"), 400),
    ("empty body", _post("/v1/completions", b""), 400),
    ("unknown model", _post("/v1/completions", _json({"model": "nope", "prompt": [1, 2]})),
     404),
    ("token id 2**40", _post("/v1/completions",
     _json({"model": M, "prompt": [1, 2**40], "max_tokens": 1})), 400),
    ("token id -1", _post("/v1/completions", _json({"model": M, "prompt": [-1, 5]})), 400),
    ("token id 1e30 (float)", _post("/v1/completions",
     b'{"model":"' + M.encode() + b'","prompt":[1,1e30]}'), 400),
    ("token id 10**400 (bigint)", _post("/v1/completions",
     b'{"model":"' + M.encode() + b'","prompt":[1,' + b"9" * 400 + b"]}"), 400),
    ("prompt over KVR_MAX_PROMPT_TOKENS", _post("/v1/completions",
     _json({"model": M, "prompt": list(range(MAX_PROMPT + 1))})), 413),
    ("negative max_tokens (worker rejects)", _post("/v1/completions",
     _json({"model": M, "prompt": [1, 2, 3], "max_tokens": -5})), 400),
    ("max_tokens 2**63 (worker rejects)", _post("/v1/completions",
     _json({"model": M, "prompt": [1, 2, 3], "max_tokens": 2**63})), 400),
    ("empty prompt list", _post("/v1/completions", _json({"model": M, "prompt": []})), 400),
    ("messages not a list", _post("/v1/chat/completions",
     _json({"model": M, "messages": "hi"})), 400),
    ("stream as a string", _post("/v1/completions",
     _json({"model": M, "prompt": [1], "stream": "yes"})), 400),
    ("debug without a token", _post("/debug/route", _json({"model": M, "prompt": [1]})), 401),
    ("debug with a wrong token", _post("/debug/route", _json({"model": M, "prompt": [1]}),
     "Authorization: Bearer wrong\r\n"), 401),
    ("debug with a token of another length", _post("/debug/route",
     _json({"model": M, "prompt": [1]}), f"Authorization: Bearer {ADMIN}x\r\n"), 401),
]  # fmt: skip


@pytest.mark.parametrize(("name", "payload", "status"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_request(
    hostile: Hostile, name: str, payload: bytes, status: int, reliability: Any
) -> None:
    t0 = time.monotonic()
    got, body = _raw(hostile, payload)
    ms = (time.monotonic() - t0) * 1000
    assert got == status, body[:300]
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"]
    hostile.alive()
    hostile.intact()
    reliability.add("hostile", {
        "case": name, "tried": 1,
        "outcome": f"{got} {err['type']}: {err['message'][:70]}",
        "index intact": "yes", "ms": round(ms, 1),
    })  # fmt: skip


def _dropped_by_peer(s: socket.socket) -> bool:
    """True when the router has closed this connection (EOF or a reset)."""
    s.settimeout(0.5)
    try:
        return s.recv(1024) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_slow_clients(hostile: Hostile, reliability: Any) -> None:
    """Slowloris: 200 connections dribbling headers for 3 s; real clients are still served,
    and the router drops every dribbling connection after its header read timeout."""
    port = int(hostile.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    # and a few that send headers, then a body one byte at a time
    slow_body = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        slow_body.append(s)
    latencies = []
    ok = 0
    deadline = time.monotonic() + 3.0
    try:
        i = 0
        while time.monotonic() < deadline:
            for s in socks + slow_body:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-a: b\r\n" if s in socks else b" ")
            t0 = time.monotonic()
            r = hostile.http.post(f"{hostile.url}/v1/completions",
                                  json={"model": M, "prompt": [i, 1, 2], "max_tokens": 2},
                                  timeout=10)  # fmt: skip
            latencies.append(time.monotonic() - t0)
            ok += r.status_code == 200
            i += 1
            time.sleep(0.1)
        # 3 s of dribbling is three times the header read timeout: every one is gone.
        dropped = sum(_dropped_by_peer(s) for s in socks)
    finally:
        for s in socks + slow_body:
            s.close()
    hostile.alive()
    hostile.intact()
    assert ok == len(latencies) and ok >= 5
    worst = max(latencies)
    assert worst < 2.0
    assert dropped == len(socks)
    reliability.add("hostile", {
        "case": "slowloris: 200 conns dribbling headers + 20 dribbling bodies, 3 s",
        "tried": len(latencies),
        "outcome": f"{ok}/{len(latencies)} real requests 200, slowest {worst * 1000:.0f} ms; "
                   f"{dropped}/{len(socks)} dribbling-header conns dropped "
                   f"(KVR_HEADER_TIMEOUT_S={HEADER_TIMEOUT_S})",
        "index intact": "yes",
    })  # fmt: skip


# -- bogus notices and ZMQ frames ------------------------------------------------------------------
BOGUS_NOTICES: list[tuple[str, bytes]] = [
    ("not msgpack", b"\xc1\xc1\xc1garbage"),
    ("msgpack, not a map", msgpack.packb([1, 2, 3])),
    ("version 99", msgpack.packb({"v": 99, "op": "store", "worker": "w0", "keys": [1]})),
    ("unknown op", msgpack.packb({"v": 1, "op": "explode", "worker": "w0", "keys": [1]})),
    ("worker id with a space", msgpack.packb({"v": 1, "op": "store", "worker": "a b",
                                              "keys": [1]})),
    ("worker id with a brace", msgpack.packb({"v": 1, "op": "clear", "worker": "{x}:wrk"})),
    ("keys as strings", msgpack.packb({"v": 1, "op": "store", "worker": "w0",
                                       "keys": ["zz", "yy"]})),
    ("key 2**64 (out of range)", msgpack.packb({"v": 1, "op": "store", "worker": "w0",
                                                "tokens": [1] * 3, "keys": [-1]})),
    ("negative tokens", msgpack.packb({"v": 1, "op": "store", "worker": "w0",
                                       "tokens": [-5] * 32})),
    ("negative from_block", msgpack.packb({"v": 1, "op": "evict", "worker": "w0",
                                           "tokens": list(range(32)), "from_block": -3})),
    ("200k keys", msgpack.packb({"v": 1, "op": "store", "worker": "w0",
                                 "keys": list(range(200_000))})),
    ("empty payload", b""),
]  # fmt: skip


def test_bogus_notices(hostile: Hostile, reliability: Any) -> None:
    client = redis.Redis.from_url(hostile.redis.url)
    channel = f"kvr:{{{M}}}:notices"
    before = hostile.listener_errors()
    try:
        for _name, payload in BOGUS_NOTICES:
            client.publish(channel, payload)
            time.sleep(0.05)
            hostile.intact()
    finally:
        client.close()
    time.sleep(0.5)
    hostile.alive()
    hostile.intact()
    after = hostile.listener_errors()
    counted = sum(v for k, v in after.items() if k.startswith("notice_")) - sum(
        v for k, v in before.items() if k.startswith("notice_")
    )
    assert counted >= len(BOGUS_NOTICES) - 3, (before, after)  # a few are valid-but-odd
    reliability.add("hostile", {
        "case": f"{len(BOGUS_NOTICES)} bogus notices on kvr:{{m}}:notices ("
                + "; ".join(n for n, _ in BOGUS_NOTICES) + ")",
        "tried": len(BOGUS_NOTICES),
        "outcome": f"listener alive; {counted:.0f} counted as errors_total{{kind=notice_*}}",
        "index intact": "yes",
    })  # fmt: skip


def _seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


BOGUS_FRAMES: list[tuple[str, list[bytes]]] = [
    ("one frame", [b"garbage"]),
    ("two frames", [b"", b"x"]),
    ("four frames", [b"", _seq(1), b"x", b"y"]),
    ("seq of 3 bytes", [b"", b"abc", msgpack.packb([0.0, []])]),
    ("payload not msgpack", [b"", _seq(1), b"\xc1\xc1"]),
    ("payload msgpack string", [b"", _seq(2), msgpack.packb("hello")]),
    ("batch with a bogus event tag", [b"", _seq(3), msgpack.packb([0.0, [["Nope", 1, 2]]])]),
    ("BlockStored with wrong types", [b"", _seq(4), msgpack.packb(
        [0.0, [["BlockStored", "x", None, "tokens", -1, None]]])]),
    ("BlockStored, huge block hash", [b"", _seq(5), msgpack.packb(
        [0.0, [["BlockStored", [2**64 - 1], None, list(range(16)), 16, None]]])]),
    ("BlockStored, token count not a multiple of the block", [b"", _seq(6), msgpack.packb(
        [0.0, [["BlockStored", [7, 8], None, list(range(5)), 16, None]]])]),
    ("seq 2**64-1", [b"", _seq(2**64 - 1), msgpack.packb([0.0, []])]),
    ("seq back to 0", [b"", _seq(0), msgpack.packb([0.0, []])]),
    ("1 MiB of junk", [b"", _seq(7), b"\x00" * (1 << 20)]),
]  # fmt: skip


def test_bogus_zmq_frames(hostile: Hostile, reliability: Any) -> None:
    time.sleep(0.5)  # the listener's SUB connects to the fake engine (slow joiner)
    before = hostile.listener_errors()
    for _name, frames in BOGUS_FRAMES:
        hostile.pub.send_multipart(frames)
        time.sleep(0.05)
    time.sleep(1.0)
    hostile.alive()
    hostile.intact()
    after = hostile.listener_errors()
    counted = sum(after.values()) - sum(before.values())
    assert counted >= 3, (before, after)
    # Real traffic still flows through the router and the index afterwards.
    r = hostile.http.post(f"{hostile.url}/v1/completions",
                          json={"model": M, "prompt": list(range(40)), "max_tokens": 2},
                          timeout=10)  # fmt: skip
    assert r.status_code == 200
    reliability.add("hostile", {
        "case": f"{len(BOGUS_FRAMES)} bogus ZMQ messages from an engine ("
                + "; ".join(n for n, _ in BOGUS_FRAMES) + ")",
        "tried": len(BOGUS_FRAMES),
        "outcome": f"listener alive; {counted:.0f} counted in errors_total; "
                   + ", ".join(f"{k}+{after[k] - before.get(k, 0):.0f}" for k in after
                               if after[k] != before.get(k, 0)),
        "index intact": "yes",
    })  # fmt: skip
