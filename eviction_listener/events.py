"""Decode one vLLM / SGLang KV-cache event payload (msgpack) into typed events.

Wire format: ../shared/specs/kv-events.md. What this module accepts:

* Outer batch: ``[ts, events]`` (vLLM v0.9.0), ``[ts, events, dp_rank]`` (later; longer arrays
  tolerated) or a map ``{"ts", "events", "data_parallel_rank"}`` (one main-branch variant).
* Events, each independently: positional ``[tag, f1, f2, ...]`` of any version's length (vLLM
  v0.9.0's 6 elements through 2026's 12+; missing trailing fields default to None, extra ones
  are ignored) or a tagged map ``{"type": tag, field: value}`` with default fields omitted and
  unknown fields ignored. A map element inside a positional event (SGLang's salted events
  append ``{"cache_salt": ...}``) is read by name instead of by position.
* Hashes: a msgpack int (u64 as vLLM sends, or a negative i64 as SGLang sends, reinterpreted
  as u64) or bytes (the raw digest; folded to its last 8 bytes big-endian, left-padded when
  shorter, which is exactly what vLLM's int mode sends). Always a u64 ``int`` after decoding.
* Unknown tags: skipped and counted in ``EventBatch.skipped``; the rest of the batch is kept.

Validation is all-or-nothing per payload: anything else malformed raises
``EventDecodeError`` whose ``kind`` is one of ``ERROR_KINDS`` (a stable metric label). A
partly valid batch is never returned, because applying half of an engine step and silently
dropping the rest would leave the index confidently wrong; the transport treats an
undecodable payload like a lost message (see zmq_source).

Token ids and block sizes:

* ``len(token_ids)`` must equal ``len(block_hashes) * block_size`` (vLLM's invariant) or be 0
  (tokenless stores, e.g. vLLM's CPU-offload ``BlockStored(medium="CPU")`` that carries only
  hashes). Anything else is a ``token_count`` error.
* SGLang sends one ``BlockStored`` per page with ``block_size = len(page_tokens)``, so a
  partial last page of a radix node arrives as a valid one-block event whose ``block_size``
  is smaller than the engine's page size. The decoder cannot tell it apart from a smaller
  engine block size (it does not know the engine's configuration) and does not try: it
  passes ``block_size`` through unchanged. The applier, which knows the configured size,
  must treat ``block_size`` smaller than it as a partial page (not a full block: never index
  it, never chain through it) and larger or unequal sizes per its own mismatch policy.
* ``token_ids`` is an ``array('I')``: 4 bytes per token, range-checked (0 <= id < 2**32) in C
  by the array constructor, and directly usable as a buffer by the xxh3 block hasher. Treat
  it as read-only. One leniency follows from checking in C: a msgpack ``true``/``false`` in a
  token or hash list is taken as 1/0.

Limits (module constants, all inclusive) bound memory and CPU per payload: payload bytes,
events per batch, hashes per event, tokens per event. Exceeding one is ``too_large``.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

U64_MASK: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)

MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024
"""Largest payload decoded. vLLM batches are one scheduler step: kilobytes, rarely a few MB."""
MAX_EVENTS_PER_BATCH: Final = 65_536
MAX_HASHES_PER_EVENT: Final = 131_072
"""2M tokens at block size 16: a whole 1M-token context re-announced still fits."""
MAX_TOKENS_PER_EVENT: Final = 2_097_152
MAX_HASH_BYTES: Final = 64
"""Longest bytes hash accepted (sha512); vLLM sends 32 (sha256*) or 16 (xxhash*)."""
MAX_DP_RANK: Final = 65_535
MAX_STR_BYTES: Final = 65_536
"""Longest msgpack string (tags, LoRA names, salts, media)."""
MAX_MAP_ENTRIES: Final = 4096
"""Largest msgpack map (an event map has about 15 fields)."""
MAX_EXTRA_KEY_DEPTH: Final = 8
"""Nesting depth of one block's extra_keys entry; vLLM uses 2 (tuple of (mm_id, offset))."""

ERROR_KINDS: Final = ("msgpack", "shape", "type", "value", "hash", "too_large", "token_count")
"""Every ``EventDecodeError.kind``: stable, low-cardinality Prometheus label values."""

# Token ids are u32; "I" is 4 bytes on every platform CPython supports in practice, "L" is the
# fallback that still holds 32 bits where it is not.
_TOKEN_TYPECODE: Final = "I" if array("I").itemsize == 4 else "L"


