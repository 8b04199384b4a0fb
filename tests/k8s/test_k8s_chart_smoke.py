"""The chart as a new user deploys it: `helm template` an example, then run its processes as
rendered, with only what a cluster supplies replaced.

For each workload the test resolves the container's command and args (the image's ENTRYPOINT
when the chart sets no command), its env and envFrom (ConfigMaps and Secrets of the render,
fieldRefs), and Kubernetes' ``$(VAR)`` expansion in args. What a cluster would supply:

- each pod's own network namespace: a container port P becomes a free loopback port, in the
  container's env and args wherever the value is exactly P;
- Service DNS names (``name``, ``name.ns``, ``name.ns.svc[.cluster.local]``, with the Service
  port) become the loopback address and port of the pod behind the Service;
- the API server: ``KVR_K8S_API_URL`` points at a fake one (LIST + WATCH of EndpointSlices)
  that serves two ``kvrouter sim`` workers with KV events, named ports as the chart names them;
- volumes: each mount path is a directory of the test's own (Secret volumes hold the keys);
- what the operator creates before installing: the Secrets the examples name, and an
  external Redis as the rendered URL describes it (a Sentinel-managed primary; a TLS Redis
  Cluster whose CA is the pre-created TLS Secret's), with the Secret's password;
- what an init container would fetch from a model hub (unreachable here): a test tokenizer;
- the image: ``kvrouter`` is this checkout's `python -m kvrouter`, ``redis-server`` the host's.

Then: every process starts (a value it cannot parse fails here), every readiness probe passes,
and a repeated prompt goes to the worker that holds it, which the listener confirmed from the
worker's KV events (its applied sequence in Redis).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvrouter.redisproc import free_port
from tests.faults.test_security_redis import make_certs
from tests.k8s.test_k8s_chart import CACHED_HELM, EXAMPLES, helm_binary, render
from tests.support.clients import closed_after_test
from tests.support.vllm_publisher import applied_seq

pytestmark = pytest.mark.redis
NAMESPACE = "llm"
START_S = 60.0  # bound on any one process becoming ready (shared 2-core machine)
# The image's ENTRYPOINT (Dockerfile): the console script of this checkout.
ENTRYPOINT = {"kvrouter": [sys.executable, "-m", "kvrouter"]}
# Secrets the examples expect to exist beforehand (their comments say how they are created).
EXISTING_SECRETS = {
    "redis-credentials": {"password": "Existing-Pw-1"},
    "kvrouter-admin": {"token": "existing-admin-token"},
    "hf-token": {"token": "hf_unused"},
}
EXPANSION = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class Pod:
    """One rendered workload's first container, resolved to a local process."""

    workload: str
    labels: dict[str, str]
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, tuple[int, int]] = field(default_factory=dict)
    """port name -> (container port, loopback port)."""
    readiness: dict[str, Any] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def local_port(self, port: int | str) -> int:
        for name, (cport, local) in self.ports.items():
            if port in (name, cport):
                return local
        raise KeyError(f"{self.workload}: no container port {port!r}")


