"""Block keys: golden vectors pin the recipe; properties pin its meaning."""

from __future__ import annotations

import struct

import msgpack
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvrouter.index.hashing import (
    BlockHasher,
    TokenIdError,
    chain_keys,
    extend_chain,
    pack_chain_hex,
    root_seed,
    tokens_to_bytes,
)

# Changing any of these changes every key in every deployed index: bump HASH_VERSION too.
GOLDEN_ROOTS = {
    ("llama-3-8b", None, None, ""): 0x5E11EA83AA001F93,
    ("llama-3-8b", "alice", None, ""): 0x716A5CDE50ED1452,
    ("llama-3-8b", None, "s1", ""): 0x43C35BD0CFAE40DD,
    ("llama-3-8b", None, None, "42"): 0x0EB9A194770FD5FF,
}
GOLDEN_CHAIN = [0x68460FBCE1464094, 0xECF9BD8519E5FC88, 0x80912DA5923D2F26]


@pytest.mark.parametrize(("args", "expected"), GOLDEN_ROOTS.items())
def test_root_golden(args: tuple[str, str | None, str | None, str], expected: int) -> None:
    model, lora, salt, seed = args
    assert root_seed(model, lora_name=lora, cache_salt=salt, hash_seed=seed) == expected


def test_chain_golden_and_recipe() -> None:
    tokens = list(range(48))
    root = root_seed("llama-3-8b")
    assert chain_keys(tokens, 16, root) == GOLDEN_CHAIN
    # The recipe spelled out independently: xxh3_64 of uint32 LE tokens seeded by the parent.
    assert root == xxhash.xxh3_64_intdigest(msgpack.packb(["kvr/1", "llama-3-8b", None, None, ""]))
    h = root
    for i in range(3):
        h = xxhash.xxh3_64_intdigest(struct.pack("<16I", *tokens[16 * i : 16 * (i + 1)]), h)
        assert h == GOLDEN_CHAIN[i]


def test_partial_tail_ignored_and_empty() -> None:
    root = root_seed("m")
    assert chain_keys(list(range(47)), 16, root) == chain_keys(list(range(32)), 16, root)
    assert chain_keys(list(range(15)), 16, root) == []
    assert chain_keys([], 16, root) == []


def test_bytes_input_matches_list() -> None:
    tokens = [5, 2**32 - 1, 0, 77] * 8
    assert chain_keys(tokens_to_bytes(tokens), 4, 9) == chain_keys(tokens, 4, 9)


def test_extend_chain_continues_a_chain() -> None:
    tokens = list(range(64))
    full = chain_keys(tokens, 16, 123)
    assert extend_chain(full[1], tokens[32:], 16) == full[2:]


@pytest.mark.parametrize("bad", [[-1], [2**32], ["7"], [1.5], [None]])
def test_bad_token_ids_raise(bad: list[object]) -> None:
    with pytest.raises(TokenIdError):
        chain_keys(bad, 1, 0)  # type: ignore[arg-type]


def test_bad_block_size_and_model() -> None:
    with pytest.raises(ValueError, match="block_size"):
        chain_keys([1], 0, 0)
    with pytest.raises(ValueError, match="model"):
        BlockHasher("")
    with pytest.raises(ValueError, match="block_size"):
        BlockHasher("m", block_size=-16)
    with pytest.raises(TokenIdError):
        tokens_to_bytes(b"\x00\x01\x02")


def test_pack_chain_hex() -> None:
    assert pack_chain_hex([1, 2**64 - 1]) == "0000000000000001ffffffffffffffff"


tokens_st = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=96)


@given(a=tokens_st, b=tokens_st, bs=st.sampled_from([1, 2, 4, 16]))
def test_shared_keys_iff_shared_blocks(a: list[int], b: list[int], bs: int) -> None:
    """Two prompts share their first n keys exactly when they share their first n full blocks."""
    h = BlockHasher("m", block_size=bs)
    ka, kb = h.keys(a), h.keys(b)
    shared_blocks = 0
    while (
        shared_blocks < min(len(a), len(b)) // bs
        and a[shared_blocks * bs : (shared_blocks + 1) * bs]
        == b[shared_blocks * bs : (shared_blocks + 1) * bs]
    ):
        shared_blocks += 1
    shared_keys = 0
    while shared_keys < min(len(ka), len(kb)) and ka[shared_keys] == kb[shared_keys]:
        shared_keys += 1
    assert shared_keys == shared_blocks


@given(t=st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=16, max_size=64))
def test_seed_parts_separate_namespaces(t: list[int]) -> None:
    """Model, LoRA, salt and seed each give a different chain for the same tokens."""
    base = BlockHasher("m", block_size=16)
    variants = [
        base.keys(t),
        base.keys(t, lora_name="alice"),
        base.keys(t, cache_salt="tenant-1"),
        BlockHasher("m", block_size=16, hash_seed="x").keys(t),
        BlockHasher("m2", block_size=16).keys(t),
    ]
    firsts = {v[0] for v in variants}
    assert len(firsts) == len(variants)
