"""Exact segment splitting: when tokenizing a string piece by piece equals tokenizing it whole.

How HF `tokenizers` encodes a string (the facts this module relies on):

1. Added tokens are extracted first. Tokens with `normalized=False` are matched on the raw
   string (leftmost-longest, non-overlapping); the pieces between them are normalized one by
   one; tokens with `normalized=True` are then matched inside each normalized piece.
   `lstrip`/`rstrip` widen a match over the Unicode whitespace beside it; `single_word`
   discards matches inside words.
2. The pre-tokenizer runs on each remaining piece on its own. The only position it can see is
   the piece's offset in the original string, and among the built-in pre-tokenizers only
   Metaspace with `prepend_scheme="first"` uses it (the "▁" prefix is added only to a piece
   that starts at offset 0).
3. The model tokenizes each pre-token on its own; the post-processor adds special tokens
   (BOS...) around the whole sequence once.

So a text piece between added tokens tokenizes to the same ids alone as inside the whole
string, provided: the splitter finds exactly the pieces the library finds (same matching
rules), a piece re-encoded alone finds no added token inside it (true for leftmost-longest
non-overlapping matching: the gap between two accepted matches holds no match), the
normalizer never has to run on part of a piece (no `normalized=True` tokens when there is a
normalizer), the piece sees the same "offset 0 or not" (handled with a second tokenizer whose
Metaspace never prepends, used for pieces not at the start), and the model is deterministic
(no BPE dropout). `analyze` checks these conditions on the tokenizer's JSON at load time and
names the first one that fails; the tokenizer then falls back to whole-string tokenization.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Unicode White_Space: what the Rust `regex` crate's `\s` matches, which tokenizers uses for
# lstrip/rstrip. Python's str.isspace() differs (it also accepts U+001C..U+001F), so the set
# is spelled out.
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

# Components known to process each piece on its own, without looking at its position.
_POSITION_FREE_NORMALIZERS = frozenset(
    {
        "BertNormalizer",
        "ByteLevel",
        "Lowercase",
        "NFC",
        "NFD",
        "NFKC",
        "NFKD",
        "Nmt",
        "Precompiled",
        "Prepend",
        "Replace",
        "Sequence",
        "Strip",
        "StripAccents",
    }
)
_POSITION_FREE_PRE_TOKENIZERS = frozenset(
    {
        "BertPreTokenizer",
        "ByteLevel",
        "CharDelimiterSplit",
        "Digits",
        "FixedLength",
        "Metaspace",  # position-free unless prepend_scheme is "first"; checked separately
        "Punctuation",
        "Sequence",
        "Split",
        "UnicodeScripts",
        "Whitespace",
        "WhitespaceSplit",
    }
)
_DETERMINISTIC_MODELS = frozenset({"BPE", "Unigram", "WordLevel", "WordPiece"})


@dataclass(frozen=True, slots=True)
class AddedTokenRule:
    """One added token as the splitter needs it."""

    content: str
    id: int
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    special: bool = False


class _MatchPass:
    """One matching pass over a string: leftmost-longest, non-overlapping, like aho-corasick's
    LeftmostLongest mode. A regex alternation of literals tried longest first gives the
    longest literal at the leftmost position where any matches, and finditer resumes at the
    end of each match, as the library's iterator does."""

    def __init__(self, rules: Sequence[AddedTokenRule]) -> None:
        self._by_content = {rule.content: rule for rule in rules}
        ordered = sorted(self._by_content, key=len, reverse=True)
        self._regex = re.compile("|".join(re.escape(content) for content in ordered))

    def split_into(self, text: str, out: list[str | int]) -> None:
        start_offset = 0
        for match in self._regex.finditer(text):
            start, stop = match.span()
            rule = self._by_content[match.group()]
            if rule.lstrip:
                # Whitespace already consumed by the previous token is not taken twice.
                while start > start_offset and text[start - 1] in WHITE_SPACE:
                    start -= 1
            if rule.rstrip:
                end = len(text)
                while stop < end and text[stop] in WHITE_SPACE:
                    stop += 1
            if start_offset < start:
                out.append(text[start_offset:start])
            out.append(rule.id)
            start_offset = stop
        if start_offset < len(text):
            out.append(text[start_offset:])


