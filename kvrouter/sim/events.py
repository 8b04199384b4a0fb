"""KV-cache events and their msgpack encoding, as vLLM puts them on the wire.

A batch is `[ts, [event, ...], dp_rank]` in both encodings; the events inside are either
positional arrays (vLLM before #42892) or tagged maps (after). Field order and the fields
that each era sends follow shared/specs/kv-events.md sections 1.2-1.4: positional events
carry every declared field including trailing defaults, map events omit defaulted optional
fields (`kv_cache_spec_sliding_window`) but keep required-but-None ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

Encoding = Literal["positional", "map"]

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
SPEC_KIND = "full_attention"


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A run of consecutive blocks of one request became full and cached."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    """The LoRA adapter the blocks were computed under (None: the base model)."""
    extra_keys: list[Any] | None = None
    """One entry per block (None: no extra keys), as vLLM sends them; a salted request's
    first block carries ``[cache_salt]`` (``[lora_name, cache_salt]`` under an adapter)."""
    medium: str = MEDIUM_GPU
    """Where the blocks are: GPU, or CPU for the offload tier (whose stores carry hashes
    only, no tokens, as vLLM's CPU offloading connector sends them)."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks were evicted (one per event, as vLLM's lazy eviction emits them)."""

    block_hashes: list[int]
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def event_to_wire(event: KVEvent, encoding: Encoding) -> list[Any] | dict[str, Any]:
    """One event as the msgpack-ready object vLLM's msgspec encoder would produce."""
    if isinstance(event, BlockStored):
        extra_keys = event.extra_keys or [None] * len(event.block_hashes)
        if encoding == "positional":
            return [
                "BlockStored",
                event.block_hashes,
                event.parent_block_hash,
                event.token_ids,
                event.block_size,
                None,  # lora_id
                event.medium,
                event.lora_name,
                extra_keys,
                0,  # group_idx
                SPEC_KIND,
                None,  # kv_cache_spec_sliding_window
            ]
        return {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium,
            "lora_name": event.lora_name,
            "extra_keys": extra_keys,
            "group_idx": 0,
            "kv_cache_spec_kind": SPEC_KIND,
        }
    if isinstance(event, BlockRemoved):
        if encoding == "positional":
            return ["BlockRemoved", event.block_hashes, event.medium, 0]
        return {
            "type": "BlockRemoved",
            "block_hashes": event.block_hashes,
            "medium": event.medium,
            "group_idx": 0,
        }
    if encoding == "positional":
        return ["AllBlocksCleared"]
    return {"type": "AllBlocksCleared"}


def encode_batch(
    ts: float, events: Sequence[KVEvent], encoding: Encoding, dp_rank: int = 0
) -> bytes:
    """The msgpack payload of one `KVEventBatch`: `[ts, [events...], dp_rank]`."""
    body = [event_to_wire(e, encoding) for e in events]
    packed: bytes = msgpack.packb([float(ts), body, dp_rank], use_bin_type=True)
    return packed


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """Decode a batch of either encoding back into event objects.

    The simulator's own tests and tools use it; the router's listener has its own, more
    tolerant decoder. Unknown tags are skipped.
    """
    outer = msgpack.unpackb(payload, raw=False)
    if isinstance(outer, dict):
        ts, raw_events, rank = outer["ts"], outer["events"], outer.get("data_parallel_rank")
    else:
        ts, raw_events = outer[0], outer[1]
        rank = outer[2] if len(outer) > 2 else None
    events: list[KVEvent] = []
    for raw in raw_events:
        if isinstance(raw, dict):
            tag = raw.get("type")
            if tag == "BlockStored":
                events.append(
                    BlockStored(
                        list(raw["block_hashes"]),
                        raw["parent_block_hash"],
                        list(raw["token_ids"]),
                        int(raw["block_size"]),
                        raw.get("lora_name"),
                    )
                )
            elif tag == "BlockRemoved":
                events.append(BlockRemoved(list(raw["block_hashes"])))
            elif tag == "AllBlocksCleared":
                events.append(AllBlocksCleared())
        else:
            tag = raw[0]
            if tag == "BlockStored":
                lora = raw[7] if len(raw) > 7 else None
                events.append(BlockStored(list(raw[1]), raw[2], list(raw[3]), int(raw[4]), lora))
            elif tag == "BlockRemoved":
                events.append(BlockRemoved(list(raw[1])))
            elif tag == "AllBlocksCleared":
                events.append(AllBlocksCleared())
    return float(ts), events, rank