class EventDecodeError(ValueError):
    """A payload that cannot be decoded; ``kind`` is one of ``ERROR_KINDS``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks became resident (full and hashed) on an engine.

    ``block_hashes`` are consecutive blocks of one request; ``parent_hash`` is the block just
    before the first one (None at the start of a sequence). ``token_ids`` holds all their
    tokens, ``block_size`` per block, or is empty for a tokenless store.
    """

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    # compare but do not hash: arrays are unhashable, and equal events still hash equal.
    token_ids: array[int] = field(hash=False)
    block_size: int
    lora_name: str | None = None
    lora_id: int | None = None
    medium: str | None = None
    group_idx: int | None = None
    extra_keys: tuple[Any, ...] | None = field(default=None, hash=False)
    """One entry per block (None, or that block's extra hash keys as nested tuples)."""
    kv_cache_spec_kind: str | None = None
    """e.g. "full_attention" or "sliding_window" (hybrid models); None from older engines."""
    cache_salt: str | None = None
    """SGLang's salt for the block chain; vLLM folds its salt into extra_keys instead."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks were evicted from the engine's cache (one Removed per physical copy)."""

    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped every cached block (prefix-cache reset)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One engine step's events, in occurrence order."""

    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None
    skipped: int = 0
    """Events with an unknown tag, left out of ``events``."""


def decode_batch(payload: bytes | bytearray | memoryview) -> EventBatch:
    """Decode one ZMQ payload frame. Raises only ``EventDecodeError``."""
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise EventDecodeError("too_large", f"payload of {size} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            # A declared length is allocated before it is read, so bound it by what the
            # payload could possibly hold as well as by our own caps.
            max_array_len=min(size, MAX_TOKENS_PER_EVENT),
            max_map_len=min(size, MAX_MAP_ENTRIES),
            max_str_len=min(size, MAX_STR_BYTES),
            max_bin_len=min(size, MAX_STR_BYTES),
            max_ext_len=min(size, MAX_STR_BYTES),
        )
    except Exception as exc:  # msgpack raises a zoo of types on hostile input; map them all
        kind = "too_large" if "exceeds max_" in str(exc) else "msgpack"
        raise EventDecodeError(kind, f"{type(exc).__name__}: {exc}") from None
    return batch_from_obj(obj)


def batch_from_obj(obj: object) -> EventBatch:
    """Decode an already unpacked batch (what ``msgpack.unpackb(payload, raw=False)`` gives)."""
    if type(obj) is list:
        if len(obj) < 2:
            raise EventDecodeError("shape", f"batch array of {len(obj)} elements, need >= 2")
        ts, events, rank = obj[0], obj[1], obj[2] if len(obj) > 2 else None
    elif type(obj) is dict:
        if "ts" not in obj or "events" not in obj:
            raise EventDecodeError("shape", "batch map without ts or events")
        ts, events, rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
    else:
        raise EventDecodeError("type", f"batch is {type(obj).__name__}, not array or map")

    if type(ts) is not float and type(ts) is not int:
        raise EventDecodeError("type", f"ts is {type(ts).__name__}")
    if type(events) is not list:
        raise EventDecodeError("type", f"events is {type(events).__name__}, not array")
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise EventDecodeError("too_large", f"{len(events)} events > {MAX_EVENTS_PER_BATCH}")
    if rank is not None:
        if type(rank) is not int:
            raise EventDecodeError("type", f"data_parallel_rank is {type(rank).__name__}")
        if not 0 <= rank <= MAX_DP_RANK:
            raise EventDecodeError("value", f"data_parallel_rank {rank} out of range")

    out: list[KVEvent] = []
    skipped = 0
    for ev in events:
        decoded = decode_event(ev)
        if decoded is None:
            skipped += 1
        else:
            out.append(decoded)
    return EventBatch(float(ts), tuple(out), rank, skipped)


def decode_event(ev: object) -> KVEvent | None:
    """One unpacked event (array or tagged map); None for an unknown tag."""
    if type(ev) is list:
        if not ev:
            raise EventDecodeError("shape", "empty event array")
        tag = ev[0]
        if type(tag) is not str:
            raise EventDecodeError("type", f"event tag is {type(tag).__name__}")
        from_array = _FROM_ARRAY.get(tag)
        return None if from_array is None else from_array(ev)
    if type(ev) is dict:
        tag = ev.get("type")
        if type(tag) is not str:
            raise EventDecodeError("type", f"event map type is {type(tag).__name__}")
        from_map = _FROM_MAP.get(tag)
        return None if from_map is None else from_map(ev)
    raise EventDecodeError("type", f"event is {type(ev).__name__}, not array or map")


