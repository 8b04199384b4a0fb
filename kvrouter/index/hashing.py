"""Block keys: the router's own chained 64-bit hash of a prompt's full blocks.

root    = xxh3_64(msgpack(["kvr/1", model, lora_name, cache_salt, hash_seed]))
key_0   = xxh3_64(tokens[0:B] as uint32 little-endian, seed=root)
key_i   = xxh3_64(tokens[iB:(i+1)B] as uint32 little-endian, seed=key_{i-1})

Only full blocks are hashed; a trailing partial block is ignored, as engines do. Two prompts
share their first n keys exactly when they share their first n full blocks and the same root
(up to 64-bit collisions). The router never reproduces an engine's own hash: the listener maps
engine hashes to these keys from the token ids in each event.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import xxhash

_U32_MAX = 0xFFFFFFFF
HASH_VERSION = "kvr/1"


class TokenIdError(ValueError):
    """A token id is not an integer in [0, 2**32)."""


def root_seed(
    model: str, *, lora_name: str | None = None, cache_salt: str | None = None, hash_seed: str = ""
) -> int:
    """The chain's root: folds everything that makes two identical token blocks not shareable."""
    if not model:
        raise ValueError("model must be a non-empty string")
    payload = msgpack.packb([HASH_VERSION, model, lora_name, cache_salt, hash_seed])
    return int(xxhash.xxh3_64_intdigest(payload))


def tokens_to_bytes(tokens: Sequence[int] | bytes) -> bytes:
    """Token ids as packed uint32 little-endian. Raises TokenIdError for ids out of range."""
    if isinstance(tokens, bytes):
        if len(tokens) % 4:
            raise TokenIdError("packed token bytes must be a multiple of 4 long")
        return tokens
    try:
        arr = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        raise TokenIdError(f"token ids must be integers in [0, 2**32): {exc}") from None
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has a 32-bit "I"
        arr = array("L", tokens)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def chain_keys(tokens: Sequence[int] | bytes, block_size: int, root: int) -> list[int]:
    """Keys of every full block of `tokens`, chained from `root`.

    Cost is one xxh3 call per block over a packed buffer; there is no per-token Python work
    beyond the single array conversion.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    buf = tokens_to_bytes(tokens)
    stride = 4 * block_size
    n = len(buf) // stride
    out: list[int] = []
    append = out.append
    h = root
    digest = xxhash.xxh3_64_intdigest
    view = memoryview(buf)
    for i in range(n):
        h = digest(view[i * stride : (i + 1) * stride], h)
        append(h)
    return out


def extend_chain(parent_key: int, tokens: Sequence[int] | bytes, block_size: int) -> list[int]:
    """Keys of the full blocks in `tokens`, continuing a chain whose last key is `parent_key`.

    The listener uses this to turn an engine's BlockStored token ids into router keys.
    """
    return chain_keys(tokens, block_size, parent_key)


def key_hex(key: int) -> str:
    """The fixed-width hex form used in Redis key names and members (16 lowercase digits)."""
    return f"{key:016x}"


def pack_chain_hex(keys: Sequence[int]) -> str:
    """A chain as one string of 16-hex-digit keys back to back, the form the Lua scripts take."""
    return "".join(f"{k:016x}" for k in keys)


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """Hashes prompts for one (model, LoRA, salt, seed) namespace."""

    model: str
    block_size: int = 16
    hash_seed: str = ""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not self.model:
            raise ValueError("model must be a non-empty string")

    def root(self, *, lora_name: str | None = None, cache_salt: str | None = None) -> int:
        return root_seed(
            self.model, lora_name=lora_name, cache_salt=cache_salt, hash_seed=self.hash_seed
        )

    def keys(
        self,
        tokens: Sequence[int] | bytes,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """Block keys of a prompt's full blocks."""
        return chain_keys(
            tokens, self.block_size, self.root(lora_name=lora_name, cache_salt=cache_salt)
        )
