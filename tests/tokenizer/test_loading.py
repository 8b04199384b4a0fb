"""Loading a tokenizer from a file or a model directory, and every way that can fail."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvrouter.tokenizer import Tokenizer, TokenizerLoadError


def _copy(src: Path, dst: Path, *, config: dict[str, Any] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def _config(src: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    return data


def test_directory_loads_template_and_special_tokens(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir)
    assert tok.chat_template_names == ("default",)
    # eos_token is stored as {"content": ...} in the config: only the content counts.
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert tok.vocab_size == 4000
    assert tok.segmented


def test_tokenizer_json_path_reads_its_siblings(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir / "tokenizer.json")
    assert tok.chat_template_names == ("default",)


def test_other_file_name_is_read_alone(llama3_dir: Path, tmp_path: Path) -> None:
    """A file not named tokenizer.json may sit among unrelated files: siblings are ignored."""
    shutil.copy(llama3_dir / "tokenizer.json", tmp_path / "model-tok.json")
    shutil.copy(llama3_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tok = Tokenizer.load(tmp_path / "model-tok.json")
    assert tok.chat_template_names == ()
    assert tok.encode_prompt("Hello") == Tokenizer.load(llama3_dir).encode_prompt("Hello")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="no such file or directory") as info:
        Tokenizer.load(tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"


def test_directory_without_tokenizer_json_lists_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError) as info:
        Tokenizer.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "no tokenizer.json" in message and "tokenizer.model" in message
    assert "save_pretrained" in message  # the hint for slow-only model directories


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="not valid JSON") as info:
        Tokenizer.load(tmp_path)
    assert info.value.path == tmp_path / "tokenizer.json"


def test_json_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="no 'model' object"):
        Tokenizer.load(tmp_path)


def test_tokenizer_json_the_library_rejects(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}', encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="tokenizers cannot load it"):
        Tokenizer.load(tmp_path)


def test_binary_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerLoadError, match="not UTF-8"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chat_template": 42}, "chat_template must be a string or a list"),
        ({"chat_template": [{"name": "default"}]}, "string 'name' and 'template'"),
        (
            {"chat_template": [{"name": "a", "template": "x"}, {"name": "a", "template": "y"}]},
            "defined twice",
        ),
        ({"bos_token": 7}, "bos_token must be a string or an object"),
        ({"eos_token": {"text": "</s>"}}, "eos_token must be a string or an object"),
        ({"additional_special_tokens": "<x>"}, "additional_special_tokens must be a list"),
        ({"split_special_tokens": "yes"}, "split_special_tokens must be true or false"),
        ({"added_tokens_decoder": []}, "added_tokens_decoder must be an object"),
        ({"added_tokens_decoder": {"5": {"special": True}}}, "has no string 'content'"),
        (
            {"added_tokens_decoder": {"5": {"content": "<x>", "lstrip": "no"}}},
            "lstrip must be a boolean",
        ),
    ],
)
def test_bad_tokenizer_config(
    llama3_dir: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    config = _config(llama3_dir)
    config.update(change)
    _copy(llama3_dir, tmp_path, config=config)
    with pytest.raises(TokenizerLoadError, match=message) as info:
        Tokenizer.load(tmp_path)
    assert info.value.path == tmp_path / "tokenizer_config.json"


def test_config_that_is_not_an_object(llama3_dir: Path, tmp_path: Path) -> None:
    _copy(llama3_dir, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="must hold a JSON object"):
        Tokenizer.load(tmp_path)


def test_template_syntax_error_names_file_template_and_line(
    llama3_dir: Path, tmp_path: Path
) -> None:
    config = _config(llama3_dir)
    config["chat_template"] = [
        {"name": "default", "template": "{{ bos_token }}"},
        {"name": "tool_use", "template": "line one\n{% for m in messages %}{{ m }}"},
    ]
    _copy(llama3_dir, tmp_path, config=config)
    with pytest.raises(TokenizerLoadError) as info:
        Tokenizer.load(tmp_path)
    assert info.value.path == tmp_path / "tokenizer_config.json"
    assert "'tool_use'" in str(info.value) and "line 2" in str(info.value)


def test_named_templates_from_config(llama3_dir: Path, tmp_path: Path) -> None:
    config = _config(llama3_dir)
    config["chat_template"] = [
        {"name": "default", "template": "D"},
        {"name": "tool_use", "template": "T"},
    ]
    tok = Tokenizer.load(_copy(llama3_dir, tmp_path, config=config))
    assert tok.chat_template_names == ("default", "tool_use")


def test_template_files_override_config(
    llama3_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _copy(llama3_dir, tmp_path, config=_config(llama3_dir))
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": "from-json"}), encoding="utf-8"
    )
    tok = Tokenizer.load(tmp_path)
    assert tok.render_chat([]) == "from-json"

    (tmp_path / "chat_template.jinja").write_text("from-jinja {{ bos_token }}", encoding="utf-8")
    extra = tmp_path / "additional_chat_templates"
    extra.mkdir()
    (extra / "rag.jinja").write_text("rag {{ documents | length }}", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="kvrouter.tokenizer.loading"):
        tok = Tokenizer.load(tmp_path)
    assert "overrides" in caplog.text
    assert tok.render_chat([]) == "from-jinja <|begin_of_text|>"
    assert tok.render_chat([], template_name="rag", documents=[{"t": 1}, {"t": 2}]) == "rag 2"


def test_chat_template_json_without_key(llama3_dir: Path, tmp_path: Path) -> None:
    _copy(llama3_dir, tmp_path)
    (tmp_path / "chat_template.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="no 'chat_template' key") as info:
        Tokenizer.load(tmp_path)
    assert info.value.path == tmp_path / "chat_template.json"


def test_special_tokens_map_fills_what_config_leaves_unset(
    llama3_dir: Path, tmp_path: Path
) -> None:
    config = {"bos_token": "<|begin_of_text|>", "chat_template": "{{ bos_token }}|{{ eos_token }}"}
    _copy(llama3_dir, tmp_path, config=config)
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|end_of_text|>", "eos_token": {"content": "<|eot_id|>"}}),
        encoding="utf-8",
    )
    tok = Tokenizer.load(tmp_path)
    assert tok.render_chat([]) == "<|begin_of_text|>|<|eot_id|>"


def test_tokens_declared_only_in_config_are_added(llama3_dir: Path, tmp_path: Path) -> None:
    """transformers adds special tokens that tokenizer.json lacks; the engine then splits
    them out of text, so the router must too."""
    config = _config(llama3_dir)
    config["additional_special_tokens"] = ["<|tool|>"]
    config["added_tokens_decoder"]["9999"] = {"content": "<|ipython|>", "special": True}
    tok = Tokenizer.load(_copy(llama3_dir, tmp_path, config=config))
    tool = tok.backend.token_to_id("<|tool|>")
    ipython = tok.backend.token_to_id("<|ipython|>")
    assert tool is not None and ipython is not None
    assert tok.vocab_size == 4002
    ids = tok.encode_prompt("a<|tool|>b <|ipython|>", add_special_tokens=False)
    assert tool in ids and ipython in ids
    assert ids == tok.encode_uncached("a<|tool|>b <|ipython|>", add_special_tokens=False)


def test_truncation_in_tokenizer_json_is_ignored(llama3_dir: Path, tmp_path: Path) -> None:
    """Engines never truncate unless asked; a training-time setting must not cut prompts."""
    data = json.loads((llama3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {
        "direction": "Right",
        "max_length": 8,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    text = "one two three four five six seven eight nine ten eleven twelve"
    assert len(Tokenizer.load(tmp_path).encode_prompt(text)) > 8