def fold_hash(h: object) -> int:
    """An engine block hash as u64: u64 as is, i64 reinterpreted, bytes' last 8 bytes BE."""
    if type(h) is int:
        if 0 <= h <= U64_MASK:
            return h
        if _I64_MIN <= h < 0:
            return h & U64_MASK
        raise EventDecodeError("hash", f"integer hash {h} is neither u64 nor i64")
    if type(h) is bytes:
        if not 0 < len(h) <= MAX_HASH_BYTES:
            raise EventDecodeError("hash", f"bytes hash of length {len(h)}")
        # from_bytes of fewer than 8 bytes is the left-padded value.
        return int.from_bytes(h[-8:], "big")
    raise EventDecodeError("type", f"hash is {type(h).__name__}")


# ---------------------------------------------------------------------------------------------
# field readers


def _hashes(v: object) -> tuple[int, ...]:
    if type(v) is not list:
        raise EventDecodeError("type", f"block_hashes is {type(v).__name__}, not array")
    if len(v) > MAX_HASHES_PER_EVENT:
        raise EventDecodeError("too_large", f"{len(v)} hashes > {MAX_HASHES_PER_EVENT}")
    try:
        # Fast path, checked in C: every element already an int in u64 range (vLLM int mode).
        array("Q", v)
    except (OverflowError, TypeError):
        return tuple([fold_hash(h) for h in v])
    return tuple(v)


def _tokens(v: object) -> array[int]:
    if type(v) is not list:
        raise EventDecodeError("type", f"token_ids is {type(v).__name__}, not array")
    if len(v) > MAX_TOKENS_PER_EVENT:
        raise EventDecodeError("too_large", f"{len(v)} tokens > {MAX_TOKENS_PER_EVENT}")
    try:
        return array(_TOKEN_TYPECODE, v)
    except OverflowError:
        raise EventDecodeError("value", "token id outside [0, 2**32)") from None
    except TypeError as exc:
        raise EventDecodeError("type", f"token id: {exc}") from None


def _freeze(v: object, depth: int) -> object:
    """One extra_keys entry with lists turned into tuples; only scalar leaves allowed."""
    if v is None or type(v) in (str, int, bytes, float, bool):
        return v
    if type(v) is list:
        if depth >= MAX_EXTRA_KEY_DEPTH:
            raise EventDecodeError("shape", "extra_keys nested too deep")
        return tuple([_freeze(x, depth + 1) for x in v])
    raise EventDecodeError("type", f"extra_keys element is {type(v).__name__}")


def _extra_keys(v: object, n_blocks: int) -> tuple[Any, ...] | None:
    if v is None:
        return None
    if type(v) is not list:
        raise EventDecodeError("type", f"extra_keys is {type(v).__name__}, not array")
    if len(v) != n_blocks:
        raise EventDecodeError("shape", f"{len(v)} extra_keys for {n_blocks} blocks")
    if v.count(None) == len(v):  # the common plain-text case, without a per-block loop
        return tuple(v)
    return tuple([_freeze(x, 0) for x in v])


def _type_error(name: str, v: object) -> EventDecodeError:
    return EventDecodeError("type", f"{name} is {type(v).__name__}")


def _stored(
    hashes_v: object,
    parent_v: object,
    tokens_v: object,
    block_size: object,
    lora_id: object = None,
    medium: object = None,
    lora_name: object = None,
    extra_keys: object = None,
    group_idx: object = None,
    spec_kind: object = None,
    cache_salt: object = None,
) -> BlockStored:
    # The optional-field checks are written out rather than delegated to helpers: this runs
    # once per BlockStored and call overhead was a measurable share of decode time.
    hashes = _hashes(hashes_v)
    tokens = _tokens(tokens_v)
    if type(block_size) is not int:
        raise _type_error("block_size", block_size)
    if not 0 < block_size <= MAX_TOKENS_PER_EVENT:
        raise EventDecodeError("value", f"block_size {block_size} out of range")
    if tokens and len(tokens) != len(hashes) * block_size:
        raise EventDecodeError(
            "token_count",
            f"{len(tokens)} tokens for {len(hashes)} blocks of {block_size}",
        )
    parent = None if parent_v is None else fold_hash(parent_v)
    if lora_id is not None and type(lora_id) is not int:
        raise _type_error("lora_id", lora_id)
    if medium is not None and type(medium) is not str:
        raise _type_error("medium", medium)
    if lora_name is not None and type(lora_name) is not str:
        raise _type_error("lora_name", lora_name)
    if spec_kind is not None and type(spec_kind) is not str:
        raise _type_error("kv_cache_spec_kind", spec_kind)
    if cache_salt is not None and type(cache_salt) is not str:
        raise _type_error("cache_salt", cache_salt)
    if group_idx is not None:
        if type(group_idx) is not int:
            raise _type_error("group_idx", group_idx)
        if not 0 <= group_idx <= U64_MASK:
            raise EventDecodeError("value", f"group_idx {group_idx} out of range")
    return BlockStored(
        hashes,
        parent,
        tokens,
        block_size,
        lora_name,
        lora_id,
        medium,
        group_idx,
        None if extra_keys is None else _extra_keys(extra_keys, len(hashes)),
        spec_kind,
        cache_salt,
    )