class AddedTokenSplitter:
    """Splits a string into text pieces (str) and added-token ids (int), in order, exactly as
    tokenizers' added-vocabulary pass does when `analyze` has approved the tokenizer."""

    def __init__(self, rules: Iterable[AddedTokenRule]) -> None:
        rules = [rule for rule in rules if rule.content]
        raw = [rule for rule in rules if not rule.normalized]
        normalized = [rule for rule in rules if rule.normalized]
        self._raw = _MatchPass(raw) if raw else None
        self._normalized = _MatchPass(normalized) if normalized else None

    def split(self, text: str) -> list[str | int]:
        """Pieces of `text`; the first item, when it is a str, starts at offset 0."""
        pieces: list[str | int] = []
        if not text:
            return pieces
        if self._raw is None:
            pieces.append(text)
        else:
            self._raw.split_into(text, pieces)
        if self._normalized is None:
            return pieces
        # Second pass, inside the raw pieces only (valid because analyze() allows
        # normalized tokens only when there is no normalizer to apply first).
        second: list[str | int] = []
        for piece in pieces:
            if isinstance(piece, str):
                self._normalized.split_into(piece, second)
            else:
                second.append(piece)
        return second


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    """The outcome of `analyze`: whether segment-wise tokenization is exact for a tokenizer."""

    exact: bool
    reason: str | None
    rules: tuple[AddedTokenRule, ...] = ()
    # Metaspace prepend_scheme="first": pieces not at offset 0 must be encoded by a tokenizer
    # whose Metaspace never prepends; this is that tokenizer's JSON.
    start_sensitive: bool = False
    inner_tokenizer_json: str | None = None


def analyze(
    tokenizer: Mapping[str, Any],
    rules: Sequence[AddedTokenRule],
    *,
    encode_special_tokens: bool,
) -> SegmentPlan:
    """Decide whether splitting at added tokens is provably exact for this tokenizer.

    `tokenizer` is the parsed tokenizer.json (after any tokens were added), `rules` its added
    tokens. Returns a plan with `exact=False` and the reason when any condition fails.
    """
    model = tokenizer.get("model") or {}
    model_type = model.get("type")
    if model_type not in _DETERMINISTIC_MODELS:
        return SegmentPlan(False, f"model type {model_type!r} is not known to be piece-wise")
    if model_type == "BPE" and model.get("dropout") not in (None, 0, 0.0):
        return SegmentPlan(False, "BPE dropout makes tokenization random")

    normalizer = tokenizer.get("normalizer")
    unknown = _unknown_types(normalizer, _POSITION_FREE_NORMALIZERS, "normalizers")
    if unknown:
        return SegmentPlan(False, f"normalizer type {unknown!r} is not known to be piece-wise")
    pre_tokenizer = tokenizer.get("pre_tokenizer")
    unknown = _unknown_types(pre_tokenizer, _POSITION_FREE_PRE_TOKENIZERS, "pretokenizers")
    if unknown:
        return SegmentPlan(False, f"pre-tokenizer type {unknown!r} is not known to be piece-wise")

    if encode_special_tokens:
        return SegmentPlan(False, "split_special_tokens is on (special tokens are not extracted)")
    live = [rule for rule in rules if rule.content]
    contents = [rule.content for rule in live]
    if len(set(contents)) != len(contents):
        return SegmentPlan(False, "two added tokens share the same content")
    single = [rule.content for rule in live if rule.single_word]
    if single:
        return SegmentPlan(False, f"added token {single[0]!r} is single_word")
    if normalizer is not None:
        normalized = [rule.content for rule in live if rule.normalized]
        if normalized:
            return SegmentPlan(
                False,
                f"added token {normalized[0]!r} is matched after normalization "
                "and the tokenizer has a normalizer",
            )
    if any(rule.rstrip for rule in live) and any(c[0] in WHITE_SPACE for c in contents):
        # rstrip consumes whitespace the match iterator has not passed yet; a token starting
        # with whitespace could then overlap it, a case not worth reasoning about.
        return SegmentPlan(False, "an rstrip added token and an added token starting with space")

    start_sensitive = _has_first_metaspace(pre_tokenizer)
    inner_json: str | None = None
    if start_sensitive:
        inner = copy.deepcopy(dict(tokenizer))
        inner["pre_tokenizer"] = _metaspace_never(inner["pre_tokenizer"])
        inner_json = json.dumps(inner)
    return SegmentPlan(True, None, tuple(live), start_sensitive, inner_json)


