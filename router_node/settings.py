"""The router's settings: one frozen dataclass, from `KVR_*` environment variables and flags.

Every setting has one row in `SPECS`: its field, environment variable, flag, parser and help.
`RouterSettings.from_env()` reads the environment, `RouterSettings.load(args, environ)` lays
flags over it (flags win), and `add_arguments(parser)` builds the flags. Errors name the
variable or flag that was wrong. No other module of the router reads ``os.environ``.

The README's settings table lists the same rows; a test keeps them in step.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from kvrouter.index.connection import redact_url
from kvrouter.index.keys import KeyNameError, KeySchema, validate_model, validate_worker_id
from router_node.models import (
    LORA_PLACEMENTS,
    ConfigError,
    ConfigFile,
    ModelCatalogue,
    ModelConfig,
    load_config_file,
)
from router_node.scoring import POLICIES

DISCOVERY_MODES = ("static", "redis", "kubernetes")
ROLES = ("both", "prefill", "decode")
"""Worker roles for prefill/decode disaggregation; ``both`` serves whole requests."""


def parse_role(text: str) -> str:
    """A worker role (case-insensitive); raises ValueError naming the choices."""
    role = text.strip().lower()
    if role not in ROLES:
        raise ValueError(f"worker role must be one of {', '.join(ROLES)}, got {text!r}")
    return role


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable or flag."""


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


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True, slots=True)
class Spec:
    """One setting: dataclass field, env var, flag, parser, help text."""

    field: str
    env: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    repeatable: bool = False
    secret: bool = False


def _spec(name: str, parse: Callable[[str], Any], help_text: str, **kw: bool) -> Spec:
    return Spec(name, "KVR_" + name.upper(), "--" + name.replace("_", "-"), parse, help_text, **kw)


