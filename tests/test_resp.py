"""A record's ZADD arguments encoded column by column equal hiredis's packing, byte for byte."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from kvrouter.index.connection import PackedArgs, fast_packing
from kvrouter.index.resp import zadd_pairs
from kvrouter.index.scripts import pack_u64


def _reference(scores: list[int], members: str) -> bytes:
    flat: list[object] = []
    for i, s in enumerate(scores):
        flat += [s, members[16 * i : 16 * i + 16]]
    packed: bytes = hiredis.pack_command(("X", *flat))
    return packed.split(b"\r\n", 3)[3]  # drop "*<n>", "$1" and "X"


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=600),
    held_frac=st.floats(0, 1),
    now=st.integers(10**15, 9 * 10**15),
    ttl_held=st.integers(0, 10**10),
    ttl_new=st.integers(1, 10**10),
)
def test_matches_hiredis(
    keys: list[int], held_frac: float, now: int, ttl_held: int, ttl_new: int
) -> None:
    n = len(keys)
    held = int(n * held_frac)
    hi_held, hi_new = now + ttl_held, now + ttl_new
    scores = [*range(hi_held, hi_held - held, -1), *range(hi_new - held, hi_new - n, -1)]
    members = pack_u64(keys)
    got = zadd_pairs([(hi_held, held), (hi_new - held, n - held)], members.encode())
    if len({len(str(s)) for s in scores}) > 1:
        assert got is None
    else:
        assert got == _reference(scores, members)


def test_runs_across_a_wrap_of_the_last_four_digits() -> None:
    members = pack_u64(range(30_000))
    hi = 2 * 10**15 + 12_345  # 30,000 descending scores wrap 0000 three times
    got = zadd_pairs([(hi, 30_000)], members.encode())
    assert got == _reference(list(range(hi, hi - 30_000, -1)), members)


def test_rejects_what_it_cannot_encode() -> None:
    members = pack_u64([1, 2]).encode()
    assert zadd_pairs([(100, 2)], members) is None  # too few digits for the fixed layout
    assert zadd_pairs([(10**5, 2)], members) is None  # 100000 and 99999 differ in width
    assert zadd_pairs([], b"") == b""
    with pytest.raises(ValueError, match="cover"):
        zadd_pairs([(10**15, 3)], members)


def test_packed_args_ride_behind_ordinary_ones() -> None:
    members = pack_u64([7, 8, 9])
    scores = [10**15 + 2, 10**15 + 1, 10**15]
    data = zadd_pairs([(scores[0], 3)], members.encode())
    assert data is not None
    conn = fast_packing(Connection)()
    got = b"".join(conn.pack_command("ZADD", "k", "GT", "CH", PackedArgs(6, data)))
    flat: list[object] = []
    for i, s in enumerate(scores):
        flat += [s, members[16 * i : 16 * i + 16]]
    assert got == b"".join(Connection().pack_command("ZADD", "k", "GT", "CH", *flat))


@pytest.mark.parametrize(
    ("held", "ttl_held", "ttl_new", "top"),
    [
        (0, 5_000, 1_000, 1_000_000),  # nothing held: ttl_held is not written at all
        (0, 0, 1_000, 1_000_000),
        (2, 5_000, 1_000, 5_000_000),
        (2, 1_000, 5_000, 4_999_998),  # the first new block (2 us below) outlives the head
        (4, 1_000, 5_000, 1_000_000),
    ],
)
def test_record_top_is_the_highest_score_written(
    held: int, ttl_held: int, ttl_new: int, top: int
) -> None:
    """ttls in ms, top in us above now."""
    from kvrouter.index.scripts import RecordCall, load_scripts

    now = 10**15
    for encoded in (False, True):
        rc = RecordCall(
            load_scripts()["record_chain"], ["a", "b", "c", "d"], "w", pack_u64([1, 2, 3, 4]),
            0, ttl_new * 1000, ttl_held * 1000, held, 0, 10, encoded,
        )  # fmt: skip
        args, got = rc.zadd_args(now)
        assert got == now + top
        if not encoded:
            assert max(args[4::2]) == got
