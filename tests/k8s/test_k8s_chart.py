"""The Helm chart, tested by rendering: lint, template each example, validate every manifest
against the Kubernetes schemas of one release, check what matters, and feed the schema values
it must reject.

Needs a `helm` binary (v3): on PATH or in ~/.cache/kvrouter/bin, where `make helm` builds it
from the Go module proxy. Without one these tests skip and say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is a test extra: pip install -e '.[test]'")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a test extra: pip install -e '.[test]'"
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kv-router"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
KUBE_VERSION = "1.30.0"  # a release kubernetes-validate ships schemas for
CACHED_HELM = Path.home() / ".cache" / "kvrouter" / "bin" / "helm"
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


def check_custom_resource(doc: dict[str, Any]) -> None:
    """The fields each custom resource cannot work without (no schema of theirs here)."""
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert spec["endpoints"] and spec["selector"]["matchLabels"]
    elif doc["kind"] == "InferencePool":
        assert spec["selector"]["matchLabels"]
        assert all(1 <= p["number"] <= 65535 for p in spec["targetPorts"])
        assert spec["endpointPickerRef"]["failureMode"] in ("FailOpen", "FailClose")
    else:
        [rule] = spec["rules"]
        assert spec["parentRefs"] and rule["backendRefs"][0]["kind"] == "InferencePool"


ROUTER_SETTINGS = {
    "KVR_HOST",
    "KVR_PORT",
    "KVR_REDIS_URL",
    "KVR_WORKERS",
    "KVR_MODEL",
    "KVR_TOKENIZER",
    "KVR_BLOCK_SIZE",
    "KVR_POLICY",
    "KVR_KEY_PREFIX",
    "KVR_HASH_SEED",
    "KVR_KV_EVENTS",
    "KVR_DISCOVERY",
    "KVR_K8S_NAMESPACE",
    "KVR_K8S_SELECTOR",
    "KVR_K8S_HTTP_PORT_NAME",
    "KVR_PD_MIN_PREFILL_TOKENS",
    "KVR_PD_SATURATION_TOKENS",
    "KVR_PD_TRANSFER_WEIGHT",
}
LISTENER_SETTINGS = {
    "KVR_REDIS_URL",
    "KVR_MODEL",
    "KVR_BLOCK_SIZE",
    "KVR_KEY_PREFIX",
    "KVR_HASH_SEED",
    "KVR_ENGINES",
    "KVR_METRICS_PORT",
    "KVR_DISCOVERY",
    "KVR_K8S_NAMESPACE",
    "KVR_K8S_SELECTOR",
    "KVR_K8S_HTTP_PORT_NAME",
    "KVR_K8S_EVENTS_PORT_NAME",
    "KVR_K8S_REPLAY_PORT_NAME",
}
SECRET_SETTINGS = {"KVR_REDIS_PASSWORD", "KVR_ADMIN_TOKEN"}

BASE = ["--set", "config.model=llama", "--set", "discovery.kubernetes.selector=app=vllm"]


@cache
def helm_binary() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    return str(CACHED_HELM) if os.access(CACHED_HELM, os.X_OK) else None


@pytest.fixture(scope="module")
def helm() -> str:
    binary = helm_binary()
    if binary is None and os.environ.get("KVR_REQUIRE_HELM"):
        pytest.fail(f"KVR_REQUIRE_HELM is set (CI) but helm is not on PATH or in {CACHED_HELM}")
    if binary is None:
        pytest.skip(
            f"helm not found on PATH or in {CACHED_HELM.parent}: run `make helm` (builds the "
            "pinned release with Go) or install helm 3 from your package manager"
        )
    return binary


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def render(helm: str, *args: str, release: str = "kvr") -> list[dict[str, Any]]:
    """`helm template` -> the parsed manifests; fails the test with helm's stderr."""
    proc = run_helm(
        helm,
        "template",
        release,
        str(CHART),
        "--namespace",
        "llm",
        "--kube-version",
        KUBE_VERSION,
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(docs: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, got {len(hits)}"
    return hits[0]


def kinds(docs: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    [c] = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env_names(c: dict[str, Any]) -> set[str]:
    return {e["name"] for e in c.get("env") or []}


def secret_ref(c: dict[str, Any], name: str) -> tuple[str, str]:
    [e] = [e for e in c["env"] if e["name"] == name]
    ref = e["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


# -- lint and render every example ---------------------------------------------------------------


def test_examples_exist() -> None:
    assert [p.name for p in EXAMPLES] == [
        "disaggregated.yaml",
        "epp.yaml",
        "external-redis-cluster.yaml",
        "minimal.yaml",
        "production.yaml",
        "two-models.yaml",
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_helm_lint(helm: str, example: Path) -> None:
    proc = run_helm(helm, "lint", str(CHART), "--strict", "-f", str(example))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_manifests_validate_against_kubernetes_schemas(helm: str, example: Path) -> None:
    docs = render(helm, "-f", str(example))
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            check_custom_resource(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "kvr"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


# -- what the minimal install must get right -----------------------------------------------------


@pytest.fixture(scope="module")
def minimal(helm: str) -> list[dict[str, Any]]:
    return render(helm, "-f", str(CHART / "examples" / "minimal.yaml"))


def test_minimal_install_objects(minimal: list[dict[str, Any]]) -> None:
    assert kinds(minimal) == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "Service",
            "Service",
            "ServiceAccount",
            "StatefulSet",
        ]
    )


def test_router_pods_are_probed_locked_down_and_spread(minimal: list[dict[str, Any]]) -> None:
    deploy = find(minimal, "Deployment", "kvr-kv-router-router")
    pod = deploy["spec"]["template"]["spec"]
    c = container(deploy, "router")
    assert c["args"] == ["serve"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsUser"] != 0
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert pod["enableServiceLinks"] is False  # no KVR_PORT=tcp://... from a Service "kvr"
    keys = [t["topologyKey"] for t in pod["topologySpreadConstraints"]]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    assert deploy["spec"]["replicas"] == 2
    assert c["resources"]["requests"]["cpu"]
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= set(annotations)


def test_checksum_matches_the_rendered_configmap(minimal: list[dict[str, Any]], helm: str) -> None:
    proc = run_helm(
        helm,
        "template",
        "kvr",
        str(CHART),
        "--namespace",
        "llm",
        "--kube-version",
        KUBE_VERSION,
        "-f",
        str(CHART / "examples" / "minimal.yaml"),
        "--show-only",
        "templates/router/configmap.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    body = proc.stdout.split("\n", 2)[2]  # drop "---" and "# Source: ..."
    deploy = find(minimal, "Deployment", "kvr-kv-router-router")
    expected = deploy["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert hashlib.sha256(body.encode()).hexdigest() == expected


def checksums(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def test_config_changes_roll_only_the_pods_they_concern(helm: str) -> None:
    before = checksums(render(helm, *BASE))
    after_policy = checksums(render(helm, *BASE, "--set", "router.policy=least_load"))
    router, listener = "kvr-kv-router-router", "kvr-kv-router-listener"
    assert after_policy[router]["checksum/config"] != before[router]["checksum/config"]
    assert after_policy[listener]["checksum/config"] == before[listener]["checksum/config"]
    after_model = checksums(render(helm, *BASE, "--set", "config.model=other"))
    assert after_model[listener]["checksum/config"] != before[listener]["checksum/config"]
    # Generated secrets differ per render; the checksum of the secret settings must not.
    assert before[router]["checksum/secret"] == after_policy[router]["checksum/secret"]
    after_pw = checksums(render(helm, *BASE, "--set", "redis.auth.password=changed"))
    assert after_pw[router]["checksum/secret"] != before[router]["checksum/secret"]


def test_settings_use_the_agreed_names(minimal: list[dict[str, Any]]) -> None:
    router_cm = find(minimal, "ConfigMap", "kvr-kv-router-router")["data"]
    listener_cm = find(minimal, "ConfigMap", "kvr-kv-router-listener")["data"]
    assert set(router_cm) <= ROUTER_SETTINGS, set(router_cm) - ROUTER_SETTINGS
    assert set(listener_cm) <= LISTENER_SETTINGS, set(listener_cm) - LISTENER_SETTINGS
    assert router_cm["KVR_REDIS_URL"] == "redis://kvr-kv-router-redis.llm.svc:6379/0"
    assert router_cm["KVR_MODEL"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert router_cm["KVR_DISCOVERY"] == "kubernetes" and router_cm["KVR_KV_EVENTS"] == "true"
    assert router_cm["KVR_K8S_SELECTOR"] == "kubernetes.io/service-name=vllm"
    assert router_cm["KVR_K8S_NAMESPACE"] == "llm"
    assert listener_cm["KVR_K8S_REPLAY_PORT_NAME"] == "kv-replay"
    assert listener_cm["KVR_METRICS_PORT"] == "9100"
    assert all(isinstance(v, str) for v in [*router_cm.values(), *listener_cm.values()])
    router = container(find(minimal, "Deployment", "kvr-kv-router-router"), "router")
    listener = container(find(minimal, "Deployment", "kvr-kv-router-listener"), "listener")
    assert env_names(router) == SECRET_SETTINGS
    assert env_names(listener) == {"KVR_REDIS_PASSWORD"}
    assert secret_ref(router, "KVR_ADMIN_TOKEN") == ("kvr-kv-router", "admin-token")
    assert secret_ref(listener, "KVR_REDIS_PASSWORD") == ("kvr-kv-router", "redis-password")
    secret = find(minimal, "Secret", "kvr-kv-router")
    assert set(secret["data"]) == {"admin-token", "redis-password"}


def test_rbac_is_read_only_endpointslices(minimal: list[dict[str, Any]]) -> None:
    role = find(minimal, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = find(minimal, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kvr-kv-router", "namespace": "llm"}
    ]
    assert find(minimal, "ServiceAccount")["automountServiceAccountToken"] is False
    for name in ("kvr-kv-router-router", "kvr-kv-router-listener"):
        pod = find(minimal, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is True
        assert pod["serviceAccountName"] == "kvr-kv-router"


def test_epp_switch_installs_the_picker_its_service_rbac_pool_and_route(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "epp.yaml"))
    deploy = find(docs, "Deployment", "kvr-kv-router-epp")
    c = container(deploy, "epp")
    assert c["args"] == ["epp"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KVR_K8S_INFERENCE_POOL"] == "llama-pool"
    assert env["KVR_EPP_PORT"] == "9002" and env["KVR_DISCOVERY"] == "kubernetes"
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert deploy["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    svc = find(docs, "Service", "kvr-kv-router-epp")
    pool = find(docs, "InferencePool", "llama-pool")
    ref = pool["spec"]["endpointPickerRef"]
    # The pool names the picker's Service and its ext_proc port.
    assert ref["name"] == svc["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    route = find(docs, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == "llama-pool"
    role = find(docs, "Role", "kvr-kv-router-epp")
    assert {r["apiGroups"][0]: r["resources"] for r in role["rules"]} == {
        "": ["pods"],
        "inference.networking.k8s.io": ["inferencepools"],
    }
    assert all(r["verbs"] == ["get", "list", "watch"] for r in role["rules"])
    # Off by default: the minimal install has no picker.
    plain = render(helm, *BASE)
    assert not [d for d in plain if d["metadata"]["name"].endswith("-epp")]


def test_static_discovery_needs_no_api_access(helm: str) -> None:
    docs = render(
        helm,
        "--set",
        "config.model=m",
        "--set",
        "discovery.mode=static",
        "--set",
        "discovery.static.workers={vllm-0=http://10.0.0.1:8000,http://10.0.0.2:8000}",
        "--set",
        "discovery.static.engines={vllm-0=tcp://10.0.0.1:5557}",
    )
    assert "Role" not in kinds(docs) and "RoleBinding" not in kinds(docs)
    router_cm = find(docs, "ConfigMap", "kvr-kv-router-router")["data"]
    assert router_cm["KVR_WORKERS"] == "vllm-0=http://10.0.0.1:8000,http://10.0.0.2:8000"
    assert "KVR_K8S_SELECTOR" not in router_cm
    assert find(docs, "ConfigMap", "kvr-kv-router-listener")["data"]["KVR_ENGINES"]
    pod = find(docs, "Deployment", "kvr-kv-router-router")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False


def test_bundled_redis(minimal: list[dict[str, Any]]) -> None:
    sts = find(minimal, "StatefulSet", "kvr-kv-router-redis")
    c = container(sts, "redis")
    assert c["image"] == "docker.io/library/redis:7.4"
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert secret_ref(c, "REDISCLI_AUTH") == ("kvr-kv-router", "redis-password")
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 999
    svc = find(minimal, "Service", "kvr-kv-router-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379


def test_bundled_redis_without_password(helm: str) -> None:
    docs = render(helm, *BASE, "--set", "redis.auth.enabled=false")
    args = container(find(docs, "StatefulSet"), "redis")["args"]
    assert "--requirepass" not in args and args[args.index("--protected-mode") + 1] == "no"
    listener = container(find(docs, "Deployment", "kvr-kv-router-listener"), "listener")
    assert "env" not in listener
    assert set(find(docs, "Secret")["data"]) == {"admin-token"}


def test_notice_users_boot_a_real_redis_that_enforces_them(helm: str) -> None:
    """The bundled Redis's per-worker notice users, rendered and then given to a real
    redis-server as the kubelet would (the $(VAR) passwords expanded): each may publish on its
    own notice channel only."""
    import redis

    from kvrouter.redisproc import RedisServer

    docs = render(
        helm,
        *BASE,
        *("--set", "redis.noticeUsers[0].worker=vllm-0:8000"),
        *("--set", "redis.noticeUsers[0].existingSecret=notice-w0"),
        *("--set", "redis.noticeUsers[1].worker=vllm-1:8000"),
        *("--set", "redis.noticeUsers[1].existingSecret=notice-w1"),
        *("--set", "redis.noticeUsers[1].passwordKey=pw"),
    )
    c = container(find(docs, "StatefulSet"), "redis")
    assert secret_ref(c, "NOTICE_USER_PASSWORD_0") == ("notice-w0", "password")
    assert secret_ref(c, "NOTICE_USER_PASSWORD_1") == ("notice-w1", "pw")
    args = c["args"]
    first = args.index("--user")  # only the ACL part: the pod's paths and port are its own
    env = {
        "REDIS_PASSWORD": "admin",
        "NOTICE_USER_PASSWORD_0": "p0",
        "NOTICE_USER_PASSWORD_1": "p1",
    }
    acl = ["--requirepass", "$(REDIS_PASSWORD)", *args[first:]]
    for name, value in env.items():
        acl = [a.replace(f"$({name})", value) for a in acl]
    with RedisServer(args=acl) as server:
        w0 = redis.Redis(port=server.port, username="notices-vllm-0:8000", password="p0")
        try:
            assert w0.publish("kvr:{llama}:notices:vllm-0:8000", b"x") == 0
            for channel in ("kvr:{llama}:notices:vllm-1:8000", "kvr:{llama}:notices"):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    w0.publish(channel, b"x")
            with pytest.raises(redis.exceptions.NoPermissionError):
                w0.set("kvr:{llama}:meta", 1)
        finally:
            w0.close()


def test_grafana_dashboard_configmap(helm: str, minimal: list[dict[str, Any]]) -> None:
    """Off by default; on, a ConfigMap with the sidecar's label holding the dashboard file
    byte for byte (its queries are checked against real scrapes in tests/test_dashboard.py)."""
    assert not any(d["metadata"]["name"].endswith("-dashboard") for d in minimal)
    docs = render(
        helm, *BASE, "--set", "metrics.grafanaDashboard.enabled=true",
        "--set", "metrics.grafanaDashboard.namespace=monitoring",
    )  # fmt: skip
    cm = find(docs, "ConfigMap", "kvr-kv-router-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    shipped = (CHART / "dashboards" / "kvrouter.json").read_text()
    assert json.loads(cm["data"]["kvrouter.json"]) == json.loads(shipped)


def test_listener_off_turns_kv_events_off(helm: str) -> None:
    docs = render(helm, *BASE, "--set", "listener.enabled=false")
    names = [d["metadata"]["name"] for d in docs]
    assert not [n for n in names if n.endswith("-listener")]
    assert find(docs, "ConfigMap")["data"]["KVR_KV_EVENTS"] == "false"


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_tokenizer_from_inline_configmap(helm: str, tmp_path: Path) -> None:
    tokenizer = {"source": "configMap", "configMap": {"files": {"tokenizer.json": "{}"}}}
    docs = render(helm, *BASE, "-f", values_file(tmp_path, {"tokenizer": tokenizer}))
    cm = find(docs, "ConfigMap", "kvr-kv-router-tokenizer")
    assert cm["data"] == {"tokenizer.json": "{}"}
    router = find(docs, "Deployment", "kvr-kv-router-router")
    assert find(docs, "ConfigMap", "kvr-kv-router-router")["data"]["KVR_TOKENIZER"] == (
        "/etc/kvrouter/tokenizer"
    )
    volumes = router["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tokenizer", "configMap": {"name": "kvr-kv-router-tokenizer"}} in volumes


# -- the other examples ----------------------------------------------------------------------------


def test_external_redis_cluster_with_tls(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "external-redis-cluster.yaml"))
    assert "StatefulSet" not in kinds(docs)
    url = find(docs, "ConfigMap", "kvr-kv-router-router")["data"]["KVR_REDIS_URL"]
    assert url == (
        "rediss+cluster://default@redis-cluster.redis.svc.cluster.local:6379"
        "?ssl_ca_certs=/etc/kvrouter/redis-tls/ca.crt"
    )
    for name, cname in (("kvr-kv-router-router", "router"), ("kvr-kv-router-listener", "listener")):
        deploy = find(docs, "Deployment", name)
        c = container(deploy, cname)
        assert secret_ref(c, "KVR_REDIS_PASSWORD") == ("redis-credentials", "password")
        mount = {"name": "redis-tls", "mountPath": "/etc/kvrouter/redis-tls", "readOnly": True}
        assert mount in c["volumeMounts"]
        volumes = deploy["spec"]["template"]["spec"]["volumes"]
        tls_volume = {"secretName": "redis-tls", "defaultMode": 0o440}
        assert {"name": "redis-tls", "secret": tls_volume} in volumes
    # The Role goes where the vLLM Service is; the subject stays in the release namespace.
    assert find(docs, "Role")["metadata"]["namespace"] == "inference"
    assert find(docs, "RoleBinding")["subjects"][0]["namespace"] == "llm"
    assert set(find(docs, "Secret")["data"]) == {"admin-token"}


def test_mutual_tls_adds_client_cert_options(helm: str) -> None:
    docs = render(
        helm,
        *BASE,
        "--set",
        "redis.enabled=false",
        "--set",
        "externalRedis.url=rediss://redis.example:6380/0?ssl_cert_reqs=required",
        "--set",
        "externalRedis.tls.enabled=true",
        "--set",
        "externalRedis.tls.existingSecret=t",
        "--set",
        "externalRedis.tls.clientCert=true",
    )
    url = find(docs, "ConfigMap", "kvr-kv-router-listener")["data"]["KVR_REDIS_URL"]
    assert url == (
        "rediss://redis.example:6380/0?ssl_cert_reqs=required"
        "&ssl_ca_certs=/etc/kvrouter/redis-tls/ca.crt"
        "&ssl_certfile=/etc/kvrouter/redis-tls/tls.crt&ssl_keyfile=/etc/kvrouter/redis-tls/tls.key"
    )


def test_production_example(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "production.yaml"))
    assert "Secret" not in kinds(docs)  # every secret comes from an existing Secret
    deploy = find(docs, "Deployment", "kvr-kv-router-router")
    assert "replicas" not in deploy["spec"]  # the HPA owns it
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "kvr-kv-router-router"
    assert find(docs, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 2,
        "selector": deploy["spec"]["selector"],
    }
    pod = deploy["spec"]["template"]["spec"]
    c = container(deploy, "router")
    assert c["image"] == "registry.example.com/ml/kvrouter:0.1.0"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert secret_ref(c, "KVR_ADMIN_TOKEN") == ("kvrouter-admin", "token")
    [init] = pod["initContainers"]
    assert {"name": "tokenizer", "mountPath": "/etc/kvrouter/tokenizer"} in init["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"]
    assert find(docs, "ConfigMap", "kvr-kv-router-router")["data"]["KVR_TOKENIZER"] == (
        "/etc/kvrouter/tokenizer"
    )
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sorted(m["spec"]["endpoints"][0]["port"] for m in monitors) == ["http", "metrics"]
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"kvr-kv-router-router", "kvr-kv-router-listener"}
    router_from = policies["kvr-kv-router-router"]["spec"]["ingress"][0]["from"]
    assert len(router_from) == 2
    url = find(docs, "ConfigMap", "kvr-kv-router-router")["data"]["KVR_REDIS_URL"]
    assert url.startswith("redis+sentinel://") and url.endswith("/kvrouter")
    assert find(docs, "Deployment", "kvr-kv-router-listener")["spec"]["replicas"] == 2


def test_network_policy_limits_bundled_redis_to_its_clients(helm: str) -> None:
    docs = render(helm, *BASE, "--set", "networkPolicy.enabled=true")
    redis_np = find(docs, "NetworkPolicy", "kvr-kv-router-redis")
    peers = redis_np["spec"]["ingress"][0]["from"]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers] == [
        "router",
        "listener",
    ]
    router_np = find(docs, "NetworkPolicy", "kvr-kv-router-router")
    assert "from" not in router_np["spec"]["ingress"][0]  # no peers listed: anyone may call


# -- values the chart must refuse ----------------------------------------------------------------

BAD_VALUES = {
    "unknown-policy": (["--set", "router.policy=fastest"], "/router/policy"),
    "negative-replicas": (["--set", "router.replicaCount=-1"], "/router/replicaCount"),
    "replicas-as-text": (["--set-string", "router.replicaCount=two"], "/router/replicaCount"),
    "misspelt-key": (["--set", "router.replicas=3"], "additional properties 'replicas'"),
    "no-model": (["--set", "config.model="], "/config/model"),
    "model-with-space": (["--set", "config.model=my model"], "/config/model"),
    "model-with-braces": (["--set", "config.model=a{b}"], "/config/model"),
    "zero-block-size": (["--set", "config.blockSize=0"], "/config/blockSize"),
    "unknown-discovery": (["--set", "discovery.mode=consul"], "/discovery/mode"),
    "no-selector": (["--set", "discovery.kubernetes.selector="], "/discovery/kubernetes/selector"),
    "static-without-workers": (["--set", "discovery.mode=static"], "/discovery/static/workers"),
    "bad-port-name": (
        ["--set", "discovery.kubernetes.eventsPortName=KV_EVENTS"],
        "/discovery/kubernetes/eventsPortName",
    ),
    "external-redis-without-url": (["--set", "redis.enabled=false"], "/externalRedis/url"),
    "password-in-url": (
        ["--set", "redis.enabled=false", "--set", "externalRedis.url=redis://u:hunter2@r:6379"],
        "/externalRedis/url",
    ),
    "not-a-redis-url": (
        ["--set", "redis.enabled=false", "--set", "externalRedis.url=http://r:6379"],
        "/externalRedis/url",
    ),
    "tls-on-plain-url": (
        [
            "--set",
            "redis.enabled=false",
            "--set",
            "externalRedis.url=redis://r:6379",
            "--set",
            "externalRedis.tls.enabled=true",
            "--set",
            "externalRedis.tls.existingSecret=t",
        ],
        "/externalRedis/url",
    ),
    "tls-without-secret": (
        [
            "--set",
            "redis.enabled=false",
            "--set",
            "externalRedis.url=rediss://r:6379",
            "--set",
            "externalRedis.tls.enabled=true",
        ],
        "/externalRedis/tls/existingSecret",
    ),
    "configmap-tokenizer-without-files": (
        ["--set", "tokenizer.source=configMap"],
        "/tokenizer/configMap",
    ),
    "unknown-tokenizer-source": (["--set", "tokenizer.source=s3"], "/tokenizer/source"),
    "init-tokenizer-without-image": (
        ["--set", "tokenizer.source=initContainer"],
        "/tokenizer/initContainer/image",
    ),
    "bad-service-type": (["--set", "router.service.type=Ingress"], "/router/service/type"),
    "port-out-of-range": (["--set", "router.containerPort=70000"], "/router/containerPort"),
    "bad-maxmemory": (["--set", "redis.maxmemory=lots"], "/redis/maxmemory"),
    "notice-user-glob-worker": (
        [
            "--set",
            "redis.noticeUsers[0].worker=vllm-*",
            "--set",
            "redis.noticeUsers[0].existingSecret=s",
        ],
        "/redis/noticeUsers/0/worker",
    ),
    "no-rbac-no-account": (
        ["--set", "rbac.create=false"],
        "with rbac.create=false needs serviceAccount.name",
    ),
    "hpa-min-above-max": (
        [
            "--set",
            "router.autoscaling.enabled=true",
            "--set",
            "router.autoscaling.minReplicas=5",
            "--set",
            "router.autoscaling.maxReplicas=2",
        ],
        "minReplicas (5) must not exceed maxReplicas (2)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected_with_the_reason(helm: str, case: str) -> None:
    args, reason = BAD_VALUES[case]
    proc = run_helm(
        helm, "template", "kvr", str(CHART), "--kube-version", KUBE_VERSION, *BASE, *args
    )
    assert proc.returncode != 0, f"{case}: accepted\n{proc.stdout[:2000]}"
    assert reason in proc.stderr, proc.stderr


def test_defaults_alone_ask_for_the_model(helm: str) -> None:
    proc = run_helm(helm, "template", "kvr", str(CHART))
    assert proc.returncode != 0
    assert "/config/model" in proc.stderr


def test_notes_tell_how_to_reach_it_and_inspect_redis(helm: str, tmp_path: Path) -> None:
    # `helm install --dry-run` needs a cluster to render NOTES.txt; a copy of the chart with
    # one more template that puts the same text (the "kv-router.notes" helper) in a ConfigMap
    # renders it with `helm template`.
    chart = tmp_path / "kv-router"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "kv-router.notes" . | quote }}}\n'
    )
    proc = run_helm(
        helm,
        "template",
        "kvr",
        str(chart),
        "--namespace",
        "llm",
        "--kube-version",
        KUBE_VERSION,
        "-f",
        str(CHART / "examples" / "minimal.yaml"),
        "--show-only",
        "templates/notes-probe.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["data"]["notes"]
    assert "kubectl port-forward -n llm svc/kvr-kv-router 8000:8000" in notes
    assert (
        "kubectl exec -n llm statefulset/kvr-kv-router-redis -- redis-cli --scan --pattern 'kvr:*'"
        in notes
    )
    assert "'kvr:{meta-llama/Llama-3.1-8B-Instruct}:workers'" in notes
    assert "kubectl get endpointslices -n llm -l 'kubernetes.io/service-name=vllm'" in notes
    assert "{{" not in notes and "<no value>" not in notes
    assert (CHART / "templates" / "NOTES.txt").read_text().strip() == (
        '{{ include "kv-router.notes" . }}'
    )


# -- docs/kubernetes.md ---------------------------------------------------------------------

DOC = ROOT / "docs" / "kubernetes.md"


def test_doc_vllm_manifests_are_valid_and_publish_kv_events() -> None:
    text = DOC.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    # Kubernetes manifests only (the page's values snippets are not).
    docs = [d for block in blocks for d in yaml.safe_load_all(block) if d and "apiVersion" in d]
    assert sorted(d["kind"] for d in docs) == ["Service", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    sts, svc = sorted(docs, key=lambda d: d["kind"], reverse=True)
    [c] = sts["spec"]["template"]["spec"]["containers"]
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "") for a in c["args"])
    assert args["block-size"] == "16" and "enable-prefix-caching" in args
    events = json.loads(args["kv-events-config"])
    assert events == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
    }
    assert [p["name"] for p in c["ports"]] == ["http", "kv-events", "kv-replay"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http", "kv-events", "kv-replay"]


def test_doc_settings_table_names_every_variable_the_chart_sets() -> None:
    text = DOC.read_text()
    for name in ROUTER_SETTINGS | LISTENER_SETTINGS | SECRET_SETTINGS:
        assert f"`{name}`" in text, name


def test_disaggregated_example_sets_the_pd_settings(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "disaggregated.yaml"))
    cm = find(docs, "ConfigMap", "kvr-kv-router-router")["data"]
    assert cm["KVR_K8S_SELECTOR"] == "app.kubernetes.io/part-of=vllm-pd"
    assert cm["KVR_PD_MIN_PREFILL_TOKENS"] == "512"
    assert cm["KVR_PD_SATURATION_TOKENS"] == "65536"
    assert cm["KVR_PD_TRANSFER_WEIGHT"] == "0.1"
    # Values the router would reject are rejected by the schema first.
    for bad in ("router.disaggregation.minPrefillTokens=-1",
                "router.disaggregation.transferWeight=-0.5"):  # fmt: skip
        proc = run_helm(helm, "template", "kvr", str(CHART), "--set", bad)
        assert proc.returncode != 0 and "disaggregation" in proc.stderr


def test_static_engines_as_the_chart_joins_them_parse_in_the_listener(helm: str) -> None:
    # The chart joins discovery.static.engines with ","; entries carry ",replay=" options.
    from eviction_listener.settings import ListenerSettings

    docs = render(
        helm,
        "--set", "config.model=llama",
        "--set", "discovery.mode=static",
        "--set", "discovery.static.workers={http://10.0.0.1:8000,http://10.0.0.2:8000}",
        "--set", r"discovery.static.engines={a=tcp://10.0.0.1:5557\,replay=tcp://10.0.0.1:5558,"
        "b=tcp://10.0.0.2:5557}",
    )  # fmt: skip
    data = find(docs, "ConfigMap", "kvr-kv-router-listener")["data"]
    engines = ListenerSettings.from_env(data).engines
    assert [(e.worker_id, e.replay_endpoint) for e in engines] == [
        ("a", "tcp://10.0.0.1:5558"),
        ("b", None),
    ]


def test_router_drains_before_sigterm_and_listener_readiness_is_ready(helm: str) -> None:
    docs = render(helm, *BASE)
    router = container(find(docs, "Deployment", "kvr-kv-router-router"), "router")
    pod = find(docs, "Deployment", "kvr-kv-router-router")["spec"]["template"]["spec"]
    sleep = router["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep < pod["terminationGracePeriodSeconds"]
    assert router["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    listener = container(find(docs, "Deployment", "kvr-kv-router-listener"), "listener")
    assert listener["readinessProbe"]["httpGet"]["path"] == "/ready"


@pytest.mark.parametrize(("example", "warned"), [("minimal", True), ("production", False)])
def test_notes_warn_when_the_router_has_no_tokenizer(
    helm: str, tmp_path: Path, example: str, warned: bool
) -> None:
    # As above: NOTES rendered through a ConfigMap in a copy of the chart.
    chart = tmp_path / "kv-router"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "kv-router.notes" . | quote }}}\n'
    )
    proc = run_helm(
        helm, "template", "kvr", str(chart), "--namespace", "llm", "--kube-version",
        KUBE_VERSION, "-f", str(CHART / "examples" / f"{example}.yaml"),
        "--show-only", "templates/notes-probe.yaml",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["data"]["notes"]
    assert ("routed by load only" in notes) is warned
    assert "degraded" in notes  # readiness does not need Redis


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([], "config.model=meta-llama/Llama-3.1-8B-Instruct"),
        (["--set", "config.model=llama"], "selector=kubernetes.io/service-name=vllm"),
    ],
)
def test_required_values_fail_with_an_example(helm: str, args: list[str], named: str) -> None:
    proc = run_helm(helm, "template", "kvr", str(CHART), *args)
    assert proc.returncode != 0 and "is required" in proc.stderr and named in proc.stderr
    assert "validation failed" not in proc.stderr  # not a raw schema error


@pytest.mark.parametrize(
    "engine", ["tcp://10.0.0.1:5557", "vllm-0=10.0.0.1:5557", "vllm-0=tcp://h:1,replay"]
)
def test_static_engines_without_an_id_fail_with_an_example(helm: str, engine: str) -> None:
    # The listener rejects them at start; the chart says so at install, naming the entry.
    proc = run_helm(
        helm, "template", "kvr", str(CHART), "--set", "config.model=m",
        "--set", "discovery.mode=static",
        "--set", "discovery.static.workers={vllm-0=http://10.0.0.1:8000}",
        "--set", "discovery.static.engines={" + engine.replace(",", "\\,") + "}",
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert "/discovery/static/engines" in proc.stderr and engine in proc.stderr
    assert "vllm-0=tcp://10.0.0.1:5557,replay=" in proc.stderr  # the example


def test_two_models_render_a_models_file_and_a_listener_each(helm: str, tmp_path: Path) -> None:
    from eviction_listener.settings import ListenerSettings
    from router_node.settings import RouterSettings

    docs = render(helm, "-f", str(CHART / "examples" / "two-models.yaml"))
    router_cm = find(docs, "ConfigMap", "kvr-kv-router-router")["data"]
    assert "KVR_MODEL" not in router_cm and router_cm["KVR_CONFIG"] == "/etc/kvrouter/models.yaml"
    models_file = find(docs, "ConfigMap", "kvr-kv-router-router-models")["data"]["models.yaml"]
    path = tmp_path / "models.yaml"
    path.write_text(models_file)
    # The router reads it as its own --config file.
    settings = RouterSettings.load(None, {**router_cm, "KVR_CONFIG": str(path)})
    sizes = {m.name: m.block_size for m in settings.model_configs}
    assert sizes == {"meta-llama/Llama-3.1-8B-Instruct": 16, "Qwen/Qwen2.5-7B-Instruct": 32,
                     "sql-lora": None}  # fmt: skip
    listeners = {
        d["metadata"]["name"]: ListenerSettings.from_env(
            find(docs, "ConfigMap", d["metadata"]["name"])["data"]
        )
        for d in docs
        if d["kind"] == "Deployment" and "listener" in d["metadata"]["name"]
    }
    assert {n: (s.model, s.block_size, s.k8s_selector) for n, s in listeners.items()} == {
        "kvr-kv-router-listener-llama": ("meta-llama/Llama-3.1-8B-Instruct", 16,
                                         "kvrouter.io/fleet=main,kvrouter.io/model=llama"),
        "kvr-kv-router-listener-qwen": ("Qwen/Qwen2.5-7B-Instruct", 32,
                                        "kvrouter.io/fleet=main,kvrouter.io/model=qwen"),
    }  # fmt: skip
    selectors = [find(docs, "Deployment", n)["spec"]["selector"]["matchLabels"] for n in listeners]
    assert selectors[0] != selectors[1]  # two Deployments never adopt each other's pods


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "config.model=a", "--set", "config.models[0].name=b"], "are exclusive"),
        (["--set", "config.models[0].name=org/m", "--set", "config.models[1].name=other/m"],
         "give one an `id`"),
    ],
)  # fmt: skip
def test_bad_model_lists_fail_with_a_reason(helm: str, args: list[str], named: str) -> None:
    proc = run_helm(helm, "template", "kvr", str(CHART), *BASE[2:], *args)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr


def test_helm_show_readme_names_the_required_values(helm: str) -> None:
    readme = run_helm(helm, "show", "readme", str(CHART)).stdout
    assert "config.model" in readme and "discovery.kubernetes.selector" in readme
    assert "docker push" in readme and "routed by load only" in readme


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_every_rendered_variable_is_a_setting_of_its_process(helm: str, example: Path) -> None:
    # From the one settings schema, not a list kept by hand: a name the process does not
    # know would be ignored at run time (or, if close to a real one, stop it).
    from eviction_listener.settings import ListenerSettings
    from router_node.settings import RouterSettings

    docs = render(helm, "-f", str(example))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    for d in deployments:
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        cls = {"router": RouterSettings, "listener": ListenerSettings}.get(component)
        if cls is None:
            continue
        known = {cls.env_name(n) for n in cls.settable()}
        c = container(d, component)
        # Every listener of a several-model install has a ConfigMap of its own.
        names = set(find(docs, "ConfigMap", d["metadata"]["name"])["data"])
        names |= {e["name"] for e in c.get("env") or [] if e["name"].startswith("KVR_")}
        assert names <= known, (component, sorted(names - known))
