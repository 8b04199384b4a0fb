"""The model catalogue: which models the router serves, each one's settings, and LoRA adapters.

A router serves several base models and their LoRA adapters. Per base model it keeps a
tokenizer (and chat template), a block size, a hash seed and scoring weights; an adapter is
its own model for hashing and for the index (its own hash-tag namespace, the adapter name),
but tokenizes, chunks and scores exactly like its base: the engine serves it with the base's
tokenizer and block size.

Where models come from:

- **configuration**: ``--model`` (the single-model case) or the ``[[models]]`` of the
  ``--config`` file (TOML or YAML, see docs/configuration.md), adapters as entries with a
  ``parent``;
- **workers**: each worker's ``GET /v1/models``, polled (vLLM lists a loaded adapter as an
  extra entry whose ``parent`` is the base model), or the ``models`` of its registry entry or
  of its ``[[workers]]`` config entry.

Base models must be configured (a base model the router has no settings for could be hashed
with the wrong block size and silently never hit); adapters a worker lists are served when
their parent is a configured base model, since everything about them but the name comes from
the base.

Hashing agreement with the listener (eviction_listener/applier.py): an engine event with
``lora_name = A`` from a worker of base model ``B`` is written under namespace ``A`` with keys
``BlockHasher(B, block_size, hash_seed).keys(tokens, lora_name=A)``. A request for adapter
``A`` is looked up the same way (`ModelCatalogue.resolve`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrouter.index.hashing import BlockHasher
from kvrouter.index.keys import KeyNameError, validate_model

LORA_PLACEMENTS = ("loaded_only", "any_base_worker")
# vLLM's --chat-template-content-format values (kvrouter.tokenizer.preprocess.CONTENT_FORMATS;
# repeated here so reading a config file does not import the tokenizer).
CONTENT_FORMATS = ("auto", "string", "openai")


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One ``[[models]]`` entry. None = the router-wide setting (flag / env / ``[router]``)."""

    name: str
    parent: str | None = None
    """Base model of a LoRA adapter (None: a base model)."""
    tokenizer: str | None = None
    chat_template: str | None = None
    """A Jinja file that replaces the tokenizer directory's chat template."""
    chat_template_content_format: str | None = None
    """"string" or "openai" when the engine runs with ``--chat-template-content-format``;
    None = detect it from the template, as vLLM's default "auto" does."""
    block_size: int | None = None
    hash_seed: str | None = None
    prefill_weight: float | None = None
    queue_weight: float | None = None
    decode_weight: float | None = None
    temperature: float | None = None
    lora_path: str | None = None
    """Adapter only: path the engine loads it from (``POST /v1/load_lora_adapter``) when the
    router places it on a worker that does not have it (``lora_placement=any_base_worker``)."""

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


_BASE_KEYS = {
    "name": str,
    "tokenizer": str,
    "chat_template": str,
    "chat_template_content_format": str,
    "block_size": int,
    "hash_seed": str,
    "prefill_weight": float,
    "queue_weight": float,
    "decode_weight": float,
    "temperature": float,
}
_ADAPTER_KEYS = {"name": str, "parent": str, "lora_path": str}
_WORKER_KEYS = {"url": str, "id": str, "models": list, "dp_rank": int, "role": str}


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A parsed config file: router-wide values, models, workers."""

    path: str
    router: dict[str, Any] = field(default_factory=dict)
    """``[router]``: setting field name -> value (applied below the environment and flags)."""
    models: tuple[ModelConfig, ...] = ()
    workers: tuple[dict[str, Any], ...] = ()


def _typed(where: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def read_config_text(path: str) -> dict[str, Any]:
    """The file as a dict: TOML for ``.toml``, YAML for ``.yaml``/``.yml`` (needs PyYAML)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    suffix = p.suffix.lower()
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: YAML config files need PyYAML (pip install 'kvrouter[yaml]'), or use TOML"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    else:
        raise ConfigError(f"{path}: config file must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table / mapping")
    return data