def _by_name(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def resolve_env(
    container: dict[str, Any],
    meta: dict[str, Any],
    configmaps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom first, then env)."""
    env: dict[str, str] = {}

    def secret_data(name: str) -> dict[str, str]:
        data = secrets[name].get("data") or {}
        out = {k: base64.b64decode(v).decode() for k, v in data.items()}
        out.update(secrets[name].get("stringData") or {})
        return out

    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            data = configmaps[src["configMapRef"]["name"]].get("data") or {}
        else:
            data = secret_data(src["secretRef"]["name"])
        env.update({prefix + k: str(v) for k, v in data.items()})
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = EXPANSION.sub(lambda m: env.get(m[1], m[0]), str(e["value"]))
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[e["name"]] = str(configmaps[r["name"]]["data"][r["key"]])
        elif "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            env[e["name"]] = secret_data(r["name"])[r["key"]]
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            fields = {
                "metadata.namespace": NAMESPACE,
                "metadata.name": f"{meta['name']}-0",
                "status.podIP": "127.0.0.1",
                "spec.nodeName": "node-0",
                "spec.serviceAccountName": "default",
            }
            env[e["name"]] = fields[path]
        else:
            raise AssertionError(f"unsupported valueFrom {ref}")
    return env


def pods_of(
    docs: list[dict[str, Any]], volumes: Path, existing: dict[str, dict[str, str]]
) -> list[Pod]:
    """Every Deployment's and StatefulSet's first container, resolved; its volume mounts
    become directories under `volumes` (Secret volumes filled with the Secret's keys).
    `existing`: Secrets created before the install."""
    configmaps, secrets = _by_name(docs, "ConfigMap"), _by_name(docs, "Secret")
    for name, data in existing.items():
        secrets.setdefault(name, {"stringData": data})
    pods = []
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        tpl = d["spec"]["template"]
        c = tpl["spec"]["containers"][0]
        env = resolve_env(c, d["metadata"], configmaps, secrets)
        ports = {p.get("name", str(p["containerPort"])): (p["containerPort"], free_port())
                 for p in c.get("ports") or []}  # fmt: skip
        by_number = {str(cport): str(local) for cport, local in ports.values()}
        # The pod's own network namespace, on one host: its ports move to free ones.
        env = {k: by_number.get(v, v) for k, v in env.items()}
        args = [
            EXPANSION.sub(lambda m, env=env: env.get(m[1], m[0]), a) for a in c.get("args") or []
        ]
        args = [by_number.get(a, a) for a in args]
        # Volumes are the cluster's: each mount path becomes a directory of its own.
        mounts = {m["mountPath"]: volumes / d["metadata"]["name"] / m["name"]
                  for m in c.get("volumeMounts") or []}  # fmt: skip
        for local in mounts.values():
            local.mkdir(parents=True, exist_ok=True)
        for vol in tpl["spec"].get("volumes") or []:
            mount = next((m for m in c.get("volumeMounts") or [] if m["name"] == vol["name"]), None)
            if mount is None or not ("secret" in vol or "configMap" in vol):
                continue
            if "configMap" in vol:
                files = dict(configmaps[vol["configMap"]["name"]].get("data") or {})
            else:
                sec = secrets[vol["secret"]["secretName"]]
                files = {k: base64.b64decode(v).decode()
                         for k, v in (sec.get("data") or {}).items()}  # fmt: skip
                files.update(sec.get("stringData") or {})
            for key, text in files.items():
                (mounts[mount["mountPath"]] / key).write_text(text)

        # Anywhere in a value (a CA path inside a Redis URL's query too), in one pass so a
        # path already moved under /tmp is not moved again by the /tmp mount.
        by_path = {p.rstrip("/"): str(local) for p, local in mounts.items()}
        alternatives = "|".join(re.escape(p) for p in sorted(by_path, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w/.-])({alternatives})(?=/|$|[?&,;\s])")

        def remount(
            value: str, pattern: re.Pattern[str] = pattern, by_path: dict[str, str] = by_path
        ) -> str:
            if not by_path:
                return value
            return pattern.sub(lambda hit: by_path[hit[1]], value)

        args = [remount(a) for a in args]
        env = {k: remount(v) for k, v in env.items()}
        command = c.get("command")
        if command is None:
            image = c["image"].rsplit("/", 1)[-1].split(":")[0]
            assert image == "kvrouter", f"{d['metadata']['name']}: no command for {image}"
            command = ["kvrouter"]
        argv = [*ENTRYPOINT.get(command[0], [command[0]]), *command[1:], *args]
        pods.append(Pod(d["metadata"]["name"], tpl["metadata"]["labels"], argv, env, ports,
                        c.get("readinessProbe")))  # fmt: skip
    return pods


def service_addresses(docs: list[dict[str, Any]], pods: list[Pod]) -> dict[str, str]:
    """``host:port`` of each Service's DNS names -> the loopback address of its pod."""
    out: dict[str, str] = {}
    for svc in _by_name(docs, "Service").values():
        sel = svc["spec"].get("selector") or {}
        backends = [p for p in pods if sel and sel.items() <= p.labels.items()]
        if not backends:
            continue
        name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", NAMESPACE)
        for port in svc["spec"]["ports"]:
            local = backends[0].local_port(port.get("targetPort", port["port"]))
            for host in (
                name,
                f"{name}.{ns}",
                f"{name}.{ns}.svc",
                f"{name}.{ns}.svc.cluster.local",
            ):
                out[f"{host}:{port['port']}"] = f"127.0.0.1:{local}"
    return out


def replace_services(value: str, addresses: dict[str, str]) -> str:
    # Longest names first: "x.ns.svc:6379" before "x:6379".
    for name in sorted(addresses, key=len, reverse=True):
        value = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", addresses[name], value)
    return value


class FakeApi:
    """The API server's EndpointSlice LIST and WATCH (no events: the set does not change),
    as reached through `kubectl proxy` (no credentials asked)."""

    def __init__(self) -> None:
        self.slices: list[dict[str, Any]] = []
        self.selectors: set[str] = set()
        self.app = web.Application()
        self.app.router.add_get(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", self.handle
        )
        self.runner = web.AppRunner(self.app)
        self.url = ""
        self._closed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        selector = request.query.get("labelSelector", "")
        self.selectors.add(selector)
        if request.query.get("watch") != "1":
            terms = selector_labels(selector)
            items = [
                s for s in self.slices
                if s["metadata"]["namespace"] == request.match_info["ns"]
                and terms.items() <= s["metadata"]["labels"].items()
            ]  # fmt: skip
            return web.json_response({"metadata": {"resourceVersion": "10"}, "items": items})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), float(request.query["timeoutSeconds"]))
        return resp

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def close(self) -> None:
        self._closed.set()
        await self.runner.cleanup()


