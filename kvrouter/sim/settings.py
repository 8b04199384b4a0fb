"""Settings of `kvrouter sim`: the shared schema's machinery with `KVR_SIM_*` variables and flags.

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

from typing import ClassVar, Literal, get_args

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from kvrouter.settings import Int, KvrSettings, Level, SettingsError, setting

KvEventsMode = Literal["off", "positional", "map"]
KV_EVENTS_MODES: tuple[str, ...] = get_args(KvEventsMode)

ENV_PREFIX = "KVR_SIM_"

# Derivation in the module docstring; kept as named constants so --help can quote them.
BYTES_PER_TOKEN_LLAMA3_8B = 2 * 32 * 8 * 128 * 2
KV_BUDGET_BYTES_80GB = 52 * 1024**3
DEFAULT_CAPACITY_TOKENS = KV_BUDGET_BYTES_80GB // BYTES_PER_TOKEN_LLAMA3_8B  # 425,984
DEFAULT_MODEL = "sim-llama-3-8b"

__all__ = ["KV_EVENTS_MODES", "SettingsError", "SimSettings", "env_name", "flag_name"]


class SimSettings(KvrSettings):
    """Everything `kvrouter sim` needs: the shared schema's machinery (one parser, one error
    type) with the simulator's own ``KVR_SIM_*`` variables; it connects to no Redis."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)
    COMMAND: ClassVar[str] = "kvrouter sim"

    workers: Int = setting(4, "number of simulated workers in this process", ge=1)
    host: str = setting("127.0.0.1", "address every worker listens on (HTTP and ZMQ)")
    base_port: Int = setting(
        8100, "HTTP port of worker 0; worker i gets base+i (0 = free ports)", ge=0, le=65535
    )
    block_size: Int = setting(16, "tokens per KV-cache block", ge=1)
    capacity_tokens: Int = setting(
        DEFAULT_CAPACITY_TOKENS,
        f"KV-cache capacity of each worker in tokens; the default {DEFAULT_CAPACITY_TOKENS:,} "
        "is Llama-3-8B in bf16 (128 KiB per token) on one 80 GB GPU: 90% of 80 GiB minus "
        "15 GiB of weights and ~5 GiB of activations leaves 52 GiB = 26,624 blocks of 16",
    )
    model: str = setting(DEFAULT_MODEL, "model name served (and checked) on the OpenAI API")
    lora_adapters: str = setting(
        "",
        "comma-separated LoRA adapter names also served (parent: --model); each adapter's "
        "blocks are its own, and its KV events carry lora_name",
    )
    max_model_len: Int = setting(131_072, "longest prompt + max_tokens accepted", ge=1)
    prefill_tokens_per_s: float = setting(
        16_000.0, "uncached prompt tokens prefilled per simulated second", gt=0
    )
    cpu_capacity_tokens: Int = setting(
        0,
        "capacity of each worker's CPU offload tier in tokens (0 = none): blocks the GPU "
        "evicts are offloaded there and published as vLLM events with medium CPU",
        ge=0,
    )
    cpu_load_tokens_per_s: float = setting(
        160_000.0,
        "tokens of KV loaded back from the CPU tier per simulated second (the reload cost; "
        "default ten times the prefill speed)",
        gt=0,
    )
    speed_mix: str = setting(
        "",
        "comma-separated speed factors given to the workers in turn (2,1: every other worker "
        "twice as fast in prefill and decode); empty = all alike",
    )
    decode_step_ms: float = setting(10.0, "base duration of one engine step (simulated ms)", ge=0)
    decode_step_ms_per_seq: float = setting(
        0.25, "added to each step per sequence in the batch (simulated ms)", ge=0
    )
    max_batch: Int = setting(256, "most sequences in the running batch (vLLM max_num_seqs)", ge=1)
    max_batched_tokens: Int = setting(
        8192, "token budget of one step; longer prefills are chunked", ge=1
    )
    time_scale: float = setting(
        1.0, "simulated seconds per real second (60 replays an hour in a minute)", gt=0
    )
    kv_events: KvEventsMode = setting(
        "off", "publish KV events over ZMQ in vLLM's positional or map encoding"
    )
    kv_events_base_port: Int = setting(
        5557,
        "PUB port of worker 0; worker i gets base+2i, replay base+2i+1 (0 = free ports)",
        ge=0,
        le=65535,
    )
    kv_events_topic: str = setting("", "topic frame of every event message")
    kv_events_buffer_steps: Int = setting(10_000, "event batches kept for replay", ge=0)
    seed: Int = setting(0, "seed folded into the engine block hashes")
    ready_file: str | None = setting(None, "write the fleet's JSON description here once listening")
    log_level: Level = setting("info", "logging level on stderr: debug, info, warning or error")
    prefill_workers: Int = setting(
        0,
        "P/D: the first N workers are prefill workers, the rest decode workers (0 = all serve "
        "whole requests)",
        ge=0,
    )
    kv_bytes_per_token: Int = setting(
        131_072,
        "P/D: KV cache bytes per token a decode worker pulls (Llama-3-8B in bf16: 2 x 32 "
        "layers x 8 KV heads x 128 dims x 2 bytes)",
        ge=0,
    )
    transfer_gb_per_s: float = setting(
        25.0, "P/D: prefill-to-decode link bandwidth in GB/s (simulated time)", gt=0
    )

    @classmethod
    def names(cls, name: str) -> str:
        # The simulator is driven by flags far more than by variables: flag first.
        return f"{cls.flag_name(name)} / {cls.env_name(name)}"

    @model_validator(mode="after")
    def _across_fields(self) -> SimSettings:
        for name in ("base_port", "kv_events_base_port"):
            port = getattr(self, name)
            if port and port + 2 * self.workers > 65536:
                raise ValueError(
                    f"{self.names(name)}: {self.workers} workers do not fit above port {port}"
                )
        if self.capacity_tokens < self.block_size:
            raise ValueError(
                f"{self.names('capacity_tokens')}: must hold at least one block of "
                f"{self.block_size} tokens, got {self.capacity_tokens}"
            )
        if self.prefill_workers >= self.workers:
            raise ValueError(
                f"{self.names('prefill_workers')}: must be below --workers so a decode worker "
                f"remains, got {self.prefill_workers}"
            )
        try:
            speeds = self.speeds
        except ValueError:
            raise ValueError(
                f"{self.names('speed_mix')}: expected comma-separated numbers, "
                f"got {self.speed_mix!r}"
            ) from None
        if any(not x > 0 for x in speeds):
            raise ValueError(
                f"{self.names('speed_mix')}: every factor must be > 0, got {self.speed_mix!r}"
            )
        if not self.model:
            raise ValueError(f"{self.names('model')}: must not be empty")
        if self.model in self.adapters:
            raise ValueError(
                f"{self.names('lora_adapters')}: must not name the base model {self.model!r}"
            )
        return self

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapter names (parsed `lora_adapters`)."""
        return tuple(dict.fromkeys(a.strip() for a in self.lora_adapters.split(",") if a.strip()))

    @property
    def speeds(self) -> tuple[float, ...]:
        """The parsed `speed_mix` (empty when unset): a mixed fleet. A factor multiplies
        prefill throughput and divides the decode step times, as a faster GPU does both."""
        return tuple(float(x) for x in self.speed_mix.split(",") if x.strip())

    def speed_of(self, index: int) -> float:
        """The speed factor of worker `index` (the mix repeats over the fleet)."""
        speeds = self.speeds
        return speeds[index % len(speeds)] if speeds else 1.0

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


def env_name(field_name: str) -> str:
    """The environment variable of a field, e.g. `KVR_SIM_CAPACITY_TOKENS`."""
    return SimSettings.env_name(field_name)


def flag_name(field_name: str) -> str:
    """The CLI flag of a field, e.g. `--capacity-tokens`."""
    return SimSettings.flag_name(field_name)
