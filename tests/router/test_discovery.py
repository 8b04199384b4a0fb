"""Workers from Kubernetes EndpointSlices (a fake API server speaking LIST and WATCH over
HTTP), and Redis AUTH through KVR_REDIS_PASSWORD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvrouter.discovery import ApiServer, KubernetesEndpointSource
from kvrouter.redisproc import RedisServer
from router_node.settings import RouterSettings, SettingsError, kubernetes_source
from tests.k8s.test_k8s_discovery import NS, SELECTOR, FakeApiServer, endpoint, eslice
from tests.router.conftest import MODEL, StartRouter, get_json, openai_client, post, wait_for
from tests.support.fake_worker import FakeWorker

pytestmark = pytest.mark.redis


async def test_kubernetes_discovery_adds_and_removes_workers(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    async with FakeApiServer() as api:
        for i, w in enumerate(workers[:2]):
            api.put(
                eslice(f"vllm-{i}", [endpoint("127.0.0.1", f"vllm-{i}")], ports={"http": w.port})
            )
        source = KubernetesEndpointSource(
            ApiServer(api.url, token=api.token), NS, SELECTOR, backoff_initial_s=0.01
        )
        router = await start_router(
            [], discovery="kubernetes", k8s_selector=SELECTOR, endpoint_source=source
        )
        ids = {f"vllm-{i}:{w.port}" for i, w in enumerate(workers[:2])}

        async def both_up() -> bool:
            _, ready = await get_json(router.url + "/ready")
            return set(ready["workers"]) == ids and set(ready["workers"].values()) == {"up"}

        await wait_for(both_up)
        r = await openai_client(router).completions.with_raw_response.create(
            model=MODEL, prompt=[1, 2, 3]
        )
        assert r.headers["x-kvrouter-worker"] in ids

        api.delete("vllm-0")
        api.delete("vllm-1")

        async def gone() -> bool:
            status, _ = await get_json(router.url + "/ready")
            return status == 503

        await wait_for(gone)
        status, _, _ = await post(
            router.url + "/v1/completions", json={"model": MODEL, "prompt": [1]}
        )
        assert status == 503


def test_kubernetes_settings() -> None:
    with pytest.raises(SettingsError, match="KVR_K8S_SELECTOR"):
        RouterSettings(models=("m",), discovery="kubernetes")
    with pytest.raises(SettingsError, match="KVR_DISCOVERY"):
        RouterSettings(models=("m",), discovery="consul")
    s = RouterSettings(
        models=("m",),
        discovery="kubernetes",
        k8s_selector=SELECTOR,
        k8s_namespace=NS,
        k8s_api_url="http://127.0.0.1:8001",
        k8s_http_port_name="api",
    )
    src = kubernetes_source(s)
    assert (src.namespace, src.selector, src.ports.http) == (NS, SELECTOR, "api")
    assert src.api.url == "http://127.0.0.1:8001"


def test_redis_password_is_merged_and_redacted() -> None:
    s = RouterSettings.from_env(
        {
            "KVR_MODEL": "m",
            "KVR_REDIS_URL": "rediss://kvrouter@redis:6380/2?ssl_ca_certs=/ca.pem",
            "KVR_REDIS_PASSWORD": "p@ss/word",
        }
    )
    assert (
        s.redis_connect_url == "rediss://kvrouter:p%40ss%2Fword@redis:6380/2?ssl_ca_certs=/ca.pem"
    )
    assert "p@ss" not in repr(s) and "redis_password='***'" in repr(s)
    # A password already in the URL wins.
    t = s.with_(redis_url="redis://:inurl@redis:6379/0")
    assert t.redis_connect_url == "redis://:inurl@redis:6379/0"


async def test_redis_auth_with_the_password_setting(
    start_router: StartRouter, workers: list[FakeWorker], tmp_path: Path
) -> None:
    with RedisServer(args=("--requirepass", "s3cret!")) as redis:
        denied = await start_router(workers, redis_url=redis.url)
        _, ready = await get_json(denied.url + "/ready")
        assert ready["redis"] == "down"  # no password: refused, still routing
        router = await start_router(workers, redis_url=redis.url, redis_password="s3cret!")
        _, ready = await get_json(router.url + "/ready")
        assert ready["redis"] == "up"
        out: Any = await openai_client(router).completions.create(model=MODEL, prompt=[1, 2, 3])
        assert out.choices
