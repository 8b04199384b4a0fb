"""Decoder cases pinned to the wire spec (../shared/specs/kv-events.md 1.2-1.4, 4.1)."""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any

import msgpack
import pytest

from eviction_listener.events import (
    ERROR_KINDS,
    MAX_EVENTS_PER_BATCH,
    MAX_EXTRA_KEY_DEPTH,
    MAX_HASHES_PER_EVENT,
    MAX_PAYLOAD_BYTES,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    decode_batch,
    fold_hash,
)

H0 = 17705339885301241772  # 0xf5b600d19aef97ac, block 0 of the llm-d Qwen3 capture
H1 = 13360521540053240825  # 0xb96a1b8db8d40bf9, block 1
TOKENS = [
    2082, 1113, 2142, 374, 264, 4948, 19128, 323, 7203, 429, 374, 66351, 938, 315, 11198, 323,
    59415, 678, 90505, 11, 54263, 533, 7586, 315, 28922, 13, 1527, 1113, 2142, 6738, 369, 279,
]  # fmt: skip
TS = 1760000000.5

# Spec 1.4, positional era with all 11 BlockStored fields.
POSITIONAL_EXAMPLE: list[Any] = [
    TS,
    [
        [
            "BlockStored", [H0, H1], None, TOKENS, 16, None, "GPU", None, [None, None], 0,
            "full_attention", None,
        ],
        ["BlockRemoved", [H1], "GPU", 0],
        ["AllBlocksCleared"],
    ],
    0,
]  # fmt: skip

