"""Settings of `kvrouter listen`: one frozen dataclass, from `KVR_*` variables and flags.

Every field is an environment variable ``KVR_<FIELD>`` and a flag ``--<field>`` (engines:
``KVR_ENGINES`` / ``--engine``, repeatable). Flags win over variables. This is the only
module of the listener that reads ``os.environ``.

Engines (``KVR_ENGINES``, entries separated by whitespace or ``;``; or one ``--engine`` each)::

    ID=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,dp=N][,topic=T][,block=B][,bind=1]

``ID`` is the router's worker id. ``dp=N`` expands to N data-parallel ranks on ports P..P+N-1
(replay likewise); rank r > 0 is the router's worker ``ID#dpR``. ``block`` is the engine's
block size when it is a multiple of the router's ``KVR_BLOCK_SIZE`` (each engine block is then
indexed as block/KVR_BLOCK_SIZE router blocks); it defaults to ``KVR_BLOCK_SIZE``. ``bind=1``
is vLLM's centralized mode: the listener binds and engines connect, told apart by ``topic``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from eviction_listener.zmq_source import EngineEndpoint, dp_worker_id, expand_dp_ranks
from kvrouter.index.connection import SCHEMES, redact_url
from kvrouter.index.keys import (
    DEFAULT_PREFIX,
    KeyNameError,
    KeySchema,
    validate_model,
    validate_worker_id,
)

Discovery = Literal["static", "redis"]
DISCOVERY_MODES: tuple[str, ...] = get_args(Discovery)
ENV_PREFIX = "KVR_"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable and the flag."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One ``--engine`` entry: an engine's KV-event publisher as the router knows it."""

    worker_id: str
    endpoint: str
    replay_endpoint: str | None = None
    dp_size: int = 1
    topic: str = ""
    block_size: int | None = None
    """The engine's block size when it differs from the router's (a multiple of it)."""
    bind: bool = False
    rank: int | None = None
    """One DP rank whose endpoints are already that rank's (a registry entry per rank)."""

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        """``ID=ENDPOINT[,replay=..][,dp=N][,topic=T][,block=B][,bind=1]``."""
        wid, sep, rest = text.partition("=")
        if not sep or not wid or not rest:
            raise ValueError(f"{text!r} is not ID=tcp://HOST:PORT[,option=value...]")
        validate_worker_id(wid)
        if "#" in wid:
            raise ValueError(f"{wid!r}: '#' is reserved for DP ranks (use dp=N)")
        parts = rest.split(",")
        endpoint = parts[0]
        if "://" not in endpoint:
            raise ValueError(f"{wid}: endpoint {endpoint!r} is not a ZMQ address (tcp://...)")
        opts: dict[str, str] = {}
        for p in parts[1:]:
            k, sep, v = p.partition("=")
            if not sep or k not in ("replay", "dp", "topic", "block", "bind"):
                raise ValueError(f"{wid}: unknown option {p!r} (replay, dp, topic, block, bind)")
            opts[k] = v
        try:
            dp = int(opts.get("dp", "1"))
            block = int(opts["block"]) if "block" in opts else None
        except ValueError:
            raise ValueError(f"{wid}: dp and block must be integers") from None
        if dp < 1:
            raise ValueError(f"{wid}: dp must be >= 1, got {dp}")
        if block is not None and block < 1:
            raise ValueError(f"{wid}: block must be >= 1, got {block}")
        replay = opts.get("replay") or None
        if replay is not None and "://" not in replay:
            raise ValueError(f"{wid}: replay {replay!r} is not a ZMQ address")
        bind = opts.get("bind", "0").lower() in ("1", "true", "yes")
        return cls(wid, endpoint, replay, dp, opts.get("topic", ""), block, bind)

    def endpoints(self) -> list[EngineEndpoint]:
        """One pinned-rank endpoint per DP rank (ports offset as vLLM does)."""
        if self.rank is not None:
            return [
                EngineEndpoint(
                    self.worker_id,
                    self.endpoint,
                    self.replay_endpoint,
                    self.topic,
                    dp_rank=self.rank,
                    bind=self.bind,
                )
            ]
        base = EngineEndpoint(
            self.worker_id, self.endpoint, self.replay_endpoint, self.topic, bind=self.bind
        )
        return expand_dp_ranks(base, self.dp_size)

    def worker_ids(self) -> list[str]:
        """The router's worker id of each DP rank (``ID``, ``ID#dp1``, ...)."""
        return [dp_worker_id(ep.worker_id, ep.dp_rank or 0) for ep in self.endpoints()]


def parse_engines(text: str) -> tuple[EngineSpec, ...]:
    """Entries separated by whitespace or ``;``."""
    return tuple(EngineSpec.parse(t) for t in re.split(r"[\s;]+", text.strip()) if t)