# BlockStored positions after the tag: 1 block_hashes, 2 parent_block_hash, 3 token_ids,
# 4 block_size, 5 lora_id, 6 medium, 7 lora_name, 8 extra_keys, 9 group_idx,
# 10 kv_cache_spec_kind; 11 onwards are fields this decoder does not use.
_STORED_MIN_LEN: Final = 5
_STORED_OPT_END: Final = 11


def _stored_from_array(ev: list[Any]) -> BlockStored:
    n = len(ev)
    if n < _STORED_MIN_LEN:
        raise EventDecodeError("shape", f"BlockStored array of {n} elements")
    # An older engine sends fewer fields: absent trailing ones are None.
    opt = ev[5:] + [None] * (_STORED_OPT_END - n) if n < _STORED_OPT_END else ev[5:_STORED_OPT_END]
    salt: object = None
    if n > _STORED_MIN_LEN and type(ev[-1]) is dict:
        # SGLang's salted events append an extension map after the positional fields: read
        # it by name; the slot it occupies is not a positional field.
        salt = ev[-1].get("cache_salt")
        if n <= _STORED_OPT_END:
            opt[n - 6] = None
    return _stored(ev[1], ev[2], ev[3], ev[4], opt[0], opt[1], opt[2], opt[3], opt[4], opt[5], salt)


def _stored_from_map(ev: dict[str, Any]) -> BlockStored:
    try:
        hashes, tokens, block_size = ev["block_hashes"], ev["token_ids"], ev["block_size"]
    except KeyError as exc:
        raise EventDecodeError("shape", f"BlockStored map without {exc}") from None
    get = ev.get
    return _stored(
        hashes,
        get("parent_block_hash"),
        tokens,
        block_size,
        get("lora_id"),
        get("medium"),
        get("lora_name"),
        get("extra_keys"),
        get("group_idx"),
        get("kv_cache_spec_kind"),
        get("cache_salt"),
    )


def _removed(hashes: object, medium: object, group_idx: object) -> BlockRemoved:
    if medium is not None and type(medium) is not str:
        raise _type_error("medium", medium)
    if group_idx is not None:
        if type(group_idx) is not int:
            raise _type_error("group_idx", group_idx)
        if not 0 <= group_idx <= U64_MASK:
            raise EventDecodeError("value", f"group_idx {group_idx} out of range")
    return BlockRemoved(_hashes(hashes), medium, group_idx)


def _removed_from_array(ev: list[Any]) -> BlockRemoved:
    # positions: 1 block_hashes, 2 medium, 3 group_idx, then map-era fields
    n = len(ev)
    if n < 2:
        raise EventDecodeError("shape", "BlockRemoved array without block_hashes")
    medium = ev[2] if n > 2 and type(ev[2]) is not dict else None
    group_idx = ev[3] if n > 3 and type(ev[3]) is not dict else None
    return _removed(ev[1], medium, group_idx)


def _removed_from_map(ev: dict[str, Any]) -> BlockRemoved:
    if "block_hashes" not in ev:
        raise EventDecodeError("shape", "BlockRemoved map without block_hashes")
    return _removed(ev["block_hashes"], ev.get("medium"), ev.get("group_idx"))


_CLEARED: Final = AllBlocksCleared()


def _cleared(_ev: object) -> AllBlocksCleared:
    return _CLEARED


_FROM_ARRAY: Final[dict[str, Callable[[list[Any]], KVEvent]]] = {
    "BlockStored": _stored_from_array,
    "BlockRemoved": _removed_from_array,
    "AllBlocksCleared": _cleared,
}
_FROM_MAP: Final[dict[str, Callable[[dict[str, Any]], KVEvent]]] = {
    "BlockStored": _stored_from_map,
    "BlockRemoved": _removed_from_map,
    "AllBlocksCleared": _cleared,
}
