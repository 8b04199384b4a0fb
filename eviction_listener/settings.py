"""Settings of `kvrouter listen`: the shared schema plus the listener's own fields.

The shared fields (Redis, model, block size, discovery...) come from kvrouter/settings.py;
this module adds the listener's own. Every field is an environment variable ``KVR_<FIELD>``
and a flag ``--<field>`` (engines: ``KVR_ENGINES`` / ``--engine``, repeatable). Flags win over
variables.

Engines (``KVR_ENGINES``, entries separated by whitespace, ``;`` or ``,``; or one ``--engine``
each)::

    ID=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,dp=N][,topic=T][,block=B][,bind=1]

``ID`` is the router's worker id. ``dp=N`` expands to N data-parallel ranks on ports P..P+N-1
(replay likewise); rank r > 0 is the router's worker ``ID#dpR``. ``block`` is the engine's
block size when it is a multiple of the router's ``KVR_BLOCK_SIZE`` (each engine block is then
indexed as block/KVR_BLOCK_SIZE router blocks); it defaults to ``KVR_BLOCK_SIZE``. ``bind=1``
is vLLM's centralized mode: the listener binds and engines connect, told apart by ``topic``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import PlainValidator, field_validator, model_validator

from eviction_listener.zmq_source import EngineEndpoint, dp_worker_id, expand_dp_ranks
from kvrouter.index.keys import validate_worker_id
from kvrouter.settings import (
    DISCOVERY_MODES,
    Bool,
    Int,
    SettingsError,
    SharedSettings,
    setting,
)

__all__ = [
    "DISCOVERY_MODES",
    "EngineSpec",
    "ListenerSettings",
    "SettingsError",
    "env_name",
    "flag_name",
    "parse_engines",
]


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
            if not sep or k not in ENGINE_OPTIONS:
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


ENGINE_OPTIONS = ("replay", "dp", "topic", "block", "bind")


def parse_engines(text: str) -> tuple[EngineSpec, ...]:
    """Entries separated by whitespace, ``;`` or ``,`` (the chart joins them with commas).

    A comma-separated part whose key is an option (``replay=``, ``dp=``...) belongs to the
    entry before it; any other ``X=...`` part starts a new entry.
    """
    entries: list[str] = []
    for chunk in re.split(r"[\s;]+", text.strip()):
        for part in chunk.split(","):
            if not part:
                continue
            key = part.partition("=")[0]
            if entries and key in ENGINE_OPTIONS:
                entries[-1] += "," + part
            else:
                entries.append(part)
    return tuple(EngineSpec.parse(e) for e in entries)


def _engines(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        out: list[EngineSpec] = []
        for v in value:
            out.extend(parse_engines(v) if isinstance(v, str) else (v,))
        return tuple(out)
    return value


def _default_listener_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


Engines = Annotated[tuple[EngineSpec, ...], PlainValidator(_engines)]


class ListenerSettings(SharedSettings):
    """Everything `kvrouter listen` needs: the shared settings plus the listener's own."""

    COMMAND: ClassVar[str] = "kvrouter listen"
    ALIASES: ClassVar[dict[str, str]] = {"model": "models"}

    engines: Engines = setting(
        (),
        "static engines: ID=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,dp=N][,topic=T]"
        "[,block=B][,bind=1], separated by spaces, ';' or ',' (flag: repeatable)",
        flag="--engine",
        repeatable=True,
    )
    discovery_interval_s: float = setting(10.0, "seconds between discovery polls", gt=0)
    metrics_host: str = setting("0.0.0.0", "address of the metrics HTTP server")
    metrics_port: Int = setting(
        9100, "port of /metrics, /health, /ready (0 = any free port)", ge=0, le=65535
    )
    listener_id: str = setting(
        help="this replica's id (default: host-pid)", default_factory=_default_listener_id
    )
    lease_s: float = setting(
        10.0,
        "ownership lease: a dead listener's workers are taken over within about this long",
        gt=0,
    )
    replay_timeout_s: float = setting(2.0, "wait for an engine's replay socket, seconds", gt=0)
    drain_grace_s: float = setting(
        20.0, "on SIGTERM, seconds to keep applying what was already received", ge=0
    )
    notices: Bool = setting(True, "subscribe to the model's notice channel")
    key_cache_blocks: Int = setting(
        65_536,
        "engine hash -> router key entries cached per worker (misses cost a Redis read)",
        ge=1,
    )
    apply_batch: Int = setting(
        4096, "most queued items (engine batches, notices) applied in one flush", ge=1
    )
    apply_max_blocks: Int = setting(
        1024,
        "most block events in one flush (a larger single engine batch still goes whole): "
        "bounds how long a router's lookup waits behind the listener on Redis",
        ge=1,
    )

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, data: Any) -> Any:
        # `model=` (one name) is the listener's natural spelling; the schema's field is the
        # shared `models` list.
        if isinstance(data, dict) and "model" in data:
            data = dict(data)
            model = data.pop("model")
            if isinstance(model, str):
                data["models"] = (model,)
            elif model is not None:
                data["models"] = model
        return data

    @field_validator("listener_id")
    @classmethod
    def _listener_id(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty without whitespace")
        return value

    @model_validator(mode="after")
    def _across_fields(self) -> ListenerSettings:
        if len(self.models) != 1:
            raise ValueError(
                f"{self.names('models')}: required: exactly one model name (the model whose "
                f"index this listener writes; run one listener per base model), got "
                f"{list(self.models)}"
            )
        if not self.redis_url:
            raise ValueError(f"{self.names('redis_url')}: the listener needs Redis")
        self.check_discovery()
        seen: set[str] = set()
        for e in self.engines:
            if e.worker_id in seen:
                raise ValueError(
                    f"{self.names('engines')}: worker {e.worker_id!r} configured twice"
                )
            seen.add(e.worker_id)
            if e.block_size is not None and e.block_size % self.block_size:
                raise ValueError(
                    f"{self.names('engines')}: {e.worker_id}: block={e.block_size} is not a "
                    f"multiple of the router's block size {self.block_size} (KVR_BLOCK_SIZE); "
                    f"run the engine with --block-size {self.block_size} or a multiple of it"
                )
        return self

    @property
    def model(self) -> str:
        """The model (OpenAI ``model`` name) whose index this listener writes."""
        return self.models[0]

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))


def env_name(field_name: str) -> str:
    """``KVR_<FIELD>``, e.g. ``KVR_RECORD_TTL_S``."""
    return ListenerSettings.env_name(field_name)


def flag_name(field_name: str) -> str:
    """``--<field>``; engines are ``--engine`` (one per entry)."""
    return ListenerSettings.flag_name(field_name)