SPECS: tuple[Spec, ...] = (
    _spec(
        "config",
        str,
        "TOML or YAML file: [router] settings, [[models]] (per-model settings, adapters), "
        "[[workers]] (see docs/configuration.md); the environment and flags win over it",
    ),
    _spec("host", str, "address to listen on"),
    _spec("port", int, "port to listen on"),
    _spec(
        "redis_url",
        str,
        "shared index: redis://, rediss://, redis+cluster://, redis+sentinel:// "
        "('' = no Redis, local least-load only)",
    ),
    Spec(
        "workers",
        "KVR_WORKERS",
        "--worker",
        str,
        "static workers, `[ID=]URL[#dpN][@ROLE]`, ROLE prefill, decode or both (env: "
        "comma-separated; flag: repeatable)",
        repeatable=True,
    ),
    Spec(
        "models",
        "KVR_MODEL",
        "--model",
        str,
        "base model name(s) served, besides the config file's; adapters come from the workers' "
        "/v1/models; other names get 404 (env: comma-separated; flag: repeatable)",
        repeatable=True,
    ),
    _spec(
        "lora_placement",
        str,
        "adapter requests go to workers that list the adapter (loaded_only) or, preferring "
        "those, to any worker of its base model (any_base_worker)",
    ),
    _spec(
        "lora_load_cost_blocks",
        int,
        "any_base_worker: extra cost, in prefill blocks, of a worker that must load the adapter",
    ),
    _spec("models_interval_s", float, "how often each worker's /v1/models is polled (0 = off)"),
    _spec("tokenizer", str, "tokenizer.json or a model directory ('' = pre-tokenized only)"),
    _spec("block_size", int, "tokens per KV block; must equal the engine's --block-size"),
    _spec("policy", str, "routing policy: " + ", ".join(POLICIES)),
    _spec(
        "admin_token", str, "Bearer token for /debug/route ('' = debug endpoint off)", secret=True
    ),
    _spec(
        "redis_password",
        str,
        "Redis password, merged into the URL (keeps it out of the URL and the ConfigMap)",
        secret=True,
    ),
    _spec("key_prefix", str, "prefix of every Redis key"),
    _spec("hash_seed", str, "folded into every block key; equal across routers and listeners"),
    _spec("kv_events", _bool, "a listener confirms residency from engine KV events"),
    _spec("record_ttl_s", float, "life of residency the router saw held (the freshness horizon)"),
    _spec(
        "speculative_ttl_s",
        float,
        "life of speculative residency written at dispatch when kv_events is on",
    ),
    _spec("worker_capacity_blocks", int, "KV capacity per worker in blocks (0 = scrape or none)"),
    _spec("scrape_capacity", _bool, "read capacity from vLLM's vllm:cache_config_info metric"),
    _spec("prefill_weight", float, "kv cost per block to prefill (own and queued)"),
    _spec("queue_weight", float, "kv: weight of a worker's queued prefill against its own"),
    _spec("decode_weight", float, "kv cost per in-flight request on the worker"),
    _spec("temperature", float, "kv softmax temperature over cost (0 = pick the lowest)"),
    _spec("balance_abs", int, "guard: a worker may lead the least-loaded by this many requests"),
    _spec("balance_rel", float, "guard: ... or by this factor of the least-loaded one's load"),
    _spec("session_header", str, "request header naming a session (session policy)"),
    _spec(
        "pd_min_prefill_tokens",
        int,
        "P/D: skip the prefill hop when the decode worker's uncached suffix is shorter (tokens)",
    ),
    _spec(
        "pd_saturation_tokens",
        int,
        "P/D: prefill pool saturated (requests run whole on a decode worker) when every "
        "prefill worker has this many prompt tokens queued (0 = never)",
    ),
    _spec("pd_transfer_weight", float, "P/D: cost of pulling a KV block against computing it"),
    _spec("max_body_bytes", int, "largest request body accepted (413 above)"),
    _spec("max_prompt_tokens", int, "largest prompt in tokens (413 above; 0 = no limit)"),
    _spec("tokenize_thread_bytes", int, "bodies larger than this tokenize in a worker thread"),
    _spec("max_attempts", int, "workers tried per request before the first byte"),
    _spec("connect_timeout_s", float, "upstream connect timeout"),
    _spec("read_timeout_s", float, "upstream timeout between two reads"),
    _spec("lease_ttl_s", float, "in-flight lease life, longer than the longest request"),
    _spec("redis_timeout_s", float, "Redis socket timeout on the request path"),
    _spec("health_interval_s", float, "active health check period (0 = off)"),
    _spec("health_timeout_s", float, "active health check timeout"),
    _spec("eject_failures", int, "consecutive failures that open a worker's circuit"),
    _spec("eject_s", float, "first ejection period; doubles per repeated trip"),
    _spec("eject_max_s", float, "longest ejection period"),
    _spec("clear_grace_s", float, "after this long out, a worker's residency is cleared"),
    _spec(
        "discovery",
        str,
        "where workers come from besides --worker: static (none), redis (the registry), "
        "kubernetes (EndpointSlices)",
    ),
    _spec("k8s_selector", str, "kubernetes discovery: label selector of the vLLM EndpointSlices"),
    _spec("k8s_namespace", str, "kubernetes discovery: namespace ('' = the pod's own)"),
    _spec("k8s_http_port_name", str, "kubernetes discovery: name of the Service's HTTP port"),
    _spec("k8s_api_url", str, "kubernetes discovery: API server URL ('' = in-cluster)"),
    _spec("registry_interval_s", float, "how often the registry is read"),
    _spec("heartbeat_timeout_s", float, "a registry worker whose heartbeat is older drops out"),
    _spec("retry_after_s", int, "Retry-After on 503 when no worker can take a request"),
    _spec("log_level", str, "debug, info, warning or error"),
)
SPEC_BY_FIELD = {s.field: s for s in SPECS}


