"""The router's settings: the shared schema (kvrouter/settings.py) plus the router's own fields.

`RouterSettings.from_env()` reads the environment, `RouterSettings.load(args, environ)` lays
the config file under it and flags over it (flags win), and `add_arguments(parser)` builds the
flags. Errors (`SettingsError`) name the variable or flag, the value and what is allowed.

docs/settings.md lists every setting; tests/test_settings_schema.py keeps it in step.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, Literal, cast
from urllib.parse import urlsplit

from pydantic import PlainValidator, SecretStr, field_validator, model_validator

from kvrouter.index.keys import KeyNameError, validate_worker_id
from kvrouter.settings import (
    DISCOVERY_MODES,
    Bool,
    CommaList,
    Int,
    SettingsError,
    SharedSettings,
    comma_list,
    environ,
    setting,
)
from router_node.models import (
    ConfigError,
    ConfigFile,
    ModelCatalogue,
    ModelConfig,
    load_config_file,
)
from router_node.scoring import POLICIES
from router_node.tiers import DEFAULT_TIER_CREDITS, parse_tier_credits

__all__ = [
    "DISCOVERY_MODES",
    "ROLES",
    "RouterSettings",
    "SettingsError",
    "WorkerSpec",
    "add_arguments",
    "kubernetes_source",
    "settings_table_rows",
]

ROLES = ("both", "prefill", "decode")
"""Worker roles for prefill/decode disaggregation; ``both`` serves whole requests."""


def parse_role(text: str) -> str:
    """A worker role (case-insensitive); raises ValueError naming the choices."""
    role = text.strip().lower()
    if role not in ROLES:
        raise ValueError(f"worker role must be one of {', '.join(ROLES)}, got {text!r}")
    return role


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One statically configured worker: ``[ID=]URL[#dpN][@ROLE]``."""

    id: str
    url: str
    dp_rank: int | None = None
    """Data-parallel rank to pin requests to (``#dpN``); None = let the server choose."""
    models: tuple[str, ...] = ()
    """Models it serves (config file ``[[workers]]``); empty = learn from its /v1/models,
    else every model."""
    role: str = "both"
    """``prefill``, ``decode`` or ``both`` (prefill/decode disaggregation)."""

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """Parse ``[ID=]URL[#dpN][@ROLE]``: ``#dpN`` pins data-parallel rank N, ``@prefill`` or
        ``@decode`` puts the worker in that pool (default ``both``).

        The id defaults to the URL's host:port (plus ``#dpN`` for N > 0): the id the listener
        and the index use for the same engine.
        """
        text = text.strip()
        role = "both"
        head, at, tail = text.rpartition("@")
        # Only a known role after the last '@' is a role: a URL's user@host stays a URL.
        if at and tail.strip().lower() in ROLES:
            text, role = head, tail.strip().lower()
        wid, sep, url = text.partition("=")
        if not sep or "://" in wid:
            wid, url = "", text
        rank: int | None = None
        if "#dp" in url:
            url, _, rank_text = url.rpartition("#dp")
            if not rank_text.isdigit():
                raise ValueError(f"data-parallel rank in {text!r} must be a number")
            rank = int(rank_text)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"worker URL {url!r} must be http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"worker URL {url!r} must not have a path, query or fragment")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if not wid:
            host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
            wid = f"{host}:{port}" + (f"#dp{rank}" if rank else "")
        try:
            validate_worker_id(wid)
        except KeyNameError as exc:
            raise ValueError(str(exc)) from None
        return cls(wid, url.rstrip("/"), rank, role=role)


def _workers(value: Any) -> Any:
    """``"[ID=]URL, ..."`` or a list of those (or of WorkerSpec) -> WorkerSpec tuple."""
    if isinstance(value, str | list | tuple):
        return tuple(
            w if isinstance(w, WorkerSpec) else WorkerSpec.parse(w) for w in comma_list(value)
        )
    return value


