"""Session fixtures: real BPE tokenizers trained here, and configuration variants of them.

Each variant is a tokenizer.json edited the way published models differ (prefix-space
schemes, strip flags on added tokens, normalizers, tokens matched after normalization), so
the exactness tests cover the cases the segment splitter must get right, and the ones where
it must decline.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from kvrouter.tokenizer.testing import build_test_tokenizer

Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_tokenizer(tmp_path_factory.mktemp("llama3"), "llama3")


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_tokenizer(tmp_path_factory.mktemp("sentencepiece"), "sentencepiece")


def _added(data: dict[str, Any], content: str) -> dict[str, Any]:
    return next(t for t in data["added_tokens"] if t["content"] == content)


def _append_added(data: dict[str, Any], content: str, **flags: bool) -> None:
    vocab = data["model"]["vocab"]
    new_id = max([*vocab.values(), *(t["id"] for t in data["added_tokens"])]) + 1
    token = {
        "id": new_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": False,
    }
    token.update(flags)
    data["added_tokens"].append(token)


def _metaspace_always(data: dict[str, Any]) -> None:
    data["pre_tokenizer"]["prepend_scheme"] = "always"


def _gpt2_prefix_space(data: dict[str, Any]) -> None:
    data["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }


def _strip_flags(data: dict[str, Any]) -> None:
    _added(data, "<|eot_id|>")["rstrip"] = True
    _added(data, "<|start_header_id|>")["lstrip"] = True
    _added(data, "<|end_header_id|>").update(lstrip=True, rstrip=True)


def _normalized_added(data: dict[str, Any]) -> None:
    # "x<|" overlaps the raw-matched "<|eot_id|>": only a two-pass splitter gets "x<|eot_id|>"
    # right. "the" and "he" overlap each other inside the same (normalized) pass; "ab" is a
    # prefix of "ab ab", and "==" of "====" (raw), so only longest-first matching is right.
    for content in ("x<|", "the", "he", "<tool>", "ab", "ab ab"):
        _append_added(data, content)
    for content in ("==", "===="):
        _append_added(data, content, normalized=False)


def _legacy_llama2(data: dict[str, Any]) -> None:
    # The pre-Metaspace-"first" way Llama-2 conversions spelled SentencePiece: a normalizer
    # that prepends "▁" to every piece and replaces spaces, and no pre-tokenizer.
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None


def _nfkc_lowercase(data: dict[str, Any]) -> None:
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}],
    }


def _single_word(data: dict[str, Any]) -> None:
    _append_added(data, "cache", single_word=True)


def _normalized_with_normalizer(data: dict[str, Any]) -> None:
    _nfkc_lowercase(data)
    _append_added(data, "Router")


def _dropout(data: dict[str, Any]) -> None:
    data["model"]["dropout"] = 0.1


# name -> (base, edit, segment path expected)
VARIANTS: dict[str, tuple[str, Edit | None, bool]] = {
    "llama3": ("llama3", None, True),
    "sentencepiece": ("sentencepiece", None, True),
    "metaspace_always": ("sentencepiece", _metaspace_always, True),
    "gpt2_prefix_space": ("llama3", _gpt2_prefix_space, True),
    "strip_flags": ("llama3", _strip_flags, True),
    "normalized_added": ("llama3", _normalized_added, True),
    "legacy_llama2": ("sentencepiece", _legacy_llama2, True),
    "nfkc_lowercase": ("llama3", _nfkc_lowercase, True),
    "single_word": ("llama3", _single_word, False),
    "normalized_with_normalizer": ("llama3", _normalized_with_normalizer, False),
}


def write_variant(base_dir: Path, target: Path, edit: Edit | None) -> Path:
    """Copy a tokenizer directory, editing its tokenizer.json."""
    target.mkdir(parents=True, exist_ok=True)
    data = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data = copy.deepcopy(data)
    if edit is not None:
        edit(data)
    (target / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = (base_dir / "tokenizer_config.json").read_text(encoding="utf-8")
    # The config's added_tokens_decoder describes the unedited tokens; drop it so the edited
    # flags in tokenizer.json are the only description.
    config_data = json.loads(config)
    config_data.pop("added_tokens_decoder", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config_data), encoding="utf-8")
    # The variant must still be a tokenizer the library accepts.
    HFTokenizer.from_file(str(target / "tokenizer.json"))
    return target


@pytest.fixture(scope="session")
def variant_dirs(
    tmp_path_factory: pytest.TempPathFactory, llama3_dir: Path, sp_dir: Path
) -> dict[str, Path]:
    bases = {"llama3": llama3_dir, "sentencepiece": sp_dir}
    root = tmp_path_factory.mktemp("variants")
    dirs = {
        name: write_variant(bases[base], root / name, edit)
        for name, (base, edit, _) in VARIANTS.items()
    }
    dirs["dropout"] = write_variant(llama3_dir, root / "dropout", _dropout)
    return dirs