@dataclass(frozen=True, slots=True, repr=False)
class RouterSettings:
    """Every setting of one router process. Build with `from_env()` or `load()`."""

    host: str = "0.0.0.0"
    port: int = 8080
    redis_url: str = "redis://127.0.0.1:6379/0"
    workers: tuple[WorkerSpec, ...] = ()
    models: tuple[str, ...] = ()
    lora_placement: str = "loaded_only"
    lora_load_cost_blocks: int = 64
    models_interval_s: float = 10.0
    tokenizer: str = ""
    block_size: int = 16
    policy: str = "kv"
    admin_token: str = field(default="", compare=False)
    redis_password: str = field(default="", compare=False)
    key_prefix: str = "kvr"
    hash_seed: str = ""
    kv_events: bool = False
    record_ttl_s: float = 600.0
    speculative_ttl_s: float = 30.0
    worker_capacity_blocks: int = 0
    scrape_capacity: bool = True
    prefill_weight: float = 1.0
    queue_weight: float = 0.5
    decode_weight: float = 2.0
    temperature: float = 0.0
    balance_abs: int = 4
    balance_rel: float = 1.5
    session_header: str = "x-session-id"
    pd_min_prefill_tokens: int = 256
    pd_saturation_tokens: int = 0
    pd_transfer_weight: float = 0.1
    max_body_bytes: int = 16 * 1024 * 1024
    max_prompt_tokens: int = 131072
    tokenize_thread_bytes: int = 256 * 1024
    max_attempts: int = 3
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 600.0
    lease_ttl_s: float = 900.0
    redis_timeout_s: float = 0.5
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    eject_failures: int = 3
    eject_s: float = 5.0
    eject_max_s: float = 60.0
    clear_grace_s: float = 30.0
    discovery: str = "static"
    k8s_selector: str = ""
    k8s_namespace: str = ""
    k8s_http_port_name: str = "http"
    k8s_api_url: str = ""
    registry_interval_s: float = 2.0
    heartbeat_timeout_s: float = 15.0
    retry_after_s: int = 1
    log_level: str = "info"
    config: str = ""
    model_configs: tuple[ModelConfig, ...] = ()
    """Per-model settings and adapters from the config file (no variable of its own)."""

    def __post_init__(self) -> None:
        self._validate()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RouterSettings:
        """Settings from ``KVR_*`` variables (``os.environ`` by default), then `overrides`."""
        return cls.load(None, environ, **overrides)

    @classmethod
    def load(
        cls,
        args: argparse.Namespace | None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> RouterSettings:
        """Defaults, then the environment, then flags in `args` (those given), then
        `overrides` (field values, for tests and embedding)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_path = overrides.get("config")
        if config_path is None and args is not None:
            config_path = getattr(args, "config", None)
        if config_path is None:
            config_path = env.get("KVR_CONFIG")
        conf: ConfigFile | None = None
        if config_path:
            try:
                conf = load_config_file(config_path)
            except ConfigError as exc:
                raise SettingsError(f"KVR_CONFIG / --config: {exc}") from None
            values.update(_config_values(conf))
        for spec in SPECS:
            raw = env.get(spec.env)
            if raw is not None:
                values[spec.field] = _convert(
                    spec, _list(raw) if spec.repeatable else raw, spec.env
                )
            flag_value = getattr(args, spec.field, None) if args is not None else None
            if flag_value is not None:
                values[spec.field] = _convert(spec, flag_value, spec.flag)
        if conf is not None:
            # Lists add up: the file's models and workers plus those of the env / flags.
            for name in ("models", "workers"):
                if name in values and name in conf_lists(conf):
                    both = tuple(conf_lists(conf)[name]) + tuple(values[name])
                    values[name] = tuple(dict.fromkeys(both)) if name == "models" else both
                elif name in conf_lists(conf):
                    values[name] = tuple(conf_lists(conf)[name])
            values["model_configs"] = conf.models
        values.update(overrides)
        if "workers" in values:
            values["workers"] = tuple(
                w if isinstance(w, WorkerSpec) else WorkerSpec.parse(w) for w in values["workers"]
            )
        if "models" in values:
            values["models"] = tuple(values["models"])
        return cls(**values)

    def with_(self, **changes: Any) -> RouterSettings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- derived -------------------------------------------------------------------------
    @property
    def speculative_ttl_ms(self) -> int:
        """Life of blocks written at dispatch beyond what the worker was seen holding: short
        when KV events will confirm them, the whole horizon when nothing will."""
        ttl = self.speculative_ttl_s if self.kv_events else self.record_ttl_s
        return max(1, int(ttl * 1000))

    @property
    def redis_connect_url(self) -> str:
        """``redis_url`` with ``redis_password`` merged in (when the URL carries none)."""
        if not self.redis_password or not self.redis_url:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        if parts.password is not None:
            return self.redis_url
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(self.redis_password, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

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

    @property
    def record_ttl_ms(self) -> int:
        return max(1, int(self.record_ttl_s * 1000))

    @property
    def schema(self) -> KeySchema:
        return KeySchema(self.key_prefix)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("admin_token", "redis_password"):
                value = "***" if value else ""
            elif f.name == "redis_url":
                value = redact_url(value)
            parts.append(f"{f.name}={value!r}")
        return f"RouterSettings({', '.join(parts)})"

    __str__ = __repr__

    # -- validation ----------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(name: str, message: str) -> SettingsError:
            s = SPEC_BY_FIELD[name]
            return SettingsError(f"{s.env} / {s.flag}: {message}")

        if not 0 <= self.port < 65536:
            raise bad("port", f"must be in 0..65535 (0: any free port), got {self.port}")
        if not self.models:
            raise bad("models", "at least one model name is required")
        for m in self.models:
            try:
                validate_model(m)
            except KeyNameError as exc:
                raise bad("models", str(exc)) from None
        configs = {c.name: c for c in self.model_configs}
        for c in self.model_configs:
            if c.name not in self.models:
                raise bad("models", f"config model {c.name!r} is missing from the model list")
            parent_conf = configs.get(c.parent or "")
            if c.parent is not None and (
                c.parent not in self.models
                or (parent_conf is not None and parent_conf.parent is not None)
            ):
                raise bad(
                    "config",
                    f"adapter {c.name!r}: parent {c.parent!r} is not a configured base model",
                )
        if self.lora_placement not in LORA_PLACEMENTS:
            raise bad("lora_placement", f"must be one of {', '.join(LORA_PLACEMENTS)}")
        ids = [w.id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise bad("workers", f"worker ids must be unique, got {ids}")
        if self.policy not in POLICIES:
            raise bad("policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.redis_url and "://" not in self.redis_url:
            raise bad("redis_url", f"not a URL: {redact_url(self.redis_url)!r}")
        try:
            KeySchema(self.key_prefix)
        except KeyNameError as exc:
            raise bad("key_prefix", str(exc)) from None
        positive_int = ("block_size", "max_body_bytes", "max_attempts", "eject_failures")
        for name in positive_int:
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "worker_capacity_blocks",
            "lora_load_cost_blocks",
            "models_interval_s",
            "max_prompt_tokens",
            "tokenize_thread_bytes",
            "balance_abs",
            "retry_after_s",
            "prefill_weight",
            "queue_weight",
            "decode_weight",
            "temperature",
            "health_interval_s",
            "clear_grace_s",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        positive = (
            "record_ttl_s",
            "speculative_ttl_s",
            "connect_timeout_s",
            "read_timeout_s",
            "lease_ttl_s",
            "redis_timeout_s",
            "health_timeout_s",
            "eject_s",
            "eject_max_s",
            "registry_interval_s",
            "heartbeat_timeout_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if self.lease_ttl_s > 24 * 3600:
            raise bad("lease_ttl_s", "must be at most 86400 (a day)")
        if self.balance_rel < 1:
            raise bad("balance_rel", f"must be >= 1, got {self.balance_rel}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise bad("log_level", f"must be debug, info, warning or error, got {self.log_level!r}")
        if self.discovery not in DISCOVERY_MODES:
            raise bad("discovery", f"must be one of {', '.join(DISCOVERY_MODES)}")
        if self.discovery == "kubernetes" and not self.k8s_selector.strip():
            raise bad("k8s_selector", "is required with kubernetes discovery")
        if self.discovery == "redis" and not self.redis_url:
            raise bad("discovery", "redis discovery needs a Redis URL")
        for name in ("pd_min_prefill_tokens", "pd_saturation_tokens"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.pd_transfer_weight >= 0:
            raise bad("pd_transfer_weight", f"must be >= 0, got {self.pd_transfer_weight}")
        if self.session_header != self.session_header.strip() or not self.session_header:
            raise bad("session_header", "must be a header name")


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


def _config_values(conf: ConfigFile) -> dict[str, Any]:
    """The ``[router]`` table as field values (names as the flags, with underscores)."""
    out: dict[str, Any] = {}
    for name, raw in conf.router.items():
        spec = SPEC_BY_FIELD.get(str(name).replace("-", "_"))
        if spec is None or spec.field in ("config", "models", "workers"):
            hint = " (use [[models]] / [[workers]])" if name in ("models", "workers") else ""
            raise SettingsError(
                f"KVR_CONFIG / --config: {conf.path}: [router] has no setting {name!r}{hint}"
            )
        where = f"KVR_CONFIG / --config: {conf.path}: [router] {name}"
        if isinstance(raw, bool | int | float) and not isinstance(raw, str):
            raw = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if not isinstance(raw, str):
            raise SettingsError(f"{where}: expected a string, number or boolean")
        out[spec.field] = _convert(spec, raw, where)
    return out


def _convert(spec: Spec, raw: Any, source: str) -> Any:
    try:
        if spec.field == "workers":
            return tuple(WorkerSpec.parse(x) for x in raw)
        if spec.repeatable:
            return tuple(str(x) for x in raw)
        if isinstance(raw, str):
            return spec.parse(raw)
        return raw
    except (ValueError, TypeError) as exc:
        shown = "***" if spec.secret else raw
        raise SettingsError(f"{source}: invalid value {shown!r}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, each defaulting to None so `load` can tell it was not given."""
    defaults = RouterSettings.__dataclass_fields__
    for spec in SPECS:
        default = defaults[spec.field].default
        shown = "***" if spec.secret else default
        help_text = f"{spec.help} [env {spec.env}; default {shown!r}]"
        if spec.repeatable:
            parser.add_argument(spec.flag, dest=spec.field, action="append", help=help_text)
        else:
            parser.add_argument(spec.flag, dest=spec.field, default=None, help=help_text)


def settings_table_rows() -> list[tuple[str, str, str, str]]:
    """(env, flag, default, help) for every setting: the README table's rows."""
    defaults = RouterSettings.__dataclass_fields__
    rows = []
    for spec in SPECS:
        d = defaults[spec.field].default
        shown = (
            ""
            if spec.secret
            else ("" if d == () else str(d).lower() if isinstance(d, bool) else str(d))
        )
        rows.append((spec.env, spec.flag, shown, spec.help))
    return rows


def parse_worker_list(items: Sequence[str]) -> tuple[WorkerSpec, ...]:
    """Parse ``[ID=]URL`` strings (for embedding code that builds settings by hand)."""
    return tuple(WorkerSpec.parse(x) for x in items)


def kubernetes_source(settings: RouterSettings) -> Any:
    """The EndpointSlice watch for ``discovery=kubernetes`` (a KubernetesEndpointSource).

    Here because in-cluster configuration comes from the process environment
    (KUBERNETES_SERVICE_HOST/PORT) and the service-account files, and this module is the one
    that reads the environment. Raises DiscoveryError naming what is missing.
    """
    from pathlib import Path

    from kvrouter.discovery.kubernetes import (
        SERVICE_ACCOUNT_DIR,
        ApiServer,
        DiscoveryError,
        KubernetesEndpointSource,
        PortNames,
    )

    if settings.k8s_api_url:
        api = ApiServer(settings.k8s_api_url)
    else:
        api = ApiServer.in_cluster(os.environ)
    namespace = settings.k8s_namespace
    if not namespace:
        ns_file = Path(SERVICE_ACCOUNT_DIR, "namespace")
        if not ns_file.is_file():
            raise DiscoveryError(
                "KVR_K8S_NAMESPACE is not set and there is no service-account namespace file"
            )
        namespace = ns_file.read_text().strip()
    return KubernetesEndpointSource(
        api,
        namespace,
        settings.k8s_selector,
        ports=PortNames(http=settings.k8s_http_port_name),
    )
