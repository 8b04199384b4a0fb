"""Every Redis key and channel name kvrouter uses is built here, and nowhere else.

All keys of one model share the hash tag ``{<model>}`` so each Lua script touches a single
Redis Cluster slot and stays atomic, while different models spread over shards. Keys that are
not per model (the worker registry, listener ownership) live under ``<prefix>:`` without a tag;
no script mixes them with model keys.

docs/redis-schema.md documents each key with the redis-cli commands to read it; the test
suite runs those commands against a real server, so keep both in step.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "kvr"
_MAX_ID_LEN = 256


class KeyNameError(ValueError):
    """A model, worker or prefix cannot be used in a key name."""


def validate_worker_id(worker: str) -> str:
    """Worker ids appear in key names, ZSET members and lease members; keep them printable.

    ``|`` separates fields inside lease members and newlines separate candidate lists passed
    to the Lua lookup, so neither may appear in an id.
    """
    if not isinstance(worker, str) or not worker:
        raise KeyNameError("worker id must be a non-empty string")
    if len(worker) > _MAX_ID_LEN:
        raise KeyNameError(f"worker id is longer than {_MAX_ID_LEN} characters: {worker[:40]!r}…")
    if any(c in worker for c in "|\n\r\t ") or not worker.isprintable():
        raise KeyNameError(
            f"worker id {worker!r} contains whitespace, '|' or a non-printable character"
        )
    return worker


def validate_model(model: str) -> str:
    if not isinstance(model, str) or not model:
        raise KeyNameError("model name must be a non-empty string")
    if len(model) > _MAX_ID_LEN:
        raise KeyNameError(f"model name is longer than {_MAX_ID_LEN} characters")
    if any(c in model for c in "{}\n\r") or not model.isprintable():
        # A brace would change which part of the key Redis Cluster hashes.
        raise KeyNameError(f"model name {model!r} contains a brace or a non-printable character")
    return model


def validate_medium(medium: str) -> str:
    """A storage medium an engine reports (vLLM's ``medium``: "GPU", "CPU", a connector's
    name) as it appears in tier key names: 1-32 characters of [A-Za-z0-9_]."""
    if (
        not isinstance(medium, str)
        or not 0 < len(medium) <= 32
        or not medium.isascii()
        or not medium.replace("_", "").isalnum()
    ):
        raise KeyNameError(f"medium {medium!r} must be 1-32 characters of [A-Za-z0-9_]")
    return medium


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis glob (PSUBSCRIBE, SCAN MATCH, ACL ``&`` patterns)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """Key names of one model's slice of the index (all in one Cluster slot)."""

    prefix: str
    model: str

    @property
    def base(self) -> str:
        """``kvr:{model}``: the part every key of this model starts with."""
        return f"{self.prefix}:{{{self.model}}}"

    # -- residency ---------------------------------------------------------------------
    @property
    def worker_prefix(self) -> str:
        """Scripts append a worker id to this to name its records ZSET."""
        return f"{self.base}:wrk:"

    def worker(self, worker: str) -> str:
        """ZSET block hex -> valid-until us: the model of one worker's cache (what is live)."""
        return f"{self.base}:wrk:{validate_worker_id(worker)}"

    def lru(self, worker: str) -> str:
        """ZSET block hex -> last access us: the same blocks as ``worker``, in the one order
        capacity trimming follows (least recently accessed first, whatever wrote them)."""
        return f"{self.base}:lru:{validate_worker_id(worker)}"

    @property
    def cut_prefix(self) -> str:
        return f"{self.base}:cut:"

    def cut(self, worker: str) -> str:
        """ZSET block hex -> valid-until us: blocks removed out of order (holes in a chain)."""
        return f"{self.base}:cut:{validate_worker_id(worker)}"

    @property
    def workers(self) -> str:
        """ZSET worker -> latest valid-until us: the workers with records for this model."""
        return f"{self.base}:workers"

    def engine_map(self, worker: str) -> str:
        """HASH engine block hash (16 hex) -> "router key:parent engine hash:refs:children"."""
        return f"{self.base}:emap:{validate_worker_id(worker)}"

    @property
    def listener_seq(self) -> str:
        """HASH worker -> "<epoch>:<seq>": the last engine batch the listener applied for the
        worker in this model, and the fencing epoch of the listener that applied it."""
        return f"{self.base}:lseq"

    @property
    def head_prefix(self) -> str:
        return f"{self.base}:head:"

    def head(self, key_hex: str) -> str:
        """ZSET worker -> valid-until us: who recorded a chain starting with this block."""
        return f"{self.base}:head:{key_hex}"

    def worker_heads(self, worker: str) -> str:
        """ZSET head block hex -> valid-until us: the chain heads one worker recorded, so they
        are dropped with the records behind them (scripts derive it from the head prefix)."""
        return f"{self.base}:head:@{validate_worker_id(worker)}"

    # -- lower storage tiers (blocks an engine offloaded to CPU memory, disk, ...) -----------
    @property
    def tier_prefix(self) -> str:
        """Lookups append ``<medium>|<worker>`` to this to name a tier ZSET."""
        return f"{self.base}:tier:"

    def tier(self, medium: str, worker: str) -> str:
        """ZSET block hex -> valid-until us: the blocks one worker holds on a lower tier
        (``medium`` as the engine names it, e.g. CPU), apart from its GPU records."""
        return f"{self.base}:tier:{validate_medium(medium)}|{validate_worker_id(worker)}"

    def tier_map(self, medium: str, worker: str) -> str:
        """HASH engine block hash (16 hex) -> block hex: how a removal on that tier, which
        names engine hashes only, finds the record to drop."""
        return f"{self.base}:tmap:{validate_medium(medium)}|{validate_worker_id(worker)}"

    @property
    def tier_workers_prefix(self) -> str:
        return f"{self.base}:tiers:"

    def tier_workers(self, medium: str) -> str:
        """ZSET worker -> latest valid-until us: who has records on that tier (what a
        lookup probes for it)."""
        return f"{self.base}:tiers:{validate_medium(medium)}"

    # -- load ----------------------------------------------------------------------------
    @property
    def load(self) -> str:
        """HASH ``<worker>`` -> in-flight requests, ``<worker>|pf`` -> queued prefill tokens."""
        return f"{self.base}:load"

    @property
    def leases(self) -> str:
        """ZSET ``<worker>|<lease id>|<prefill tokens>`` -> lease expiry us."""
        return f"{self.base}:lease"

    # -- metadata and notices ----------------------------------------------------------------
    @property
    def meta(self) -> str:
        """HASH of settings every writer must agree on (block_size, hash version)."""
        return f"{self.base}:meta"

    @property
    def listeners(self) -> str:
        """ZSET listener id -> last heartbeat ms (wall clock): the live listener replicas of
        this base model. Per model, because a listener serves one base model and only sees
        that model's engines: replicas of another model must not be handed its workers."""
        return f"{self.base}:listeners"

    @property
    def notices(self) -> str:
        """Pub/sub channel of msgpack notices for this model (any worker's)."""
        return f"{self.base}:notices"

    def worker_notices(self, worker: str) -> str:
        """Pub/sub channel of one worker's notices: a notice on it must name that worker, so a
        Redis ACL that lets the worker PUBLISH only here keeps it from speaking for others."""
        return f"{self.base}:notices:{validate_worker_id(worker)}"

    @property
    def worker_notices_prefix(self) -> str:
        return f"{self.base}:notices:"

    @property
    def worker_notices_pattern(self) -> str:
        """PSUBSCRIBE pattern of every worker's notice channel of this model."""
        return glob_escape(self.worker_notices_prefix) + "*"