def selector_labels(selector: str) -> dict[str, str]:
    """The labels an equality-based selector (``k=v,k2==v2``) asks for; the API server's
    set-based forms are not used by the examples."""
    out = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.partition("=")
        assert sep and not key.endswith("!"), f"unsupported selector term {term!r}"
        out[key] = value.removeprefix("=")
    return out


def worker_slices(
    fleet: dict[str, Any], env: dict[str, str], name: str = "vllm-"
) -> list[dict[str, Any]]:
    """One EndpointSlice per simulated worker (pod ``<name><i>``), labelled for the rendered
    selector (a listener's: the fleet's and its model's) and with ports named as the rendered
    KVR_K8S_*_PORT_NAME settings."""
    labels = selector_labels(env["KVR_K8S_SELECTOR"])
    out = []
    for i, w in enumerate(fleet["workers"]):
        events = int(w["events_endpoint"].rsplit(":", 1)[1])
        replay = int(w["replay_endpoint"].rsplit(":", 1)[1])
        ports = {
            env.get("KVR_K8S_HTTP_PORT_NAME", "http"): w["port"],
            env.get("KVR_K8S_EVENTS_PORT_NAME", "kv-events"): events,
            env.get("KVR_K8S_REPLAY_PORT_NAME", "kv-replay"): replay,
        }
        out.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}{i}", "namespace": env["KVR_K8S_NAMESPACE"],
                         "labels": labels},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": f"{name}{i}"}}],
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
        })  # fmt: skip
    return out


def start_process(pod: Pod, workdir: Path) -> None:
    pod.log = workdir / f"{pod.workload}.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), **pod.env}
    with pod.log.open("wb") as log:
        pod.proc = subprocess.Popen(
            pod.argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            start_new_session=True,
        )  # fmt: skip


def logs(pods: list[Pod]) -> str:
    return "\n".join(
        f"--- {p.workload} ({' '.join(p.argv)}):\n" + p.log.read_text(errors="replace")[-3000:]
        for p in pods
        if p.log is not None and p.log.exists()
    )