def _tables(
    data: Mapping[str, Any], key: str, required: str, path: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The `[[key]]` tables of a config one by one, each with where it is (for messages);
    each must be a table with a `required` entry."""
    raw = data.get(key) or []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: {key!r} must be a list of tables ([[{key}]])")
    for i, entry in enumerate(raw):
        where = f"{path}: {key}[{i}]"
        if not isinstance(entry, dict) or required not in entry:
            raise ConfigError(f"{where}: must be a table with a {required!r}")
        yield where, entry


def parse_config(data: Mapping[str, Any], path: str = "<config>") -> ConfigFile:
    """Validate a config mapping (router setting names are checked by the settings loader)."""
    unknown = set(data) - {"router", "models", "workers"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}")
    router = data.get("router") or {}
    if not isinstance(router, dict):
        raise ConfigError(f"{path}: [router] must be a table")
    models: list[ModelConfig] = []
    for where, entry in _tables(data, "models", "name", path):
        allowed = _ADAPTER_KEYS if "parent" in entry else _BASE_KEYS
        bad = set(entry) - set(allowed)
        if bad:
            kind = "an adapter (it has a 'parent')" if "parent" in entry else "a base model"
            raise ConfigError(
                f"{where}: keys {sorted(bad)} are not allowed for {kind}; "
                f"allowed: {sorted(allowed)}"
            )
        values = {k: _typed(where, k, v, allowed[k]) for k, v in entry.items()}
        try:
            validate_model(values["name"])
        except KeyNameError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        fmt = values.get("chat_template_content_format")
        if fmt is not None and fmt not in CONTENT_FORMATS:
            raise ConfigError(
                f"{where}: 'chat_template_content_format' must be one of "
                f"{', '.join(CONTENT_FORMATS)}, got {fmt!r}"
            )
        if values.get("block_size") is not None and values["block_size"] < 1:
            raise ConfigError(f"{where}: 'block_size' must be >= 1")
        for k in ("prefill_weight", "queue_weight", "decode_weight", "temperature"):
            if values.get(k) is not None and values[k] < 0:
                raise ConfigError(f"{where}: {k!r} must be >= 0")
        models.append(ModelConfig(**values))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: model names must be unique, got {names}")
    adapter_names = {m.name for m in models if m.is_adapter}
    for m in models:
        # Whether the parent is a served base model is checked against the final model list
        # (flags may add models) when the settings are validated.
        if m.is_adapter and m.parent in adapter_names:
            raise ConfigError(f"{path}: adapter {m.name!r} has an adapter as its parent")
    workers: list[dict[str, Any]] = []
    for where, entry in _tables(data, "workers", "url", path):
        bad = set(entry) - set(_WORKER_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown keys {sorted(bad)}")
        w = {k: _typed(where, k, v, _WORKER_KEYS[k]) for k, v in entry.items()}
        if not all(isinstance(m, str) for m in w.get("models", [])):
            raise ConfigError(f"{where}: 'models' must be a list of model names")
        workers.append(w)
    return ConfigFile(path, dict(router), tuple(models), tuple(workers))


def load_config_file(path: str) -> ConfigFile:
    """Read and validate a TOML or YAML config file. Raises ConfigError."""
    return parse_config(read_config_text(path), path)


# -- the catalogue ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BaseModel:
    """Resolved settings of one base model (config entry over router-wide defaults)."""

    name: str
    tokenizer: str
    chat_template: str
    block_size: int
    hash_seed: str
    prefill_weight: float
    queue_weight: float
    decode_weight: float
    temperature: float
    hasher: BlockHasher
    content_format: str = "auto"
    """The chat template content format: "auto" (detected as vLLM does), "string", "openai"."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a request's ``model`` means for routing."""

    name: str
    """The requested name: the index namespace (hash tag) of its blocks."""
    base: BaseModel
    lora_name: str | None = None
    """The adapter's name when `name` is an adapter (folded into the hash root)."""

    def keys(self, tokens: Any, cache_salt: str | None = None) -> list[int]:
        return self.base.hasher.keys(tokens, lora_name=self.lora_name, cache_salt=cache_salt)


@dataclass(slots=True)
class ModelCatalogue:
    """Configured base models and adapters; worker-listed adapters are resolved on demand."""

    bases: dict[str, BaseModel]
    adapters: dict[str, ModelConfig]
    """Configured adapters by name."""

    @classmethod
    def build(
        cls,
        models: Iterable[str],
        configs: Iterable[ModelConfig],
        *,
        tokenizer: str = "",
        block_size: int = 16,
        hash_seed: str = "",
        prefill_weight: float = 1.0,
        queue_weight: float = 0.5,
        decode_weight: float = 2.0,
        temperature: float = 0.0,
    ) -> ModelCatalogue:
        by_name = {c.name: c for c in configs}
        bases: dict[str, BaseModel] = {}
        adapters: dict[str, ModelConfig] = {}
        for name in models:
            c = by_name.get(name, ModelConfig(name))
            if c.is_adapter:
                adapters[name] = c
                continue
            bs = c.block_size if c.block_size is not None else block_size
            seed = c.hash_seed if c.hash_seed is not None else hash_seed
            bases[name] = BaseModel(
                name,
                c.tokenizer if c.tokenizer is not None else tokenizer,
                c.chat_template or "",
                bs,
                seed,
                c.prefill_weight if c.prefill_weight is not None else prefill_weight,
                c.queue_weight if c.queue_weight is not None else queue_weight,
                c.decode_weight if c.decode_weight is not None else decode_weight,
                c.temperature if c.temperature is not None else temperature,
                BlockHasher(name, bs, seed),
                c.chat_template_content_format or "auto",
            )
        for a in adapters.values():
            if a.parent not in bases:
                raise ValueError(
                    f"adapter {a.name!r}: its parent {a.parent!r} is not a configured base model"
                )
        return cls(bases, adapters)

    def resolve(self, name: str, listed_parent: str | None = None) -> Resolved | None:
        """Routing view of `name`: a base model, a configured adapter, or an adapter some
        worker lists with `listed_parent`; None when the router cannot serve it."""
        base = self.bases.get(name)
        if base is not None:
            return Resolved(name, base)
        conf = self.adapters.get(name)
        parent = conf.parent if conf is not None else listed_parent
        if parent is None or parent not in self.bases:
            return None
        if conf is None:
            try:
                validate_model(name)  # a worker's name becomes a Redis hash tag
            except KeyNameError:
                return None
        return Resolved(name, self.bases[parent], lora_name=name)

    def lora_path(self, name: str) -> str | None:
        conf = self.adapters.get(name)
        return conf.lora_path if conf is not None else None

    def parent_of(self, name: str) -> str | None:
        conf = self.adapters.get(name)
        return conf.parent if conf is not None else None
