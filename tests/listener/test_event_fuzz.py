"""Property tests: the decoder never fails with anything but EventDecodeError, and every valid
batch survives encoding in either format, any positional era and any hash form."""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any

import msgpack
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from eviction_listener.events import (
    ERROR_KINDS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    KVEvent,
    decode_batch,
)
from kvrouter.bench.vllm_wire import (
    FIELDS_2026_EXTRA_KEYS,
    FIELDS_2026_GROUP,
    FIELDS_ERAS,
    FIELDS_V0_10,
    FIELDS_V0_13,
    encode_batch,
)

U64 = st.integers(0, (1 << 64) - 1)
MSGPACK_INT = st.integers(-(1 << 63), (1 << 64) - 1)
SHORT_STR = st.text(max_size=12)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | MSGPACK_INT
    | st.floats(allow_nan=False)
    | SHORT_STR
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(SHORT_STR, children, max_size=6)
    ),
    max_leaves=40,
)


def check_decode(payload: bytes) -> None:
    try:
        decode_batch(payload)
    except EventDecodeError as exc:
        assert exc.kind in ERROR_KINDS


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(payload: bytes) -> None:
    check_decode(payload)


@settings(max_examples=500)
@given(msgpack_values)
def test_arbitrary_structures(obj: object) -> None:
    check_decode(msgpack.packb(obj, use_bin_type=True))


@st.composite
def event_shaped(draw: st.DrawFn) -> object:
    """Structures near the real shapes, so the fuzzer reaches the field validators."""
    tag = draw(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"]))
    fields = draw(st.lists(msgpack_values | st.lists(MSGPACK_INT, max_size=40), max_size=14))
    if draw(st.booleans()):
        return [tag, *fields]
    names = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"]
    names += ["medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"]
    names += ["cache_salt", "whatever"]
    return {"type": tag, **dict(zip(names, fields, strict=False))}


@settings(max_examples=500)
@given(
    st.lists(event_shaped(), max_size=4),
    st.one_of(st.none(), MSGPACK_INT, SHORT_STR),
    st.booleans(),
)
def test_event_shaped_structures(events: list[object], rank: object, as_map: bool) -> None:
    outer: object = {"ts": 1.0, "events": events, "data_parallel_rank": rank}
    if not as_map:
        outer = [1.0, events, rank]
    check_decode(msgpack.packb(outer, use_bin_type=True))


# -- round trip ---------------------------------------------------------------------------------

extra_entry = st.none() | st.lists(
    SHORT_STR | st.integers(-1000, 1000) | st.tuples(SHORT_STR, st.integers(-64, 64)),
    min_size=1,
    max_size=3,
).map(tuple)


@st.composite
def block_stored(draw: st.DrawFn) -> BlockStored:
    n = draw(st.integers(0, 4))
    block_size = draw(st.integers(1, 32))
    hashes = tuple(draw(st.lists(U64, min_size=n, max_size=n)))
    if draw(st.booleans()):
        count = n * block_size
        token = st.integers(0, (1 << 32) - 1)
        tokens = array("I", draw(st.lists(token, min_size=count, max_size=count)))
    else:
        tokens = array("I")
    extra = draw(st.none() | st.lists(extra_entry, min_size=n, max_size=n).map(tuple))
    return BlockStored(
        hashes,
        draw(st.none() | U64),
        tokens,
        block_size,
        lora_name=draw(st.none() | SHORT_STR),
        lora_id=draw(st.none() | st.integers(0, 1 << 31)),
        medium=draw(st.none() | st.sampled_from(["GPU", "CPU", "DISK"])),
        group_idx=draw(st.none() | st.integers(0, 8)),
        extra_keys=extra,
        kv_cache_spec_kind=draw(st.none() | st.sampled_from(["full_attention", "sliding_window"])),
        cache_salt=draw(st.none() | SHORT_STR),
    )


@st.composite
def block_removed(draw: st.DrawFn) -> BlockRemoved:
    return BlockRemoved(
        tuple(draw(st.lists(U64, max_size=5))),
        draw(st.none() | st.sampled_from(["GPU", "CPU"])),
        draw(st.none() | st.integers(0, 8)),
    )


any_event = block_stored() | block_removed() | st.just(AllBlocksCleared())


def fit_era(ev: KVEvent, fields: int) -> KVEvent:
    """What an engine of that positional era could have said: newer fields absent."""
    if isinstance(ev, BlockStored):
        return dataclasses.replace(
            ev,
            medium=ev.medium if fields >= FIELDS_V0_10 else None,
            lora_name=ev.lora_name if fields >= FIELDS_V0_13 else None,
            extra_keys=ev.extra_keys if fields >= FIELDS_2026_EXTRA_KEYS else None,
            group_idx=ev.group_idx if fields >= FIELDS_2026_GROUP else None,
            kv_cache_spec_kind=ev.kv_cache_spec_kind if fields > FIELDS_2026_GROUP else None,
        )
    if isinstance(ev, BlockRemoved):
        return dataclasses.replace(
            ev,
            medium=ev.medium if fields >= FIELDS_V0_10 else None,
            group_idx=ev.group_idx if fields >= FIELDS_2026_GROUP else None,
        )
    return ev


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(any_event, max_size=6),
    encoding=st.sampled_from(["positional", "map"]),
    hash_format=st.sampled_from(["u64", "bytes", "i64"]),
    fields=st.sampled_from(FIELDS_ERAS),
    envelope=st.sampled_from(["array", "map"]),
    dp_rank=st.none() | st.integers(0, 7),
    ts=st.floats(0, 4e9),
)
def test_round_trip(
    events: list[KVEvent],
    encoding: Any,
    hash_format: Any,
    fields: int,
    envelope: Any,
    dp_rank: int | None,
    ts: float,
) -> None:
    if encoding == "positional":
        events = [fit_era(e, fields) for e in events]
    payload = encode_batch(
        events,
        ts=ts,
        dp_rank=dp_rank,
        encoding=encoding,
        hash_format=hash_format,
        fields=fields,
        envelope=envelope,
    )
    batch = decode_batch(payload)
    assert batch.events == tuple(events)
    assert batch.ts == ts
    assert batch.dp_rank == dp_rank
    assert batch.skipped == 0


@given(st.lists(any_event, min_size=1, max_size=4), st.integers(0, 3))
def test_mixed_encodings_in_one_batch(events: list[KVEvent], split: int) -> None:
    assume(split <= len(events))
    as_array = msgpack.unpackb(encode_batch(events[:split]), raw=False)[1]
    as_map = msgpack.unpackb(encode_batch(events[split:], encoding="map"), raw=False)[1]
    payload = msgpack.packb([0.0, as_array + as_map, 0], use_bin_type=True)
    assert decode_batch(payload).events == tuple(events)
