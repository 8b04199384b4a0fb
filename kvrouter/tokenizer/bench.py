"""Multi-turn tokenization speed-up: turn N of a long chat with and without the segment cache.

A chat request resends every earlier turn. With the segment cache, turn N tokenizes only the
text that is new since turn N-1 (the previous answer and the new question); without it, the
whole prompt. Both sides render the template, both are measured in the same run on the same
conversation, and the ids are compared token for token.

Run by hand (prints one JSON line)::

    python -m kvrouter.tokenizer.bench [--tokenizer DIR] [--turns 10] [--tokens 16000]

Without --tokenizer it trains the llama3-kind test tokenizer into a temporary directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from kvrouter.tokenizer.testing import build_test_tokenizer, synthetic_text
from kvrouter.tokenizer.tokenizer import Tokenizer

Message = dict[str, str]


def build_conversation(
    tok: Tokenizer, *, turns: int, target_tokens: int, seed: int
) -> list[Message]:
    """A system prompt plus `turns` user messages and `turns - 1` answers, sized so that the
    prompt of the last turn is about `target_tokens` tokens. Deterministic per seed."""
    if turns < 2:
        raise ValueError("turns must be at least 2")
    if target_tokens < 100 * turns:
        raise ValueError("target_tokens is too small for that many turns")

    def make(words: int) -> list[Message]:
        rng = random.Random(seed)
        convo = [{"role": "system", "content": synthetic_text(rng, max(words // 2, 20))}]
        for turn in range(turns):
            convo.append({"role": "user", "content": synthetic_text(rng, words)})
            if turn < turns - 1:
                convo.append({"role": "assistant", "content": synthetic_text(rng, words)})
        return convo

    words = 200
    for _ in range(4):  # the token count is near linear in words: a few rescalings converge
        total = len(tok.encode_chat(make(words)))
        words = max(10, round(words * target_tokens / total))
    return make(words)


def turn_prompts(conversation: Sequence[Message]) -> list[list[Message]]:
    """The message list of each turn: everything up to and including that turn's user
    message (the previous answers included, as a client resends them)."""
    return [list(conversation[: i + 1]) for i, m in enumerate(conversation) if m["role"] == "user"]


def _timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = fn()
    return time.perf_counter() - start, ids


def multiturn_speedup(
    tok_dir: str | Path,
    *,
    turns: int = 10,
    target_tokens: int = 16_000,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the last turn of a `turns`-turn chat of about `target_tokens` tokens, with the
    segment cache warmed by turns 1..turns-1 and without any cache, and check the ids match.

    Each repeat uses a fresh conversation (its own seed), so the timed turn always holds
    text the cache has never seen, as a real next turn does. Returns medians in ms, their
    ratio (`speedup`), `exact` (every repeat token-identical to the whole-string path and to
    plain `tokenizers` encode), and sizes.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    cached = Tokenizer.load(tok_dir)
    plain = Tokenizer.load(tok_dir, segment_cache=False)
    if not cached.segmented:
        raise RuntimeError(
            f"segment cache unavailable for this tokenizer: {cached.fallback_reason}"
        )
    cached_s: list[float] = []
    plain_s: list[float] = []
    encode_s: list[float] = []
    exact = True
    tokens = 0
    new_tokens = 0
    for r in range(repeats):
        convo = build_conversation(cached, turns=turns, target_tokens=target_tokens, seed=seed + r)
        prompts = turn_prompts(convo)
        cached.clear_cache()
        for earlier in prompts[:-1]:
            # Both sides see the same history: tokenizers' own per-word BPE cache warms up on
            # the plain side too, so the comparison isolates the segment cache.
            cached.encode_chat(earlier)
            plain.encode_chat(earlier)
        last = prompts[-1]
        gc.collect()
        gc.disable()
        try:
            before = cached.cache_stats()
            t_cached, ids_cached = _timed(partial(cached.encode_chat, last))
            after = cached.cache_stats()
            t_plain, ids_plain = _timed(partial(plain.encode_chat, last))
            text = plain.render_chat(last)
            start = time.perf_counter()
            reference = plain.backend.encode(text, add_special_tokens=False).ids
            t_encode = time.perf_counter() - start
        finally:
            gc.enable()
        exact = exact and ids_cached == ids_plain == reference
        cached_s.append(t_cached)
        plain_s.append(t_plain)
        encode_s.append(t_encode)
        tokens = len(ids_plain)
        new_tokens = after.tokens - before.tokens
    cached_ms = statistics.median(cached_s) * 1000
    plain_ms = statistics.median(plain_s) * 1000
    return {
        "turn": turns,
        "prompt_tokens": tokens,
        "new_segment_tokens": new_tokens,
        "repeats": repeats,
        "cached_ms": round(cached_ms, 3),
        "uncached_ms": round(plain_ms, 3),
        "tokenizers_encode_ms": round(statistics.median(encode_s) * 1000, 3),
        "speedup": round(plain_ms / cached_ms, 2) if cached_ms > 0 else float("inf"),
        "exact": exact,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: run multiturn_speedup and print its result as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m kvrouter.tokenizer.bench")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: build one)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.tokenizer or build_test_tokenizer(Path(tmp) / "llama3", "llama3")
        result = multiturn_speedup(
            directory, turns=args.turns, target_tokens=args.tokens, repeats=args.repeats
        )
    print(json.dumps(result))
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
