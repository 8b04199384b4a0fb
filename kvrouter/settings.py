"""The one settings schema of every kvrouter process (pydantic-settings).

`KvrSettings` is the machinery: every field is an environment variable (``KVR_<FIELD>``, or
the ``env`` named in its metadata), a flag (``--<field>``, or the ``flag`` named) and a key of
a config file, all parsed by the same pydantic validators. `SharedSettings` holds the fields
that the router, the listener and the simulator's peers share (Redis, key prefix, model, block
size, hash seed, discovery and its Kubernetes fields, log level, record life): each defined
here once. `router_node.settings.RouterSettings` and `eviction_listener.settings.ListenerSettings`
add only their own fields.

Errors are one type, `SettingsError`, whose message names the variable and the flag, the value
that was given (``***`` for a secret) and what is allowed; the processes print it and exit 2.
An unknown ``KVR_*`` variable that looks like a typo of a known one is an error too, so a
misspelt setting never falls back to its default unnoticed.

Precedence, lowest first: defaults, the config file, the environment, flags, keyword
arguments (tests and embedding). An empty variable is the empty string for text settings
(``KVR_REDIS_URL=""`` = no Redis) and "not set" for the others (Helm renders unset values as
"").

Direct construction (``RouterSettings(models=("m",))``) validates but reads no environment:
only `load`/`from_env` do, so a developer's shell never leaks into a test's settings.

This is the only module that reads ``os.environ`` (the processes pass it on for in-cluster
Kubernetes configuration).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_args

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvrouter.index.connection import SCHEMES, redact_url
from kvrouter.index.keys import DEFAULT_PREFIX, KeyNameError, KeySchema, validate_model

if TYPE_CHECKING:
    from kvrouter.discovery.kubernetes import ApiServer, KubernetesEndpointSource

ENV_PREFIX = "KVR_"
Discovery = Literal["static", "redis", "kubernetes"]
DISCOVERY_MODES: tuple[str, ...] = get_args(Discovery)
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
TYPO_CUTOFF = 0.9
"""difflib ratio above which an unknown ``KVR_*`` name counts as a typo of a known one.
tests/test_settings_schema.py checks that no two names of different processes come this
close, so one process never mistakes another's variable for a typo."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr at `level` (a settings' ``log_level``), in the format every kvrouter
    process and tool uses."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def environ() -> Mapping[str, str]:
    """The process environment (the one place that reads it)."""
    return os.environ


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable and the flag, the value
    and what is allowed."""


def comma_list(value: Any) -> Any:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; sequences pass through as tuples."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, list | tuple):
        out: list[Any] = []
        for v in value:
            out.extend(comma_list(v) if isinstance(v, str) else (v,))
        return tuple(out)
    return value


def parse_bool(value: Any) -> Any:
    """true/false, 1/0, yes/no, on/off (any case); anything else is an error."""
    if isinstance(value, str):
        t = value.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false (also 1/0, yes/no, on/off)")
    return value


def parse_int(value: Any) -> Any:
    """Integers, with ``_`` allowed as a thousands separator (``20_480``)."""
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            raise ValueError("expected an integer") from None
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Level = Annotated[LogLevel, BeforeValidator(_lower)]
CommaList = Annotated[tuple[str, ...], BeforeValidator(comma_list)]
Bool = Annotated[bool, BeforeValidator(parse_bool)]
Int = Annotated[int, BeforeValidator(parse_int)]


def setting(
    default: Any = ...,
    help: str = "",
    *,
    env: str | None = None,
    flag: str | None = None,
    repeatable: bool = False,
    default_factory: Callable[[], Any] | None = None,
    no_env: bool = False,
    **constraints: Any,
) -> Any:
    """A field of the schema: its default, help text and, when not derived from its name, its
    variable and flag. ``repeatable``: the flag may be given many times (a list).
    ``no_env``: not a variable nor a flag (set by the config file or by code)."""
    extra: dict[str, Any] = {"repeatable": repeatable, "no_env": no_env}
    if env:
        extra["env"] = env
    if flag:
        extra["flag"] = flag
    if default_factory is not None:
        return Field(
            default_factory=default_factory,
            description=help,
            json_schema_extra=extra,
            **constraints,
        )
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


class KvrSettings(BaseSettings):
    """Base of every process's settings: naming, loading, errors, redaction."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        protected_namespaces=(),
        validate_default=True,
    )
    COMMAND: ClassVar[str] = "kvrouter"
    """The command whose settings these are (error messages)."""
    OTHER_PREFIXES: ClassVar[tuple[str, ...]] = ("KVR_SIM_", "KVR_TEST_")
    """Variables under these prefixes belong to another tool: never called typos."""
    ALIASES: ClassVar[dict[str, str]] = {}
    """Keyword spellings accepted for a field (the listener's ``model=`` for ``models``)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(self.format_error(exc, data, {})) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load` gathers env, flags and file itself so that an error can say which of them
        # held the bad value; construction reads keyword arguments only.
        return (init_settings,)

    # -- names -------------------------------------------------------------------------------
    @classmethod
    def prefix(cls) -> str:
        return str(cls.model_config.get("env_prefix") or ENV_PREFIX)

    @classmethod
    def env_name(cls, name: str) -> str:
        """The variable of field `name`, e.g. ``KVR_RECORD_TTL_S``."""
        return str(_extra(cls.model_fields[name]).get("env") or cls.prefix() + name.upper())

    @classmethod
    def flag_name(cls, name: str) -> str:
        """The flag of field `name`, e.g. ``--record-ttl-s``."""
        extra = _extra(cls.model_fields[name])
        return str(extra.get("flag") or "--" + name.replace("_", "-"))

    @classmethod
    def names(cls, name: str) -> str:
        """``KVR_X / --x``: how every message names a setting."""
        return f"{cls.env_name(name)} / {cls.flag_name(name)}"

    @classmethod
    def settable(cls) -> list[str]:
        """Fields that are variables and flags, in schema order."""
        return [n for n, f in cls.model_fields.items() if not _extra(f).get("no_env")]

    @classmethod
    def secret_fields(cls) -> set[str]:
        return {n for n, f in cls.model_fields.items() if _is_secret(f)}

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def read_env(cls, env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
        """field -> (raw value, variable) for every variable of this schema that is set."""
        cls.check_unknown(env)
        out: dict[str, tuple[Any, str]] = {}
        for name in cls.settable():
            var = cls.env_name(name)
            raw = env.get(var)
            if raw is None or (raw == "" and not _is_text(cls.model_fields[name])):
                continue
            out[name] = (raw, var)
        return out

    @classmethod
    def read_flags(cls, args: argparse.Namespace | None) -> dict[str, tuple[Any, str]]:
        """field -> (raw value, flag) for every flag given in `args`."""
        out: dict[str, tuple[Any, str]] = {}
        if args is None:
            return out
        for name in cls.settable():
            value = getattr(args, name, None)
            if value is not None:
                out[name] = (value, cls.flag_name(name))
        return out

    @classmethod
    def check_unknown(cls, env: Mapping[str, str]) -> None:
        """Stop on a ``KVR_*`` variable that is not a setting but nearly spells one."""
        known = {cls.env_name(n) for n in cls.settable()}
        others = tuple(p for p in cls.OTHER_PREFIXES if p != cls.prefix())
        for var in sorted(env):
            if not var.startswith(cls.prefix()) or var in known or var.startswith(others):
                continue
            close = difflib.get_close_matches(var, known, n=1, cutoff=TYPO_CUTOFF)
            if close:
                raise SettingsError(
                    f"{var}: not a setting of `{cls.COMMAND}` (value {_shown(var, env[var])!r}); "
                    f"did you mean {close[0]}?"
                )

    @classmethod
    def build(cls, values: Mapping[str, tuple[Any, str]], **overrides: Any) -> Any:
        """Validate `values` (field -> (raw, where it came from)) plus `overrides`."""
        data = {k: v for k, (v, _) in values.items()}
        overrides = {cls.ALIASES.get(k, k): v for k, v in overrides.items()}
        data.update(overrides)
        sources = {k: where for k, (_, where) in values.items() if k not in overrides}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SettingsError(cls.format_error(exc, data, sources)) from None

    @classmethod
    def from_env(cls, environ_: Mapping[str, str] | None = None, **overrides: Any) -> Any:
        """Settings from the environment (``os.environ`` by default), then `overrides`
        (field values; None = not given, as argparse's defaults)."""
        env = environ() if environ_ is None else environ_
        unknown = set(overrides) - set(cls.model_fields) - set(cls.ALIASES)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.build(cls.read_env(env), **given)

    @classmethod
    def load(
        cls,
        args: argparse.Namespace | None,
        environ_: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Any:
        """Defaults, the environment, then the flags given in `args`, then `overrides`."""
        env = environ() if environ_ is None else environ_
        values = cls.read_env(env)
        values.update(cls.read_flags(args))
        return cls.build(values, **overrides)

    def with_(self, **changes: Any) -> Any:
        """A copy with some fields changed (validated again)."""
        data = {n: getattr(self, n) for n in type(self).model_fields}
        data.update(changes)
        return type(self)(**data)

    # -- errors and display ------------------------------------------------------------------
    @classmethod
    def format_error(
        cls, exc: ValidationError, data: Mapping[str, Any], sources: Mapping[str, str]
    ) -> str:
        """One line per problem: the setting's names, the value given and what is allowed."""
        lines = []
        for err in exc.errors(include_url=False):
            msg = str(err["msg"]).removeprefix("Value error, ")
            loc = err["loc"]
            name = str(loc[0]) if loc else ""
            if name not in cls.model_fields:
                lines.append(msg)  # a check across fields: its message names them
                continue
            label = cls.names(name)
            where = sources.get(name)
            if where and where not in label:
                label += f" (from {where})"
            if err["type"] == "missing":
                lines.append(f"{label}: required: {cls.model_fields[name].description}")
                continue
            value = data.get(name, err.get("input"))
            shown = "***" if name in cls.secret_fields() else _display(value)
            lines.append(f"{label}: invalid value {shown!r}: {msg}")
        return "; ".join(lines)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                yield name, "***" if value.get_secret_value() else ""
            elif name.endswith("redis_url") and isinstance(value, str):
                yield name, redact_url(value)
            else:
                yield name, value

    def __str__(self) -> str:
        return repr(self)

    def summary(self) -> dict[str, Any]:
        """Every field as plain data with secrets and URL passwords hidden (start-up log)."""
        return dict(self.__repr_args__())  # type: ignore[arg-type]

    # -- documentation -----------------------------------------------------------------------
    @classmethod
    def default_text(cls, name: str) -> str:
        """The default as the docs show it ('' for none, secrets and per-host values)."""
        info = cls.model_fields[name]
        if _is_secret(info) or info.default_factory is not None:
            return ""
        return _display(info.default)

    @classmethod
    def table_rows(cls) -> list[tuple[str, str, str, str]]:
        """(variable, flag, default, help) per setting: the rows of docs/settings.md."""
        return [
            (
                cls.env_name(n),
                cls.flag_name(n),
                cls.default_text(n),
                str(cls.model_fields[n].description or ""),
            )
            for n in cls.settable()
        ]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting, each defaulting to None so `load` can tell it was not given."""
        for name in cls.settable():
            info = cls.model_fields[name]
            default = cls.default_text(name) if not _is_secret(info) else "***"
            help_text = f"{info.description} [env {cls.env_name(name)}; default {default!r}]"
            help_text = help_text.replace("%", "%%")
            if _extra(info).get("repeatable"):
                parser.add_argument(cls.flag_name(name), dest=name, action="append", help=help_text)
            else:
                parser.add_argument(cls.flag_name(name), dest=name, default=None, help=help_text)


def _is_secret(info: FieldInfo) -> bool:
    return info.annotation is SecretStr


def _is_text(info: FieldInfo) -> bool:
    return info.annotation in (str, SecretStr)


def _shown(var: str, value: str) -> str:
    return "***" if any(w in var for w in ("PASSWORD", "TOKEN", "SECRET")) else value


def _display(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if value is None:
        return ""
    return str(value)


class SharedSettings(KvrSettings):
    """The settings that router, listener and simulator peers share: defined here once."""

    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "shared index: redis://, rediss://, redis+cluster://, redis+sentinel:// "
        "('' = no Redis: the router routes by local load only)",
    )
    redis_password: SecretStr = setting(
        SecretStr(""),
        "Redis password, merged into the URL (keeps it out of the URL and the ConfigMap)",
    )
    key_prefix: str = setting(DEFAULT_PREFIX, "prefix of every Redis key")
    models: CommaList = setting(
        (),
        "model name(s) served (OpenAI `model`); the listener takes exactly one "
        "(env: comma-separated; flag: repeatable)",
        env="KVR_MODEL",
        flag="--model",
        repeatable=True,
    )
    block_size: Int = setting(16, "tokens per KV block; must equal the engine's --block-size", ge=1)
    hash_seed: str = setting("", "folded into every block key; equal across routers and listeners")
    record_ttl_s: float = setting(
        600.0,
        "life of a residency record (the router's freshness horizon; the listener's "
        "confirmed records and notices)",
        gt=0,
    )
    worker_capacity_blocks: Int = setting(
        0, "KV capacity per worker in blocks: records beyond it are trimmed (0 = no limit)", ge=0
    )
    discovery: Discovery = setting(
        "static",
        "where workers and engines come from: static (the lists given), redis (the registry), "
        "kubernetes (EndpointSlices)",
    )
    k8s_selector: str = setting(
        "", "kubernetes discovery: label selector of the engines' EndpointSlices"
    )
    k8s_namespace: str = setting("", "kubernetes discovery: namespace ('' = the pod's own)")
    k8s_http_port_name: str = setting(
        "http", "kubernetes discovery: name of the engines' HTTP port (router)"
    )
    k8s_events_port_name: str = setting(
        "kv-events", "kubernetes discovery: name of the engines' KV-event port (listener)"
    )
    k8s_replay_port_name: str = setting(
        "kv-replay",
        "kubernetes discovery: name of the engines' KV-event replay port (listener; "
        "absent = no replay)",
    )
    k8s_api_url: str = setting("", "kubernetes discovery: API server URL ('' = in-cluster)")
    log_level: Level = setting("info", "debug, info, warning or error")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and value.partition("://")[0].lower() not in SCHEMES:
            raise ValueError(
                f"not a Redis URL {redact_url(value)!r}: the scheme must be one of "
                f"{', '.join(SCHEMES)}"
            )
        return value

    @field_validator("k8s_http_port_name", "k8s_events_port_name", "k8s_replay_port_name")
    @classmethod
    def _port_name(cls, value: str) -> str:
        from kvrouter.discovery.kubernetes import PORT_NAME

        if not PORT_NAME.match(value):
            raise ValueError("not a Kubernetes port name (1-15 lowercase letters, digits, '-')")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        try:
            KeySchema(value)
        except KeyNameError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for m in value:
            try:
                validate_model(m)
            except KeyNameError as exc:
                raise ValueError(str(exc)) from None
        return tuple(dict.fromkeys(value))

    def check_discovery(self) -> None:
        """Checks across discovery fields (called by each process's model validator)."""
        if self.discovery == "kubernetes" and not self.k8s_selector.strip():
            raise ValueError(
                f"{self.names('k8s_selector')}: required with kubernetes discovery "
                "(a label selector such as app=vllm)"
            )
        if self.discovery == "redis" and not self.redis_url:
            raise ValueError(f"{self.names('discovery')}: redis discovery needs a Redis URL")

    def kubernetes_api(self) -> tuple[ApiServer, str]:
        """The API server client and the namespace that ``discovery=kubernetes`` watches.

        In-cluster configuration comes from the process environment (KUBERNETES_SERVICE_HOST
        and _PORT) and the service-account files unless ``k8s_api_url`` is set. Raises
        DiscoveryError naming what is missing.
        """
        from pathlib import Path

        from kvrouter.discovery.kubernetes import SERVICE_ACCOUNT_DIR, ApiServer, DiscoveryError

        api = ApiServer(self.k8s_api_url) if self.k8s_api_url else ApiServer.in_cluster(environ())
        namespace = self.k8s_namespace
        if not namespace:
            ns_file = Path(SERVICE_ACCOUNT_DIR, "namespace")
            if not ns_file.is_file():
                raise DiscoveryError(
                    "KVR_K8S_NAMESPACE is not set and there is no service-account namespace file"
                )
            namespace = ns_file.read_text().strip()
        return api, namespace

    def kubernetes_source(self, *, include_not_ready: bool = False) -> KubernetesEndpointSource:
        """The EndpointSlice watch of ``discovery=kubernetes``, for the router and the listener
        alike (the same slices, read for different named ports), in the namespace of
        `kubernetes_api`. Raises DiscoveryError naming what is missing.
        """
        from kvrouter.discovery.kubernetes import KubernetesEndpointSource, PortNames

        api, namespace = self.kubernetes_api()
        return KubernetesEndpointSource(
            api,
            namespace,
            self.k8s_selector,
            ports=PortNames(
                http=self.k8s_http_port_name,
                events=self.k8s_events_port_name,
                replay=self.k8s_replay_port_name,
            ),
            include_not_ready=include_not_ready,
        )

    @property
    def redis_connect_url(self) -> str:
        """``redis_url`` with ``redis_password`` merged in (when the URL carries none)."""
        from urllib.parse import quote, urlsplit, urlunsplit

        password = self.redis_password.get_secret_value()
        if not password or not self.redis_url:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        if parts.password is not None:
            return self.redis_url
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def record_ttl_ms(self) -> int:
        return max(1, int(self.record_ttl_s * 1000))

    @property
    def key_schema(self) -> KeySchema:
        """The Redis key names under `key_prefix`."""
        return KeySchema(self.key_prefix)
