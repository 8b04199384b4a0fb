"""vLLM's KV-event wire format, written for every era the listener reads: both event
encodings, int / bytes / i64 hashes, the positional field sets of each vLLM release, both
batch envelopes. The listener and decode benchmarks build their payloads with it; the
tests' publisher (tests/support/vllm_publisher.py) sends them on real sockets.

Encoding follows ../shared/specs/kv-events.md 1.2-1.5 (written from the spec, not vLLM's code):
positional events carry every field of the chosen era (msgspec ``array_like`` never drops
trailing defaults), map events omit default-valued optional fields but keep required ones as
nil, and the outer batch is positional unless asked otherwise.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any, Final, Literal

import msgpack

from eviction_listener.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)

Encoding = Literal["positional", "map"]
HashFormat = Literal["u64", "bytes", "i64"]
Envelope = Literal["array", "map"]

# Number of BlockStored fields after the tag in each positional era (spec 1.2).
FIELDS_V0_9_0: Final = 5
"""block_hashes, parent_block_hash, token_ids, block_size, lora_id"""
FIELDS_V0_10: Final = 6
"""+ medium"""
FIELDS_V0_13: Final = 7
"""+ lora_name"""
FIELDS_2026_EXTRA_KEYS: Final = 8
FIELDS_2026_GROUP: Final = 9
FIELDS_2026: Final = 11
"""+ extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window"""
FIELDS_ERAS: Final = (
    FIELDS_V0_9_0,
    FIELDS_V0_10,
    FIELDS_V0_13,
    FIELDS_2026_EXTRA_KEYS,
    FIELDS_2026_GROUP,
    FIELDS_2026,
)


def wire_hash(h: int, fmt: HashFormat) -> int | bytes:
    """A u64 block hash as an engine would put it on the wire.

    ``u64``: vLLM int mode. ``i64``: SGLang's signed reinterpretation. ``bytes``: a 32-byte
    sha256-sized digest whose last 8 bytes big-endian are ``h`` (vLLM with int hashes off);
    the first 24 bytes are derived from ``h`` so a decoder folding the wrong end fails.
    """
    if fmt == "u64":
        return h
    if fmt == "i64":
        return h - (1 << 64) if h >= 1 << 63 else h
    head = hashlib.blake2b(h.to_bytes(8, "big"), digest_size=24).digest()
    return head + h.to_bytes(8, "big")


def _wire_hashes(hs: Sequence[int], fmt: HashFormat) -> list[int | bytes]:
    return [wire_hash(h, fmt) for h in hs]


def _extra(ev: BlockStored) -> list[Any] | None:
    return None if ev.extra_keys is None else list(ev.extra_keys)


def encode_event(
    ev: KVEvent,
    *,
    encoding: Encoding = "positional",
    hash_format: HashFormat = "u64",
    fields: int = FIELDS_2026,
) -> list[Any] | dict[str, Any]:
    """One event as msgpack-ready data. ``fields``: positional era (one of ``FIELDS_ERAS``).

    Raises ValueError if the event holds a value the chosen era has no field for.
    """
    if isinstance(ev, AllBlocksCleared):
        return ["AllBlocksCleared"] if encoding == "positional" else {"type": "AllBlocksCleared"}
    if isinstance(ev, BlockRemoved):
        hashes = _wire_hashes(ev.block_hashes, hash_format)
        if encoding == "map":
            m: dict[str, Any] = {
                "type": "BlockRemoved",
                "block_hashes": hashes,
                "medium": ev.medium,
            }
            if ev.group_idx is not None:
                m["group_idx"] = ev.group_idx
            return m
        arr: list[Any] = ["BlockRemoved", hashes]
        if fields >= FIELDS_V0_10:
            arr.append(ev.medium)
        elif ev.medium is not None:
            raise ValueError("medium needs fields >= FIELDS_V0_10")
        if fields >= FIELDS_2026_GROUP:
            arr.append(ev.group_idx)
        elif ev.group_idx is not None:
            raise ValueError("group_idx needs fields >= FIELDS_2026_GROUP")
        return arr
    parent = None if ev.parent_hash is None else wire_hash(ev.parent_hash, hash_format)
    hashes = _wire_hashes(ev.block_hashes, hash_format)
    tokens = ev.token_ids.tolist()
    if encoding == "map":
        m = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
        }
        optional = {
            "extra_keys": _extra(ev),
            "group_idx": ev.group_idx,
            "kv_cache_spec_kind": ev.kv_cache_spec_kind,
            "cache_salt": ev.cache_salt,
        }
        m.update((k, v) for k, v in optional.items() if v is not None)
        return m
    values: list[Any] = [
        hashes,
        parent,
        tokens,
        ev.block_size,
        ev.lora_id,
        ev.medium,
        ev.lora_name,
        _extra(ev),
        ev.group_idx,
        ev.kv_cache_spec_kind,
        None,  # kv_cache_spec_sliding_window: not carried by BlockStored
    ]
    if any(v is not None for v in values[fields:]):
        raise ValueError(f"event has values beyond the first {fields} positional fields")
    arr = ["BlockStored", *values[:fields]]
    if ev.cache_salt is not None:
        arr.append({"cache_salt": ev.cache_salt})  # SGLang's salted-event extension element
    return arr


def encode_batch(
    events: Sequence[KVEvent],
    *,
    ts: float | None = None,
    dp_rank: int | None = 0,
    encoding: Encoding = "positional",
    hash_format: HashFormat = "u64",
    fields: int = FIELDS_2026,
    envelope: Envelope = "array",
) -> bytes:
    """A whole payload frame. ``dp_rank=None`` with the array envelope gives v0.9.0's
    two-element batch."""
    evs = [
        encode_event(e, encoding=encoding, hash_format=hash_format, fields=fields) for e in events
    ]
    when = time.time() if ts is None else ts
    outer: Any
    if envelope == "map":
        outer = {"ts": when, "events": evs, "data_parallel_rank": dp_rank}
    elif dp_rank is None:
        outer = [when, evs]
    else:
        outer = [when, evs, dp_rank]
    packed: bytes = msgpack.packb(outer, use_bin_type=True)
    return packed