def _model_configs(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


Workers = Annotated[tuple[WorkerSpec, ...], PlainValidator(_workers)]
ModelConfigs = Annotated[tuple[ModelConfig, ...], PlainValidator(_model_configs)]


class RouterSettings(SharedSettings):
    """Every setting of one router process: the shared ones plus the router's own.

    Build with `from_env()` or `load()` (environment, flags, config file); direct construction
    validates keyword arguments only.
    """

    COMMAND: ClassVar[str] = "kvrouter serve"

    config: str = setting(
        "",
        "TOML or YAML file: [router] settings, [[models]] (per-model settings, adapters), "
        "[[workers]] (see docs/configuration.md); the environment and flags win over it",
    )
    host: str = setting("0.0.0.0", "address to listen on")
    port: Int = setting(8000, "port to listen on (0: any free port)", ge=0, le=65535)
    workers: Workers = setting(
        (),
        "static workers, `[ID=]URL[#dpN][@ROLE]`, ROLE prefill, decode or both (env: "
        "comma-separated; flag: repeatable)",
        flag="--worker",
        repeatable=True,
    )
    lora_placement: Literal["loaded_only", "any_base_worker"] = setting(
        "loaded_only",
        "adapter requests go to workers that list the adapter (loaded_only) or, preferring "
        "those, to any worker of its base model (any_base_worker)",
    )
    lora_load_cost_blocks: Int = setting(
        64,
        "any_base_worker: extra cost, in prefill blocks, of a worker that must load the adapter",
        ge=0,
    )
    models_interval_s: float = setting(
        10.0, "how often each worker's /v1/models is polled (0 = off)", ge=0
    )
    tokenizer: str = setting(
        "",
        "tokenizer.json or a model directory ('' = pre-tokenized requests only: chat and "
        "text requests are routed by load alone)",
    )
    policy: str = setting("kv", "routing policy: " + ", ".join(POLICIES))
    admin_token: SecretStr = setting(
        SecretStr(""), "Bearer token for /debug/route ('' = debug endpoint off)"
    )
    kv_events: Bool = setting(False, "a listener confirms residency from engine KV events")
    speculative_ttl_s: float = setting(
        30.0, "life of speculative residency written at dispatch when kv_events is on", gt=0
    )
    feedback_heal: Bool = setting(
        True,
        "when a worker reports fewer cached tokens (usage.prompt_tokens_details) than the "
        "router matched, drop that worker's records of the chain past the engine's depth",
    )
    feedback_lru_cut: Bool = setting(
        True,
        "with feedback_heal: when a request through the missing block completed on that worker "
        "earlier, also drop the worker's records last used before it was sent (an engine evicts "
        "least recently used blocks first): a silent restart heals in one request",
    )
    feedback_abort_clear: Bool = setting(
        True,
        "with feedback_heal: a stream the engine aborts after it opened (an error event with a "
        "5xx code, the connection dropped mid-stream) is an engine restart or death: drop the "
        "worker's records last used before it (a restarted engine's cache is empty)",
    )
    feedback_reset_fill: float = setting(
        0.25,
        "with feedback_lru_cut: a lost block the worker's engine had held is taken for an "
        "emptied cache (a restart, a cache reset) when the worker's records used since fill "
        "less than this share of its known capacity, since an LRU engine evicts a block only "
        "once newer ones fill the cache; then drop every record of the worker last used before "
        "the request that showed it (0 = never; needs the worker's capacity)",
        ge=0,
        le=1,
    )
    feedback_refused_clear: Bool = setting(
        True,
        "with feedback_heal: a worker that refuses a connection (nothing listens: its engine "
        "is down, restarting or gone) has lost its cache: drop its records last used before "
        "the refusal, once per outage (until it answers again)",
    )
    feedback_max_blocks: Int = setting(
        1024,
        "most blocks one feedback correction drops from the chain (the first one, marked a "
        "hole, already cuts every chain through it), and per call from its LRU cut",
        ge=1,
    )
    scrape_capacity: Bool = setting(True, "read capacity from vLLM's vllm:cache_config_info metric")
    prefill_weight: float = setting(1.0, "kv cost per block to prefill (own and queued)", ge=0)
    queue_weight: float = setting(
        0.5, "kv: weight of a worker's queued prefill against its own", ge=0
    )
    decode_weight: float = setting(2.0, "kv cost per in-flight request on the worker", ge=0)
    speed_aware: Bool = setting(
        False,
        "kv: divide each worker's prefill cost by its prefill speed relative to the fleet's, "
        "learned from its own TTFTs (a fleet of mixed GPUs)",
    )
    temperature: float = setting(
        0.0, "kv softmax temperature over cost (0 = pick the lowest)", ge=0
    )
    tier_credits: CommaList = setting(
        DEFAULT_TIER_CREDITS,
        "kv: a block the worker holds on a lower storage tier (the engine reports it on "
        "another medium) is credited at this fraction of a GPU hit, per medium, as "
        "MEDIUM=fraction (defaults: llm-d's CPU 0.8, Dynamo's disk 0.25; docs/configuration.md); "
        "a medium left out or at 0 is ignored (CPU=0: no tier counts)",
    )
    # 8 and 2.0 (were 4 and 1.5): at load 4 of the shared-prefix sweep the tighter guard
    # fired on ordinary Poisson imbalance, each spill a full cold prefill of a 2,048-token
    # prefix that also evicted another group's; see docs/benchmarks.md.
    lease_recheck: Literal["auto", "on", "off"] = setting(
        "auto",
        "kv: before a request is sent, take its lease on the chosen worker and read every "
        "worker's shared load in one atomic Redis step, and move the request if the choice no "
        "longer wins (other replicas decided the same burst on the same stale load): one more "
        "round trip on the request path; auto = only when the lookup shows more requests in "
        "flight on a worker than this replica counts (another replica is routing)",
    )
    balance_abs: Int = setting(
        8, "guard: a worker may lead the least-loaded by this many requests", ge=0
    )
    balance_rel: float = setting(
        2.0, "guard: ... or by this factor of the least-loaded one's load", ge=1
    )
    pd_min_prefill_tokens: Int = setting(
        256,
        "P/D: skip the prefill hop when the decode worker's uncached suffix is shorter (tokens)",
        ge=0,
    )
    pd_saturation_tokens: Int = setting(
        0,
        "P/D: prefill pool saturated (requests run whole on a decode worker) when every "
        "prefill worker has this many prompt tokens queued (0 = never)",
        ge=0,
    )
    pd_local_max_tokens: Int = setting(
        0,
        "P/D: with the prefill pool saturated, only an uncached suffix up to this many tokens "
        "runs whole on a decode worker (its prefill stalls that worker's decodes); a longer "
        "one still takes the prefill hop (0 = any suffix)",
        ge=0,
    )
    pd_transfer_weight: float = setting(
        0.1, "P/D: cost of pulling a KV block against computing it", ge=0
    )
    session_header: str = setting(
        "x-session-id", "request header naming a session (session policy)"
    )
    max_body_bytes: Int = setting(
        16 * 1024 * 1024, "largest request body accepted (413 above)", ge=1
    )
    max_prompt_tokens: Int = setting(
        131072, "largest prompt in tokens (413 above; 0 = no limit)", ge=0
    )
    tokenize_thread_bytes: Int = setting(
        256 * 1024, "bodies larger than this tokenize in a worker thread", ge=0
    )
    max_attempts: Int = setting(3, "workers tried per request before the first byte", ge=1)
    connect_timeout_s: float = setting(3.0, "upstream connect timeout", gt=0)
    read_timeout_s: float = setting(600.0, "upstream timeout between two reads", gt=0)
    lease_ttl_s: float = setting(
        900.0,
        "in-flight lease life, longer than the longest request (at most a day)",
        gt=0,
        le=86400,
    )
    redis_timeout_s: float = setting(0.5, "Redis socket timeout on the request path", gt=0)
    health_interval_s: float = setting(5.0, "active health check period (0 = off)", ge=0)
    health_timeout_s: float = setting(2.0, "active health check timeout", gt=0)
    eject_failures: Int = setting(3, "consecutive failures that open a worker's circuit", ge=1)
    eject_s: float = setting(5.0, "first ejection period; doubles per repeated trip", gt=0)
    eject_max_s: float = setting(60.0, "longest ejection period", gt=0)
    clear_grace_s: float = setting(
        30.0, "after this long out, a worker's residency is cleared", ge=0
    )
    registry_interval_s: float = setting(2.0, "how often the registry is read", gt=0)
    heartbeat_timeout_s: float = setting(
        15.0, "a registry worker whose heartbeat is older drops out", gt=0
    )
    retry_after_s: Int = setting(1, "Retry-After on 503 when no worker can take a request", ge=0)
    k8s_inference_pool: str = setting(
        "",
        "kubernetes discovery: an InferencePool's name; its selector's Ready pods, one worker "
        "per target port (instead of EndpointSlices)",
    )
    epp_port: Int = setting(
        9002, "kvrouter epp: gRPC port of the ext_proc service (Envoy's EPP)", ge=0, le=65535
    )
    epp_health_port: Int = setting(
        9003, "kvrouter epp: gRPC health port (-1 = only on --epp-port)", ge=-1, le=65535
    )
    epp_fallbacks: Int = setting(
        0,
        "kvrouter epp: fallback endpoints listed after the first choice (0 for an ORIGINAL_DST "
        "cluster, which takes one address; Envoy's override_host policy retries on the rest)",
        ge=0,
        le=8,
    )
    metrics_port: Int = setting(
        9090, "kvrouter epp: HTTP port of /metrics (-1 = off)", ge=-1, le=65535
    )
    header_timeout_s: float = setting(
        30.0,
        "a connection whose request line and headers are not in this long after their first "
        "byte is dropped (0 = off: aiohttp's 75 s keep-alive timer is the only bound)",
        ge=0,
    )
    max_headers: Int = setting(128, "most header lines in a request (400 above)", ge=1)
    max_header_bytes: Int = setting(
        8190, "longest request line or header line in bytes (400 above)", ge=1
    )
    rate_limit_rps: float = setting(
        0.0,
        "requests per second per client (API key, else address), a token bucket in Redis "
        "shared by every replica; 429 with Retry-After beyond it (0 = off)",
        ge=0,
        allow_inf_nan=False,
    )
    rate_limit_burst: Int = setting(
        0, "token bucket size per client (0 = rate_limit_rps, at least 1)", ge=0
    )
    priority_header: str = setting(
        "x-kvrouter-priority",
        "request header giving a request's priority: interactive (default) or batch",
    )
    batch_key_digests: CommaList = setting(
        (),
        "SHA-256 hex digests of API keys (the Authorization header's token) whose requests are "
        "always batch, whatever their priority header says (comma-separated)",
    )
    worker_max_inflight: Int = setting(
        0,
        "requests per worker this replica lets in before queueing the rest, interactive ahead "
        "of batch (0 = no router queue)",
        ge=0,
    )
    batch_share: float = setting(
        0.5,
        "share of those slots batch requests may fill; the rest stay free for interactive ones",
        gt=0,
        le=1,
    )
    priority_queue_max: Int = setting(
        1024, "requests that may wait in the priority queue (503 with Retry-After beyond)", ge=0
    )
    max_concurrent: Int = setting(
        0,
        "inference requests in flight per replica; 503 with Retry-After beyond it (0 = no bound)",
        ge=0,
    )
    model_configs: ModelConfigs = setting(
        (), "per-model settings and adapters from the config file", no_env=True
    )

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"must be one of {', '.join(POLICIES)}")
        return value

    @field_validator("tier_credits")
    @classmethod
    def _tier_credits(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_tier_credits(value)
        return value

    @field_validator("session_header")
    @classmethod
    def _session_header(cls, value: str) -> str:
        if value != value.strip() or not value:
            raise ValueError("must be a header name")
        return value

    @model_validator(mode="after")
    def _across_fields(self) -> RouterSettings:
        if not self.models:
            raise ValueError(f"{self.names('models')}: at least one model name is required")
        configs = {c.name: c for c in self.model_configs}
        for c in self.model_configs:
            if c.name not in self.models:
                raise ValueError(
                    f"{self.names('models')}: config model {c.name!r} is missing from the "
                    "model list"
                )
            parent_conf = configs.get(c.parent or "")
            if c.parent is not None and (
                c.parent not in self.models
                or (parent_conf is not None and parent_conf.parent is not None)
            ):
                raise ValueError(
                    f"{self.names('config')}: adapter {c.name!r}: parent {c.parent!r} is not "
                    "a configured base model"
                )
        ids = [w.id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.names('workers')}: worker ids must be unique, got {ids}")
        self.check_discovery()
        return self

    def check_discovery(self) -> None:
        """An InferencePool names the pods itself: no EndpointSlice selector needed then."""
        if self.discovery == "kubernetes" and self.k8s_inference_pool.strip():
            return
        if self.discovery == "kubernetes" and not self.k8s_selector.strip():
            raise ValueError(
                f"{self.names('k8s_selector')} (or {self.names('k8s_inference_pool')}): "
                "required with kubernetes discovery (a label selector such as app=vllm)"
            )
        super().check_discovery()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        args: argparse.Namespace | None,
        environ_: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> RouterSettings:
        """Defaults, the config file, the environment, flags in `args` (those given), then
        `overrides` (field values, for tests and embedding). The file's models and workers
        add to those of the environment and flags."""
        env = environ() if environ_ is None else environ_
        values = cls.read_env(env)
        values.update(cls.read_flags(args))
        config_path = overrides.get("config")
        if config_path is None and "config" in values:
            config_path = values["config"][0]
        if not config_path:
            return cast(RouterSettings, cls.build(values, **overrides))
        try:
            conf = load_config_file(config_path)
        except ConfigError as exc:
            raise SettingsError(f"{cls.names('config')}: {exc}") from None
        merged = _config_values(conf)
        lists = conf_lists(conf)
        for name in ("models", "workers"):
            if name in values and name in lists:
                raw, where = values[name]
                values[name] = (tuple(lists[name]) + tuple(_as_list(raw)), where)
            elif name in lists:
                merged[name] = (tuple(lists[name]), f"{cls.names('config')}: {conf.path}")
        merged.update(values)
        merged["model_configs"] = (conf.models, f"{cls.names('config')}: {conf.path}")
        return cast(RouterSettings, cls.build(merged, **overrides))

    # -- derived -------------------------------------------------------------------------
    @property
    def tier_credit_map(self) -> dict[str, float]:
        """Medium -> credit of a hit on it, media with a credit above 0 only (the others are
        not looked up)."""
        return {m: c for m, c in parse_tier_credits(self.tier_credits).items() if c > 0}

    @property
    def speculative_ttl_ms(self) -> int:
        """Life of blocks written at dispatch beyond what the worker was seen holding: short
        when KV events will confirm them, the whole horizon when nothing will."""
        ttl = self.speculative_ttl_s if self.kv_events else self.record_ttl_s
        return max(1, int(ttl * 1000))

    def catalogue(self) -> ModelCatalogue:
        """The configured models with their resolved per-model settings."""
        return ModelCatalogue.build(
            self.models,
            self.model_configs,
            tokenizer=self.tokenizer,
            block_size=self.block_size,
            hash_seed=self.hash_seed,
            prefill_weight=self.prefill_weight,
            queue_weight=self.queue_weight,
            decode_weight=self.decode_weight,
            temperature=self.temperature,
        )


def _as_list(raw: Any) -> tuple[Any, ...]:
    return tuple(comma_list(raw)) if isinstance(raw, str | list | tuple) else (raw,)


def otel_configured(variables: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces: an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``), and neither
    ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none`` turns them off."""
    env = environ() if variables is None else variables
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def conf_lists(conf: ConfigFile) -> dict[str, tuple[Any, ...]]:
    """The model names and workers a config file contributes."""
    out: dict[str, tuple[Any, ...]] = {}
    if conf.models:
        out["models"] = tuple(m.name for m in conf.models)
    if conf.workers:
        try:
            out["workers"] = tuple(
                replace(
                    WorkerSpec.parse(
                        (f"{w['id']}=" if "id" in w else "")
                        + w["url"]
                        + (f"#dp{w['dp_rank']}" if "dp_rank" in w else "")
                    ),
                    models=tuple(w.get("models", ())),
                    role=parse_role(w.get("role", "both")),
                )
                for w in conf.workers
            )
        except ValueError as exc:
            raise SettingsError(f"KVR_CONFIG / --config: {conf.path}: workers: {exc}") from None
    return out


def _config_values(conf: ConfigFile) -> dict[str, tuple[Any, str]]:
    """The ``[router]`` table as raw field values (names as the flags, with underscores)."""
    out: dict[str, tuple[Any, str]] = {}
    settable = set(RouterSettings.settable())
    for name, raw in conf.router.items():
        key = str(name).replace("-", "_")
        if key not in settable or key in ("config", "models", "workers"):
            hint = " (use [[models]] / [[workers]])" if name in ("models", "workers") else ""
            raise SettingsError(
                f"KVR_CONFIG / --config: {conf.path}: [router] has no setting {name!r}{hint}"
            )
        if not isinstance(raw, str | int | float | bool):
            raise SettingsError(
                f"KVR_CONFIG / --config: {conf.path}: [router] {name}: expected a string, "
                "number or boolean"
            )
        out[key] = (raw, f"KVR_CONFIG / --config: {conf.path}: [router] {name}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (see `KvrSettings.add_arguments`)."""
    RouterSettings.add_arguments(parser)


def settings_table_rows() -> list[tuple[str, str, str, str]]:
    """(env, flag, default, help) for every setting: the docs table's rows."""
    return RouterSettings.table_rows()


def kubernetes_source(settings: RouterSettings) -> Any:
    """The endpoint watch of ``discovery=kubernetes``: an InferencePool's Ready pods when
    ``k8s_inference_pool`` names one, else the EndpointSlice watch (see
    `SharedSettings.kubernetes_source`). Raises DiscoveryError naming what is missing."""
    if settings.k8s_inference_pool:
        from kvrouter.discovery.inferencepool import InferencePoolSource

        api, namespace = settings.kubernetes_api()
        return InferencePoolSource(api, namespace, settings.k8s_inference_pool)
    return settings.kubernetes_source()