async def wait_ready(pod: Pod, all_pods: list[Pod]) -> None:
    """Until the pod's readiness probe passes, as the kubelet would run it."""
    probe = pod.readiness or {}
    deadline = time.monotonic() + START_S
    async with aiohttp.ClientSession() as session:
        while True:
            assert pod.proc is not None
            if pod.proc.poll() is not None:
                pytest.fail(f"{pod.workload} exited with {pod.proc.returncode}\n{logs(all_pods)}")
            ok = False
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"http://127.0.0.1:{pod.local_port(get['port'])}{get.get('path', '/')}"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                        ok = r.status < 400
            elif "exec" in probe:
                cmd = probe["exec"]["command"]
                # The probe runs in the container: its port is the pod's own, now remapped.
                cmd = [re.sub(rf"-p {c}\b", f"-p {loc}", a) for a in cmd
                       for c, loc in list(pod.ports.values())[:1]]  # fmt: skip
                probe_proc = await asyncio.create_subprocess_exec(
                    *cmd, env={**os.environ, **pod.env},
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                ok = await asyncio.wait_for(probe_proc.wait(), 10) == 0
            else:
                ok = True
            if ok:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{pod.workload} not ready within {START_S} s\n{logs(all_pods)}")
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def processes(pods: list[Pod]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in pods:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in pods:
            if p.proc is not None:
                try:
                    p.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait()


@pytest.fixture(scope="module")
def helm_path() -> str:
    # As test_k8s_chart's `helm` fixture: CI (KVR_REQUIRE_HELM) fails without helm.
    binary = helm_binary()
    if binary is None and os.environ.get("KVR_REQUIRE_HELM"):
        pytest.fail(f"KVR_REQUIRE_HELM is set (CI) but helm is not on PATH or in {CACHED_HELM}")
    if binary is None:
        pytest.skip(f"helm not found on PATH or in {CACHED_HELM.parent}: run `make helm`")
    return binary


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    api = FakeApi()
    await api.start()
    yield api
    await api.close()


def start_sim(
    model: str, block_size: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "sim.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrouter", "sim", "--workers", "2", "--base-port", "0",
         "--kv-events", "positional", "--kv-events-base-port", "0", "--model", model,
         "--block-size", block_size, "--time-scale", "20", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=(workdir / "sim.log").open("wb"),
    )  # fmt: skip
    deadline = time.monotonic() + START_S
    while not ready.exists():
        assert proc.poll() is None, (workdir / "sim.log").read_text()
        assert time.monotonic() < deadline, "kvrouter sim did not start"
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
async def test_example_runs_as_rendered(
    helm_path: str,
    example: Path,
    fake_api: FakeApi,
    tmp_path: Path,
) -> None:
    docs = render(helm_path, "-f", str(example))
    # The examples' pre-created TLS Secret holds the CA of the test's own Redis certificates.
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certs(certs)
    existing = {**EXISTING_SECRETS, "redis-tls": {"ca.crt": (certs / "ca.crt").read_text()}}
    pods = pods_of(docs, tmp_path / "volumes", existing)
    components = {p.labels.get("app.kubernetes.io/component", p.workload): p for p in pods}
    router = components["router"]
    addresses = service_addresses(docs, pods)
    with contextlib.ExitStack() as external:
        if "redis" not in components:
            # An external Redis is the operator's: stand one up as its URL describes.
            addresses.update(external.enter_context(external_redis(router.env, certs)))
        provide_tokenizer(docs, router)
        await run_example(pods, components, addresses, fake_api, tmp_path)


@contextlib.contextmanager
def external_redis(env: dict[str, str], certs: Path) -> Iterator[dict[str, str]]:
    """A local Redis shaped as the rendered ``KVR_REDIS_URL`` says, with the password of the
    rendered ``KVR_REDIS_PASSWORD``; yields ``host:port`` (as in the URL) -> loopback."""
    from kvrouter.redisproc import RedisServer

    url = env["KVR_REDIS_URL"]
    scheme, _, rest = url.partition("://")
    hosts = rest.rpartition("@")[2].split("/")[0].split("?")[0].split(",")
    password = env.get("KVR_REDIS_PASSWORD", "")
    if scheme == "rediss+cluster":
        with tls_cluster(certs, password) as seed_port:
            yield {h: f"127.0.0.1:{seed_port}" for h in hosts}
        return
    if scheme != "redis+sentinel":
        pytest.skip(f"external {scheme}:// Redis ({url}): not stood up by this test")
    master = rest.split("/")[1]
    primary = RedisServer(args=("--requirepass", password) if password else ()).start()
    sentinel_port = free_port()
    conf = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvr-smoke-sentinel-{sentinel_port}.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor {master} 127.0.0.1 {primary.port} 1\n"
        + (f"sentinel auth-pass {master} {password}\n" if password else "")
    )
    binary = "redis-sentinel" if shutil.which("redis-sentinel") else "redis-server"
    cmd = [binary, str(conf)] + ([] if binary == "redis-sentinel" else ["--sentinel"])
    sentinel = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Every sentinel address of the URL reaches the one local sentinel.
        yield {h: f"127.0.0.1:{sentinel_port}" for h in hosts}
    finally:
        sentinel.kill()
        sentinel.wait(timeout=10)
        primary.close()
        conf.unlink(missing_ok=True)


@contextlib.contextmanager
def tls_cluster(certs: Path, password: str) -> Iterator[int]:
    """A 3-master Redis Cluster on loopback speaking TLS only to clients and between nodes,
    with `password`; yields a node's TLS port."""
    from kvrouter.redisproc import RedisServer
    from tests.support.redis_cluster import free_cluster_port

    tls = ["--tls-cert-file", str(certs / "server.crt"), "--tls-key-file",
           str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt")]  # fmt: skip
    nodes: list[tuple[RedisServer, int]] = []
    try:
        for _ in range(3):
            tls_port = free_cluster_port()
            node = RedisServer(
                port=free_cluster_port(),
                args=(*tls, "--tls-port", str(tls_port), "--tls-auth-clients", "no",
                      "--tls-cluster", "yes", "--tls-replication", "yes",
                      "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                      "--cluster-node-timeout", "2000", "--requirepass", password,
                      "--masterauth", password),
            )  # fmt: skip
            nodes.append((node.start(), tls_port))
        cli = ["redis-cli", "--tls", "--cacert", str(certs / "ca.crt"), "--no-auth-warning",
               "-a", password]  # fmt: skip
        res = subprocess.run(
            [*cli, "--cluster", "create", *[f"127.0.0.1:{p}" for _, p in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        deadline = time.monotonic() + 30
        while True:
            info = subprocess.run(
                [*cli, "-p", str(nodes[0][1]), "cluster", "info"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout  # fmt: skip
            if "cluster_state:ok" in info:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        yield nodes[0][1]
    finally:
        for node, _ in nodes:
            node.close()


def provide_tokenizer(docs: list[dict[str, Any]], router: Pod) -> None:
    """What the router's init container fetches from a model hub (out of reach here): a
    tokenizer the tests build, written into the same volume."""
    path = router.env.get("KVR_TOKENIZER", "")
    if path.startswith("/") and Path(path).is_dir() and not any(Path(path).iterdir()):
        from kvrouter.tokenizer.testing import build_test_tokenizer

        build_test_tokenizer(path)


async def run_example(
    pods: list[Pod],
    components: dict[str, Pod],
    addresses: dict[str, str],
    fake_api: FakeApi,
    tmp_path: Path,
) -> None:
    router = components["router"]
    # One listener per base model (a several-model example has more than one).
    listeners = [p for p in pods if p.labels.get("app.kubernetes.io/component") == "listener"]
    assert listeners, "no listener rendered"
    for p in pods:
        p.env = {k: replace_services(v, addresses) for k, v in p.env.items()}
        if p is router or p in listeners:
            # The API server URL: in a pod it comes from KUBERNETES_SERVICE_HOST and the
            # service-account files; here the fake one.
            assert p.env.get("KVR_DISCOVERY") == "kubernetes"
            p.env["KVR_K8S_API_URL"] = fake_api.url
    assert ".svc" not in router.env["KVR_REDIS_URL"], router.env["KVR_REDIS_URL"]

    # Two simulated workers per model, each model's as its listener's settings say.
    sims: list[subprocess.Popen[bytes]] = []
    fleets: list[dict[str, Any]] = []
    try:
        for j, listener in enumerate(listeners):
            sim, fleet = start_sim(
                listener.env["KVR_MODEL"], listener.env["KVR_BLOCK_SIZE"], tmp_path / f"sim{j}"
            )
            sims.append(sim)
            fleets.append(fleet)
            name = "vllm-" if len(listeners) == 1 else f"vllm-m{j}-"
            fleet["pods"] = [f"{name}{i}" for i in range(len(fleet["workers"]))]
            fake_api.slices += worker_slices(fleet, listener.env, name)
        with processes(pods):
            if "redis" in components:
                start_process(components["redis"], tmp_path)
                await wait_ready(components["redis"], pods)
            start_process(router, tmp_path)
            for listener in listeners:
                start_process(listener, tmp_path)
            await wait_ready(router, pods)
            for listener in listeners:
                await wait_ready(listener, pods)
            assert fake_api.selectors == {p.env["KVR_K8S_SELECTOR"] for p in (router, *listeners)}
            # Without a tokenizer (the chart's default) the router says what that costs.
            assert router.log is not None
            warned = "routed by load only" in router.log.read_text()
            config = router.env.get("KVR_CONFIG")
            tokenizers = router.env.get("KVR_TOKENIZER") or (
                config is not None and "tokenizer:" in Path(config).read_text()  # noqa: ASYNC240
            )
            assert warned is not bool(tokenizers), logs(pods)
            workers = sum(len(f["workers"]) for f in fleets)
            for listener, fleet in zip(listeners, fleets, strict=True):
                await route_repeated_prompt(router, listener, fleet, pods, workers)
    finally:
        for sim in sims:
            sim.terminate()
            sim.wait(timeout=20)


async def route_repeated_prompt(
    router: Pod, listener: Pod, fleet: dict[str, Any], pods: list[Pod], workers: int
) -> None:
    """A repeated prompt of the listener's model goes to the worker of that model that holds
    it, once the listener applied that worker's KV events."""
    from openai import AsyncOpenAI

    model = listener.env["KVR_MODEL"]
    base = f"http://127.0.0.1:{router.local_port('http')}/v1"
    client = closed_after_test(
        AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)
    )
    # Token ids: the chart's default has no tokenizer, and pre-tokenized prompts are routed
    # by their KV blocks all the same.
    prompt = [(13 * i + 7) % 30_000 for i in range(int(listener.env["KVR_BLOCK_SIZE"]) * 16)]
    deadline = time.monotonic() + START_S
    # Until the router has learnt every worker from the EndpointSlices.
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(base.removesuffix("/v1") + "/ready") as r:
                body = await r.json()
            if len(body.get("workers", {})) == workers:
                break
            assert time.monotonic() < deadline, f"router workers: {body}\n{logs(pods)}"
            await asyncio.sleep(0.2)
    raw = await client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=2
    )
    first = raw.headers["x-kvrouter-worker"]
    assert first in {f"{pod}:{w['port']}" for pod, w in zip(fleet["pods"], fleet["workers"],
                                                             strict=True)}  # fmt: skip
    # The listener confirmed the blocks from the worker's KV events: its applied sequence.
    from eviction_listener.settings import ListenerSettings
    from kvrouter.index.connection import connect

    # The listener's Redis settings: the same Redis as the router's, and all in its env (a
    # several-model router has its models in a config file).
    r = connect(ListenerSettings.from_env(listener.env).redis_connect_url)
    try:
        while await applied_seq(r, model, first, prefix=listener.env["KVR_KEY_PREFIX"]) is None:
            assert time.monotonic() < deadline, f"no KV events applied for {first}\n{logs(pods)}"
            await asyncio.sleep(0.1)
    finally:
        await r.aclose()
    for _ in range(4):
        raw = await client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=2
        )
        assert raw.headers["x-kvrouter-worker"] == first
        assert int(raw.headers["x-kvrouter-matched-tokens"]) > 0