def _default_listener_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Everything `kvrouter listen` needs; validated on construction."""

    model: str = ""
    """The model (OpenAI ``model`` name) whose index this listener writes. Required."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    block_size: int = 16
    hash_seed: str = ""
    key_prefix: str = DEFAULT_PREFIX
    engines: tuple[EngineSpec, ...] = ()
    discovery: Discovery = "static"
    discovery_interval_s: float = 10.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9100
    """0 = any free port (tests); the bound port is ``Listener.metrics_port``."""
    listener_id: str = field(default_factory=_default_listener_id)
    record_ttl_s: float = 3600.0
    """Life of a confirmed record (and of a notice's): the staleness bound of last resort."""
    worker_capacity_blocks: int = 0
    """Trim each worker's records to this many blocks (0 = no limit)."""
    lease_s: float = 10.0
    """Ownership lease: a dead listener's workers are taken over within about this long."""
    replay_timeout_s: float = 2.0
    drain_grace_s: float = 20.0
    """SIGTERM: how long to keep applying what was already received before exiting."""
    notices: bool = True
    """Subscribe to the model's notice channel."""
    key_cache_blocks: int = 65_536
    """Engine hash -> router key entries cached per worker (misses cost a Redis read)."""
    apply_batch: int = 4096
    """Most queued items (engine batches, notices) applied in one flush."""
    apply_max_blocks: int = 1024
    """Most block events in one flush (a single larger engine batch still goes whole). Redis
    runs one script at a time, so this bounds how long a router's lookup can wait behind the
    listener: about 1-3 ms of Redis time per flush."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{env_name(name)} / {flag_name(name)}: {why}")

        if not self.model:
            raise bad("model", "required: the model name whose index this listener writes")
        try:
            validate_model(self.model)
            KeySchema(self.key_prefix)
        except KeyNameError as exc:
            raise bad("model" if "model" in str(exc) else "key_prefix", str(exc)) from None
        scheme = self.redis_url.partition("://")[0].lower()
        if scheme not in SCHEMES:
            raise bad("redis_url", f"scheme must be one of {', '.join(SCHEMES)}")
        for name in ("block_size", "key_cache_blocks", "apply_batch", "apply_max_blocks"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.worker_capacity_blocks < 0:
            raise bad("worker_capacity_blocks", "must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise bad(
                "metrics_port", f"must be a TCP port (0 = any free one), got {self.metrics_port}"
            )
        for name in (
            "record_ttl_s",
            "lease_s",
            "replay_timeout_s",
            "discovery_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if self.drain_grace_s < 0:
            raise bad("drain_grace_s", "must be >= 0")
        if self.discovery not in DISCOVERY_MODES:
            raise bad("discovery", f"must be one of {', '.join(DISCOVERY_MODES)}")
        if not self.listener_id or any(c.isspace() for c in self.listener_id):
            raise bad("listener_id", "must be non-empty without whitespace")
        seen: set[str] = set()
        for e in self.engines:
            if e.worker_id in seen:
                raise bad("engines", f"worker {e.worker_id!r} configured twice")
            seen.add(e.worker_id)
            if e.block_size is not None and e.block_size % self.block_size:
                raise bad(
                    "engines",
                    f"{e.worker_id}: block={e.block_size} is not a multiple of the router's "
                    f"block size {self.block_size} (KVR_BLOCK_SIZE); run the engine with "
                    f"--block-size {self.block_size} or a multiple of it",
                )

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["redis_url"] = redact_url(self.redis_url)
        return "ListenerSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def record_ttl_ms(self) -> int:
        return max(1, int(self.record_ttl_s * 1000))

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ListenerSettings:
        """Settings from ``KVR_<FIELD>`` variables, then ``overrides`` (flags) on top.

        Overrides that are None are ignored (argparse's "not given"). Raises SettingsError
        naming the variable for values that do not parse.
        """
        env = os.environ if environ is None else environ
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in names:
            raw = env.get(env_name(name))
            if raw is None or raw == "":
                continue
            try:
                values[name] = _PARSERS[name](raw)
            except ValueError as exc:
                raise SettingsError(f"{env_name(name)}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_name(field_name: str) -> str:
    """``KVR_<FIELD>``, e.g. ``KVR_RECORD_TTL_S``."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """``--<field>``; engines are ``--engine`` (one per entry)."""
    return "--engine" if field_name == "engines" else "--" + field_name.replace("_", "-")


def _int(raw: str) -> int:
    try:
        return int(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


def _float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _discovery(raw: str) -> str:
    if raw not in DISCOVERY_MODES:
        raise ValueError(f"expected one of {', '.join(DISCOVERY_MODES)}, got {raw!r}")
    return raw


def _engines(raw: str) -> tuple[EngineSpec, ...]:
    try:
        return parse_engines(raw)
    except (ValueError, KeyNameError) as exc:
        raise ValueError(str(exc)) from None


def _str(raw: str) -> str:
    return raw


_PARSERS: dict[str, Callable[[str], Any]] = {
    "model": _str,
    "redis_url": _str,
    "block_size": _int,
    "hash_seed": _str,
    "key_prefix": _str,
    "engines": _engines,
    "discovery": _discovery,
    "discovery_interval_s": _float,
    "metrics_host": _str,
    "metrics_port": _int,
    "listener_id": _str,
    "record_ttl_s": _float,
    "worker_capacity_blocks": _int,
    "lease_s": _float,
    "replay_timeout_s": _float,
    "drain_grace_s": _float,
    "notices": _bool,
    "key_cache_blocks": _int,
    "apply_batch": _int,
    "apply_max_blocks": _int,
}