def _unknown_types(node: object, known: frozenset[str], children_key: str) -> str | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        return repr(node)
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in known:
        return str(kind)
    if kind == "Sequence":
        for child in node.get(children_key) or []:
            found = _unknown_types(child, known, children_key)
            if found:
                return found
    return None


def _has_first_metaspace(node: object) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Metaspace":
        return node.get("prepend_scheme") == "first"
    if node.get("type") == "Sequence":
        return any(_has_first_metaspace(child) for child in node.get("pretokenizers") or [])
    return False


def _metaspace_never(node: Any) -> Any:
    # For a piece whose offset is not 0, "first" never prepends, which is what "never" does
    # everywhere: the two are the same function on such pieces.
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            return {**node, "prepend_scheme": "never"}
        if node.get("type") == "Sequence":
            return {**node, "pretokenizers": [_metaspace_never(c) for c in node["pretokenizers"]]}
    return node


@dataclass(frozen=True, slots=True)
class SpecialAffixes:
    """Ids the post-processor puts before and after a single sequence."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def post_processor_affixes(processor: object) -> SpecialAffixes | None:
    """Prefix and suffix ids of a single-sequence post-processor, or None when its effect is
    not a fixed prefix and suffix (then encode with special tokens goes whole-string)."""
    if processor is None:
        return SpecialAffixes((), ())
    if not isinstance(processor, dict):
        return None
    kind = processor.get("type")
    if kind == "ByteLevel":
        return SpecialAffixes((), ())  # changes offsets only
    if kind in ("BertProcessing", "RobertaProcessing"):
        try:
            return SpecialAffixes((int(processor["cls"][1]),), (int(processor["sep"][1]),))
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    if kind == "TemplateProcessing":
        return _template_affixes(processor)
    if kind == "Sequence":
        prefix: tuple[int, ...] = ()
        suffix: tuple[int, ...] = ()
        for child in processor.get("processors") or []:
            affixes = post_processor_affixes(child)
            if affixes is None:
                return None
            # Each processor wraps the output of the one before it.
            prefix = affixes.prefix + prefix
            suffix = suffix + affixes.suffix
        return SpecialAffixes(prefix, suffix)
    return None


def _template_affixes(processor: Mapping[str, Any]) -> SpecialAffixes | None:
    single = processor.get("single")
    specials = processor.get("special_tokens") or {}
    if not isinstance(single, list):
        return None
    prefix: list[int] = []
    suffix: list[int] = []
    sequences = 0
    for item in single:
        if not isinstance(item, dict):
            return None
        if "Sequence" in item:
            if item["Sequence"].get("id") != "A":
                return None
            sequences += 1
        elif "SpecialToken" in item:
            name = item["SpecialToken"].get("id")
            entry = specials.get(name)
            if not isinstance(entry, dict) or not isinstance(entry.get("ids"), list):
                return None
            (suffix if sequences else prefix).extend(int(i) for i in entry["ids"])
        else:
            return None
    if sequences != 1:
        return None
    return SpecialAffixes(tuple(prefix), tuple(suffix))
