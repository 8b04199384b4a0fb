"""Checking and packing script arguments in Python, before anything is sent.

A bad argument raises ``ScriptArgumentError`` naming it; chains go out packed as 16 hex
digits per block (one string argument, never thousands).
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from kvrouter.index.errors import ScriptArgumentError, ScriptErrorCode
from kvrouter.index.keys import KeyNameError, validate_medium, validate_worker_id

# Bounds a caller cannot exceed in one call: they keep a script's run time, and so Redis's
# pause for everyone else, bounded.
MAX_CHAIN_BLOCKS = 1 << 17
MAX_LEASE_TTL_MS = 24 * 3600 * 1000
MAX_TTL_MS = 366 * 24 * 3600 * 1000
U64 = (1 << 64) - 1
LEASE_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
OPS = re.compile(r"^[RSDC]*$")


def text(v: Any) -> str:
    """A reply element as str (clients may or may not decode responses)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def worker_arg(worker: str) -> str:
    """A valid worker id, or ScriptArgumentError (code BAD_WORKER)."""
    try:
        return validate_worker_id(worker)
    except KeyNameError as exc:
        raise ScriptArgumentError("worker", str(exc), ScriptErrorCode.BAD_WORKER) from None


def candidates_arg(candidates: Iterable[str] | None) -> str:
    """Candidate worker ids as the lookup scripts take them: one per line, each valid ('' =
    every worker)."""
    return "\n".join(worker_arg(w) for w in candidates) if candidates is not None else ""


def medium_arg(medium: str) -> str:
    """A valid storage medium name, or ScriptArgumentError."""
    try:
        return validate_medium(medium)
    except KeyNameError as exc:
        raise ScriptArgumentError("medium", str(exc)) from None


def lease_id_arg(lease_id: str) -> str:
    """A valid lease id, or ScriptArgumentError."""
    if not isinstance(lease_id, str) or not LEASE_ID.match(lease_id):
        raise ScriptArgumentError("lease_id", "must be 1-64 characters of [0-9A-Za-z_-]")
    return lease_id


def nonneg(name: str, value: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum], or ScriptArgumentError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScriptArgumentError(name, f"must be an integer, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ScriptArgumentError(name, f"must be {bound}, got {value}")
    return value


def pack_keys(name: str, keys: Sequence[int]) -> str:
    """Keys as 16 hex digits each, back to back. array('Q') checks types and the u64 range in
    C, an order of magnitude faster than formatting each key in Python."""
    if len(keys) > MAX_CHAIN_BLOCKS:
        raise ScriptArgumentError(
            name, f"at most {MAX_CHAIN_BLOCKS} blocks per call, got {len(keys)}"
        )
    try:
        arr = array("Q", keys)
    except (OverflowError, TypeError):
        raise ScriptArgumentError(name, "block keys must be unsigned 64-bit integers") from None
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes().hex()


def pack_u64(values: Sequence[int]) -> str:
    """u64 values as 16 lowercase hex digits each, back to back (one C pass, no per-value
    formatting). Raises ScriptArgumentError for values outside [0, 2**64)."""
    try:
        arr = array("Q", values)
    except (OverflowError, TypeError):
        raise ScriptArgumentError("fields", "must be unsigned 64-bit integers") from None
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes().hex()