@dataclass(frozen=True, slots=True)
class KeySchema:
    """The root of the key space. One per process; ``prefix`` lets tenants share a Redis."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{}: \n") or not self.prefix.isascii():
            raise KeyNameError(
                f"key prefix {self.prefix!r} must be ASCII without braces, ':' or spaces"
            )

    def model(self, model: str) -> ModelKeys:
        return ModelKeys(self.prefix, validate_model(model))

    # -- fleet-wide (no hash tag; never used inside a model script) ------------------------
    @property
    def registry(self) -> str:
        """HASH worker id -> JSON description (url, models, capacity)."""
        return f"{self.prefix}:registry"

    @property
    def heartbeats(self) -> str:
        """ZSET worker id -> last heartbeat ms (wall clock)."""
        return f"{self.prefix}:heartbeat"

    def listener_owner(self, worker: str) -> str:
        """HASH owner / until (ms) / epoch / ns:<model>: which listener replica applies this
        worker's events, until when, and its fencing epoch (see own_worker-1.lua)."""
        return f"{self.prefix}:listener:owner:{validate_worker_id(worker)}"

    def rate_bucket(self, client: str) -> str:
        """HASH tok / ts: one client's request token bucket (take_token-1.lua). `client` is
        a digest of its API key or its address (never the key itself); the hash tag keeps
        each bucket in one Cluster slot."""
        if not client or any(c in client for c in "{}\n\r ") or len(client) > _MAX_ID_LEN:
            raise KeyNameError(f"rate-limit client id {client[:40]!r} is not a key-safe id")
        return f"{self.prefix}:rl:{{{client}}}"

    def model_pattern(self) -> str:
        """A SCAN MATCH pattern for the metadata key of every model."""
        return f"{self.prefix}:{{*}}:meta"
