"""Settings of `kvrouter sim`: one frozen dataclass, from `KVR_SIM_*` variables and flags.

Default capacity, and what it stands for
----------------------------------------
Each simulated worker stands for Llama-3-8B in bf16 on one 80 GB GPU (A100/H100 class) with
vLLM's defaults. A token's KV cache is 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes
= 128 KiB. vLLM may use 90% of the GPU (72 GiB); the weights take 15 GiB (8.03e9 params x 2
bytes) and activations, CUDA graphs and non-torch memory about 5 GiB, which leaves 52 GiB of
KV cache: 52 GiB / 128 KiB = 425,984 tokens = 26,624 blocks of 16 tokens.

Default timing, and what it stands for
--------------------------------------
- Prefill 16,000 tokens/s: 2 x 8e9 FLOPs per token at about half of peak sits between an
  A100 (~10k tokens/s) and an H100 (~30k tokens/s).
- Decode step 10 ms: reading 16 GB of weights once per step at ~2 TB/s, plus overhead.
- Plus 0.25 ms per sequence in the step: reading one sequence's KV cache of ~4k tokens
  (0.5 GiB) at ~2 TB/s.
- At most 256 sequences per batch and 8,192 tokens per step (vLLM's `max_num_seqs` and
  `max_num_batched_tokens`), chunked prefill.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

KvEventsMode = Literal["off", "positional", "map"]
KV_EVENTS_MODES: tuple[str, ...] = get_args(KvEventsMode)

ENV_PREFIX = "KVR_SIM_"

# Derivation in the module docstring; kept as named constants so --help can quote them.
BYTES_PER_TOKEN_LLAMA3_8B = 2 * 32 * 8 * 128 * 2
KV_BUDGET_BYTES_80GB = 52 * 1024**3
DEFAULT_CAPACITY_TOKENS = KV_BUDGET_BYTES_80GB // BYTES_PER_TOKEN_LLAMA3_8B  # 425,984
DEFAULT_MODEL = "sim-llama-3-8b"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the flag and the variable."""


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Everything `kvrouter sim` needs; built by `from_env()` and CLI flags, validated here."""

    workers: int = 4
    host: str = "127.0.0.1"
    base_port: int = 8100
    block_size: int = 16
    capacity_tokens: int = DEFAULT_CAPACITY_TOKENS
    model: str = DEFAULT_MODEL
    lora_adapters: str = ""
    """Comma-separated LoRA adapter names served besides `model` (listed with it as parent;
    each caches its blocks apart: the adapter folded into the hash root, named in events)."""
    max_model_len: int = 131_072
    prefill_tokens_per_s: float = 16_000.0
    decode_step_ms: float = 10.0
    decode_step_ms_per_seq: float = 0.25
    max_batch: int = 256
    max_batched_tokens: int = 8192
    time_scale: float = 1.0
    kv_events: KvEventsMode = "off"
    kv_events_base_port: int = 5557
    kv_events_topic: str = ""
    kv_events_buffer_steps: int = 10_000
    seed: int = 0
    ready_file: str | None = None
    prefill_workers: int = 0
    """Prefill/decode disaggregation: the first N workers are prefill workers, the others
    decode workers (0 = every worker serves whole requests, role "both")."""
    kv_bytes_per_token: int = 131_072
    """KV cache bytes per token moved from a prefill to a decode worker (Llama-3-8B in bf16:
    2 x 32 layers x 8 KV heads x 128 dims x 2 bytes)."""
    transfer_gb_per_s: float = 25.0
    """Link bandwidth between prefill and decode workers, in GB/s (simulated time)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{flag_name(name)} / {env_name(name)}: {why}")

        positive_ints = ("workers", "block_size", "max_batch", "max_batched_tokens")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("base_port", "kv_events_base_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise bad(name, f"must be a TCP port (0 picks free ports), got {port}")
            if port and port + 2 * self.workers > 65536:
                raise bad(name, f"{self.workers} workers do not fit above port {port}")
        for name in ("prefill_tokens_per_s", "time_scale"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("decode_step_ms", "decode_step_ms_per_seq"):
            if not getattr(self, name) >= 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.capacity_tokens < self.block_size:
            raise bad(
                "capacity_tokens",
                f"must hold at least one block of {self.block_size} tokens, "
                f"got {self.capacity_tokens}",
            )
        if self.max_model_len < 1:
            raise bad("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if self.kv_events not in KV_EVENTS_MODES:
            raise bad("kv_events", f"must be one of {', '.join(KV_EVENTS_MODES)}")
        if self.kv_events_buffer_steps < 0:
            raise bad("kv_events_buffer_steps", "must be >= 0")
        if not 0 <= self.prefill_workers < self.workers:
            raise bad(
                "prefill_workers",
                f"must be in [0, workers) so a decode worker remains, got {self.prefill_workers}",
            )
        if self.kv_bytes_per_token < 0:
            raise bad("kv_bytes_per_token", "must be >= 0")
        if not self.transfer_gb_per_s > 0:
            raise bad("transfer_gb_per_s", f"must be > 0, got {self.transfer_gb_per_s}")
        if not self.model:
            raise bad("model", "must not be empty")
        if self.model in self.adapters:
            raise bad("lora_adapters", f"must not name the base model {self.model!r}")

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapter names (parsed `lora_adapters`)."""
        return tuple(dict.fromkeys(a.strip() for a in self.lora_adapters.split(",") if a.strip()))

    def role(self, index: int) -> str:
        """The prefill/decode role of worker `index`."""
        if not self.prefill_workers:
            return "both"
        return "prefill" if index < self.prefill_workers else "decode"

    def transfer_s(self, tokens: int) -> float:
        """Simulated seconds to pull `tokens` tokens of KV cache over the link."""
        return tokens * self.kv_bytes_per_token / (self.transfer_gb_per_s * 1e9)

    @property
    def num_gpu_blocks(self) -> int:
        """KV-cache capacity of one worker in blocks (whole blocks only, as vLLM)."""
        return self.capacity_tokens // self.block_size

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SimSettings:
        """Settings from `KVR_SIM_<FIELD>` variables, then `overrides` (flags) on top.

        Overrides whose value is None are ignored, so argparse defaults of None mean "not
        given". Raises SettingsError naming the variable for unparsable values.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _PARSERS[f.name](raw)
            except ValueError as exc:
                raise SettingsError(f"{env_name(f.name)}: {exc}") from None
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_name(field_name: str) -> str:
    """The environment variable of a field, e.g. `KVR_SIM_CAPACITY_TOKENS`."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """The CLI flag of a field, e.g. `--capacity-tokens`."""
    return "--" + field_name.replace("_", "-")


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


def _mode(raw: str) -> str:
    if raw not in KV_EVENTS_MODES:
        raise ValueError(f"expected one of {', '.join(KV_EVENTS_MODES)}, got {raw!r}")
    return raw


def _str(raw: str) -> str:
    return raw


_PARSERS: dict[str, Callable[[str], Any]] = {
    "workers": _int,
    "host": _str,
    "base_port": _int,
    "block_size": _int,
    "capacity_tokens": _int,
    "model": _str,
    "lora_adapters": _str,
    "max_model_len": _int,
    "prefill_tokens_per_s": _float,
    "decode_step_ms": _float,
    "decode_step_ms_per_seq": _float,
    "max_batch": _int,
    "max_batched_tokens": _int,
    "time_scale": _float,
    "kv_events": _mode,
    "kv_events_base_port": _int,
    "kv_events_topic": _str,
    "kv_events_buffer_steps": _int,
    "seed": _int,
    "ready_file": _str,
    "prefill_workers": _int,
    "kv_bytes_per_token": _int,
    "transfer_gb_per_s": _float,
}
