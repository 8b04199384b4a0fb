"""The Grafana dashboard shipped in the chart (helm/kv-router/dashboards/kvrouter.json): every
metric its queries name is one the processes really export. The names come from real scrapes:
a router serving a simulated vLLM fleet (whose /metrics stands for vLLM's), and a listener."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings
from kvrouter.sim.fleet import SimFleet
from kvrouter.sim.settings import SimSettings
from router_node.app import RouterServer
from router_node.settings import RouterSettings, WorkerSpec

pytestmark = pytest.mark.redis

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "kv-router" / "dashboards"
DASHBOARD = DASHBOARD / "kvrouter.json"
README = Path(__file__).resolve().parents[1] / "README.md"
# PromQL words that are not metric names.
PROMQL = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "by", "without",
    "histogram_quantile", "le", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported(text: str) -> set[str]:
    """Every series name a scrape can carry, from its families (so a labelled counter that
    has no sample yet still counts): counters with _total, histograms with their parts."""
    names = set()
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def query_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are neither functions,
    keywords, grouping labels, nor inside a [range] or a {matcher}."""
    body = re.sub(r"\[[^\]]*\]|\{[^}]*\}|\"[^\"]*\"", " ", expr)
    labels = {
        lab.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", body)
        for lab in group.split(",")
    }
    return {w for w in IDENT.findall(body) if w not in PROMQL and w not in labels}


def queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_query_parser_finds_metric_names() -> None:
    got = query_metrics(
        'histogram_quantile(0.99, sum by (le, worker) (rate(a_seconds_bucket{x="y"}[5m])))'
        " / sum(vllm:b_total)"
    )
    assert got == {"a_seconds_bucket", "vllm:b_total"}


async def test_every_dashboard_query_names_an_exported_metric(
    redis_url: str, redis_client: Any
) -> None:
    sim = SimSettings(
        workers=2, capacity_tokens=4096, time_scale=200.0, base_port=0, kv_events_base_port=0
    )
    async with SimFleet(sim) as fleet:
        assert fleet.info is not None
        workers = tuple(WorkerSpec.parse(f"{w.id}={w.url}") for w in fleet.info.workers)
        settings = RouterSettings(
            host="127.0.0.1", port=0, redis_url=redis_url, models=(sim.model,),
            workers=workers, health_interval_s=0,
        )  # fmt: skip
        listener = Listener(
            ListenerSettings(
                model=sim.model, redis_url=redis_url, metrics_port=0, metrics_host="127.0.0.1"
            )
        )
        await listener.start()
        try:
            async with RouterServer(settings) as router, aiohttp.ClientSession() as s:
                body = {"model": sim.model, "prompt": list(range(64)), "max_tokens": 4}
                for stream in (False, True):
                    async with s.post(
                        router.url + "/v1/completions", json={**body, "stream": stream}
                    ) as r:
                        assert r.status == 200
                        await r.read()
                async with s.get(router.url + "/metrics") as r:
                    router_text = await r.text()
                async with s.get(fleet.info.workers[0].url + "/metrics") as r:
                    vllm_text = await r.text()
            listener_text = listener.render_metrics()
        finally:
            await listener.close()
    names = exported(router_text) | exported(vllm_text) | exported(listener_text)
    # Time to first byte through the router: one non-streamed and one streamed request.
    ttfb = [
        s.value
        for f in text_string_to_metric_families(router_text)
        for s in f.samples
        if s.name == "kvrouter_time_to_first_byte_seconds_count"
    ]
    assert sum(ttfb) == 2
    qs = queries()
    assert len(qs) >= 20
    for title, expr in qs:
        used = query_metrics(expr)
        # Never the listener's deprecated kvr_listener_* aliases (removed in the next release).
        assert not any(n.startswith("kvr_") for n in used), f"{title}: {expr}"
        assert used, f"{title}: no metric in {expr}"
        missing = used - names
        assert not missing, f"{title}: {sorted(missing)} not exported; query {expr}"
    # The README's "Is it working?" metrics and queries name only what is exported, too.
    cited = set(re.findall(r"\bkvrouter_[a-z0-9_]+", README.read_text()))
    assert len(cited) >= 5 and not cited - names, sorted(cited - names)
    # The list: each of these is on the dashboard.
    titles = " | ".join(t for t, _ in qs).lower()
    for topic in ("hit ratio", "decisions", "first byte", "lookup", "redis", "lag", "gaps",
                  "worker states"):  # fmt: skip
        assert topic in titles, topic