# Spec 1.4, map era (vllm#42892): defaults omitted, required-but-None fields present as nil.
MAP_EXAMPLE: list[Any] = [
    TS,
    [
        {
            "type": "BlockStored", "block_hashes": [H0, H1], "parent_block_hash": None,
            "token_ids": TOKENS, "block_size": 16, "lora_id": None, "medium": "GPU",
            "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        },
        {"type": "BlockRemoved", "block_hashes": [H1], "medium": "GPU", "group_idx": 0},
        {"type": "AllBlocksCleared"},
    ],
    0,
]  # fmt: skip

EXPECTED_EVENTS = (
    BlockStored(
        (H0, H1),
        None,
        array("I", TOKENS),
        16,
        medium="GPU",
        group_idx=0,
        extra_keys=(None, None),
        kv_cache_spec_kind="full_attention",
    ),
    BlockRemoved((H1,), "GPU", 0),
    AllBlocksCleared(),
)


def pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def test_positional_example_matches_spec_bytes_and_decodes() -> None:
    payload = pack(POSITIONAL_EXAMPLE)
    # The raw bytes the spec quotes: 3-element batch, float64 ts, 3 events, 12-element
    # BlockStored array, fixstr tag, 2 hashes as uint64.
    expected_prefix = (
        "93" "cb41da39de00200000" "93" "9c" "ab" + b"BlockStored".hex() + "92"
        "cff5b600d19aef97ac" "cfb96a"
    )  # fmt: skip
    assert payload.hex().startswith(expected_prefix)
    batch = decode_batch(payload)
    assert batch.ts == TS
    assert batch.dp_rank == 0
    assert batch.skipped == 0
    assert batch.events == EXPECTED_EVENTS


def test_map_example_decodes_to_the_same_events() -> None:
    assert decode_batch(pack(MAP_EXAMPLE)).events == EXPECTED_EVENTS


def test_v0_9_0_two_element_batch_and_six_element_event() -> None:
    payload = pack([TS, [["BlockStored", [H0], None, TOKENS[:16], 16, None]]])
    batch = decode_batch(payload)
    assert batch.dp_rank is None
    (ev,) = batch.events
    assert ev == BlockStored((H0,), None, array("I", TOKENS[:16]), 16)


def test_outer_map_envelope() -> None:
    payload = pack({"ts": TS, "events": POSITIONAL_EXAMPLE[1], "data_parallel_rank": 3})
    batch = decode_batch(payload)
    assert batch.dp_rank == 3
    assert batch.events == EXPECTED_EVENTS


def test_longer_arrays_and_unknown_map_fields_are_tolerated() -> None:
    stored = [*POSITIONAL_EXAMPLE[1][0], "LOCAL", "owner", "session"]  # future fields
    removed = ["BlockRemoved", [H1], "GPU", 0, "LOCAL", "owner"]
    mapped = dict(MAP_EXAMPLE[1][0], locality="LOCAL", session_id="s")
    batch = decode_batch(pack([TS, [stored, removed, mapped], 0, "future-envelope-field"]))
    assert batch.events == (EXPECTED_EVENTS[0], EXPECTED_EVENTS[1], EXPECTED_EVENTS[0])


def test_unknown_tags_are_skipped_and_counted() -> None:
    events = [["BlockMoved", [1]], {"type": "Foo", "x": 1}, ["AllBlocksCleared"]]
    batch = decode_batch(pack([TS, events, 0]))
    assert batch.events == (AllBlocksCleared(),)
    assert batch.skipped == 2


def test_bytes_hashes_fold_to_last_8_bytes_big_endian() -> None:
    digest = bytes.fromhex("5407663a080a249d" + "11" * 16 + "b96a1b8db8d40bf9")  # sha256-sized
    xx = bytes.fromhex("0123456789abcdef" + "f5b600d19aef97ac")  # xxhash-sized (16 bytes)
    payload = pack([TS, [["BlockStored", [xx, digest], b"\x01\x02", TOKENS, 16, None]], 0])
    (ev,) = decode_batch(payload).events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == (H0, H1)
    assert ev.parent_hash == 0x0102  # shorter than 8 bytes: left-padded
    removed = decode_batch(pack([TS, [["BlockRemoved", [digest], "GPU"]], 0])).events[0]
    assert removed == BlockRemoved((H1,), "GPU")


def test_negative_i64_hashes_are_reinterpreted_as_u64() -> None:
    signed = H0 - (1 << 64)  # SGLang's hash_str_to_int64 sends a signed int64
    (ev,) = decode_batch(pack([TS, [["BlockStored", [signed], -1, TOKENS[:16], 16, None]]])).events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == (H0,)
    assert ev.parent_hash == (1 << 64) - 1


def test_fold_hash_edges() -> None:
    assert fold_hash(0) == 0
    assert fold_hash((1 << 64) - 1) == (1 << 64) - 1
    assert fold_hash(-(1 << 63)) == 1 << 63
    assert fold_hash(b"\xff" * 9) == (1 << 64) - 1
    for bad in (1 << 64, -(1 << 63) - 1, b"", b"x" * 65):
        with pytest.raises(EventDecodeError) as err:
            fold_hash(bad)
        assert err.value.kind == "hash"
    with pytest.raises(EventDecodeError) as err:
        fold_hash(1.5)
    assert err.value.kind == "type"


def test_sglang_page_events_salt_extension_and_partial_page() -> None:
    page1, page2 = TOKENS[:16], TOKENS[16:21]  # the radix node's last page is partial (5)
    events = [
        ["BlockStored", [H0 - (1 << 64)], None, page1, 16, None, "GPU", {"cache_salt": "s1"}],
        ["BlockStored", [12345], H0 - (1 << 64), page2, 5, None, "GPU", {"cache_salt": "s1"}],
        ["BlockRemoved", [12345], "GPU"],
    ]
    batch = decode_batch(pack([TS, events, 1]))
    first, partial, removed = batch.events
    assert first == BlockStored((H0,), None, array("I", page1), 16, medium="GPU", cache_salt="s1")
    # Passed through with its own block_size; the applier decides what a short page means.
    assert partial == BlockStored((12345,), H0, array("I", page2), 5, medium="GPU", cache_salt="s1")
    assert removed == BlockRemoved((12345,), "GPU")
    assert batch.dp_rank == 1


def test_sglang_map_era_cache_salt_field() -> None:
    ev = {
        "type": "BlockStored",
        "block_hashes": [7],
        "parent_block_hash": None,
        "token_ids": TOKENS[:4],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "cache_salt": "tenant-a",
        "session_id": "abc",
        "lora_name": "Alice",
    }
    (got,) = decode_batch(pack([TS, [ev], 0])).events
    assert got == BlockStored(
        (7,), None, array("I", TOKENS[:4]), 4, "Alice", medium="GPU", cache_salt="tenant-a"
    )


def test_tokenless_store_is_accepted() -> None:
    # vLLM's CPU offload announces blocks by hash only.
    (ev,) = decode_batch(pack([TS, [["BlockStored", [H0, H1], None, [], 16, None, "CPU"]]])).events
    assert isinstance(ev, BlockStored)
    assert len(ev.token_ids) == 0
    assert ev.medium == "CPU"


def test_extra_keys_become_nested_tuples() -> None:
    extra = [["Alice", ["mm-1", -3]], None]
    raw = ["BlockStored", [H0, H1], None, TOKENS, 16, None, "GPU", "Alice", extra, 0]
    (ev,) = decode_batch(pack([TS, [raw], 0])).events
    assert isinstance(ev, BlockStored)
    assert ev.extra_keys == (("Alice", ("mm-1", -3)), None)
    assert ev.lora_name == "Alice"
    hash(ev)  # hashable although token_ids is an array and extra_keys is nested


def test_events_are_frozen_and_slotted() -> None:
    ev = decode_batch(pack(POSITIONAL_EXAMPLE)).events[0]
    assert isinstance(ev, BlockStored)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.block_size = 32  # type: ignore[misc]
    assert not hasattr(ev, "__dict__")
    assert hash(ev) == hash(EXPECTED_EVENTS[0])


def stored(**over: Any) -> list[Any]:
    fields = {
        "hashes": [H0],
        "parent": None,
        "tokens": TOKENS[:16],
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": None,
        "group_idx": None,
    }
    fields.update(over)
    return ["BlockStored", *fields.values()]


def deep(n: int) -> object:
    v: object = "leaf"
    for _ in range(n):
        v = [v]
    return v


BAD_OBJECTS: list[tuple[str, object, str]] = [
    ("batch not array or map", 5, "type"),
    ("batch too short", [TS], "shape"),
    ("batch map without events", {"ts": TS}, "shape"),
    ("ts not a number", ["x", []], "type"),
    ("events not an array", [TS, {}], "type"),
    ("rank not an int", [TS, [], "r"], "type"),
    ("rank negative", [TS, [], -1], "value"),
    ("event scalar", [TS, [5]], "type"),
    ("event empty array", [TS, [[]]], "shape"),
    ("tag not a string", [TS, [[5, [1]]]], "type"),
    ("map tag missing", [TS, [{"block_hashes": [1]}]], "type"),
    ("stored too short", [TS, [["BlockStored", [1], None, []]]], "shape"),
    ("stored map without tokens", [TS, [{"type": "BlockStored", "block_hashes": [1]}]], "shape"),
    ("removed without hashes", [TS, [["BlockRemoved"]]], "shape"),
    ("removed map without hashes", [TS, [{"type": "BlockRemoved"}]], "shape"),
    ("hashes not an array", [TS, [stored(hashes=5)]], "type"),
    ("hash is a float", [TS, [stored(hashes=[1.5])]], "type"),
    ("hash is empty bytes", [TS, [stored(hashes=[b""])]], "hash"),
    ("parent is a string", [TS, [stored(parent="p")]], "type"),
    ("tokens not an array", [TS, [stored(tokens="abc")]], "type"),
    ("token is a string", [TS, [stored(tokens=["a"] * 16)]], "type"),
    ("token negative", [TS, [stored(tokens=[-1] * 16)]], "value"),
    ("token above u32", [TS, [stored(tokens=[1 << 32] * 16)]], "value"),
    ("token count", [TS, [stored(tokens=TOKENS[:15])]], "token_count"),
    ("token count multi", [TS, [stored(hashes=[1, 2], tokens=TOKENS[:16])]], "token_count"),
    ("block size zero", [TS, [stored(tokens=[], block_size=0)]], "value"),
    ("block size string", [TS, [stored(block_size="16")]], "type"),
    ("medium not a string", [TS, [stored(medium=5)]], "type"),
    ("lora_id not an int", [TS, [stored(lora_id="x")]], "type"),
    ("group_idx negative", [TS, [stored(group_idx=-1)]], "value"),
    ("removed medium", [TS, [["BlockRemoved", [1], 7]]], "type"),
    ("extra_keys misaligned", [TS, [stored(extra_keys=[None, None])]], "shape"),
    ("extra_keys not array", [TS, [stored(extra_keys="x")]], "type"),
    ("extra_keys map entry", [TS, [stored(extra_keys=[{"a": 1}])]], "type"),
    ("extra_keys too deep", [TS, [stored(extra_keys=[deep(MAX_EXTRA_KEY_DEPTH + 1)])]], "shape"),
    ("too many events", [TS, [["AllBlocksCleared"]] * (MAX_EVENTS_PER_BATCH + 1)], "too_large"),
    (
        "too many hashes",
        [TS, [stored(hashes=[1] * (MAX_HASHES_PER_EVENT + 1), tokens=[])]],
        "too_large",
    ),
]


@pytest.mark.parametrize(("obj", "kind"), [(o, k) for _, o, k in BAD_OBJECTS],
                         ids=[n for n, _, _ in BAD_OBJECTS])  # fmt: skip
def test_bad_structures_raise_typed_errors(obj: object, kind: str) -> None:
    with pytest.raises(EventDecodeError) as err:
        decode_batch(pack(obj))
    assert err.value.kind == kind
    assert kind in ERROR_KINDS


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),  # reserved byte
        (b"\x90\x90", "msgpack"),  # trailing data
        (b"\x92\xcb", "msgpack"),  # truncated
        (b"\x81\x01\x02", "msgpack"),  # integer map key
        (b"\xa2\xff\xfe", "msgpack"),  # invalid UTF-8 string
        (b"\xdd\xff\xff\xff\xff", "too_large"),  # array header claiming 4G elements
        (b"\x00" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    ],
)
def test_bad_bytes_raise_typed_errors(payload: bytes, kind: str) -> None:
    with pytest.raises(EventDecodeError) as err:
        decode_batch(payload)
    assert err.value.kind == kind


def test_ext_types_are_type_errors() -> None:
    ext = msgpack.ExtType(5, b"abc")
    for obj in ([TS, [stored(tokens=[ext] * 16)]], [TS, [stored(medium=ext)]], [ext, []]):
        with pytest.raises(EventDecodeError) as err:
            decode_batch(pack(obj))
        assert err.value.kind == "type"
