"""Find and parse the files of a Hugging Face tokenizer directory.

Accepted layouts, as an engine loading the same model would read them:

- a path to `tokenizer.json`; when the file is named exactly `tokenizer.json`, the files
  below are also read from its directory (they belong to the same model);
- a directory holding `tokenizer.json` and optionally `tokenizer_config.json`
  (`chat_template` as a string or a list of `{name, template}`, special-token strings
  or `{"content": ...}` objects), `special_tokens_map.json` (fills special tokens the config
  does not name, as transformers does), `chat_template.json` (`{"chat_template": ...}`),
  `chat_template.jinja` and `additional_chat_templates/<name>.jinja`. The separate template
  files win over the config's `chat_template`, as in current transformers.

Every problem raises `TokenizerLoadError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrouter.tokenizer.errors import TokenizerLoadError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"
ADDITIONAL_TEMPLATES_DIR = "additional_chat_templates"

# The single-token attributes transformers exposes to chat templates (special_tokens_map).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True, slots=True)
class ConfigAddedToken:
    """An added token declared in tokenizer_config.json's `added_tokens_decoder`."""

    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


@dataclass(frozen=True, slots=True)
class TokenizerFiles:
    """Everything read from disk, parsed and validated, before any tokenizer is built."""

    path: Path
    tokenizer_json_path: Path
    tokenizer_json: str
    chat_templates: Mapping[str, str] = field(default_factory=dict)
    chat_template_origin: Path | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    additional_special_tokens: tuple[str, ...] = ()
    config_added_tokens: tuple[ConfigAddedToken, ...] = ()
    split_special_tokens: bool = False


def read_tokenizer_files(path: str | Path) -> TokenizerFiles:
    """Locate and parse the tokenizer files at `path` (a tokenizer.json or a directory)."""
    given = Path(path)
    if given.is_dir():
        directory: Path | None = given
        tok_path = given / TOKENIZER_FILE
        if not tok_path.is_file():
            raise TokenizerLoadError(given, _missing_tokenizer_json(given))
    elif given.is_file():
        tok_path = given
        directory = given.parent if given.name == TOKENIZER_FILE else None
    else:
        raise TokenizerLoadError(given, "no such file or directory")

    tokenizer_json = _read_text(tok_path)
    try:
        parsed = json.loads(tokenizer_json)
    except json.JSONDecodeError as exc:
        raise TokenizerLoadError(tok_path, f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or "model" not in parsed:
        raise TokenizerLoadError(tok_path, "not a tokenizers tokenizer.json (no 'model' object)")

    if directory is None:
        return TokenizerFiles(
            path=given, tokenizer_json_path=tok_path, tokenizer_json=tokenizer_json
        )

    config = _read_json_object(directory / CONFIG_FILE)
    special_map = _read_json_object(directory / SPECIAL_TOKENS_MAP_FILE)
    config_path = directory / CONFIG_FILE

    special_tokens: dict[str, str] = {}
    for key in SPECIAL_TOKEN_KEYS:
        # tokenizer_config.json wins; special_tokens_map.json only fills what it leaves unset.
        for source, where in (
            (config, config_path),
            (special_map, directory / SPECIAL_TOKENS_MAP_FILE),
        ):
            value = _special_token_value(source.get(key), where, key)
            if value is not None:
                special_tokens[key] = value
                break

    additional: list[str] = []
    for source, where in (
        (config, config_path),
        (special_map, directory / SPECIAL_TOKENS_MAP_FILE),
    ):
        raw = source.get("additional_special_tokens")
        if raw is None:
            continue
        if not isinstance(raw, list):
            raise TokenizerLoadError(where, "additional_special_tokens must be a list")
        additional = [
            _special_token_value(item, where, "additional_special_tokens") or "" for item in raw
        ]
        additional = [a for a in additional if a]
        break

    templates, origin = _chat_templates(directory, config, config_path)
    split_special = config.get("split_special_tokens", False)
    if not isinstance(split_special, bool):
        raise TokenizerLoadError(config_path, "split_special_tokens must be true or false")

    return TokenizerFiles(
        path=given,
        tokenizer_json_path=tok_path,
        tokenizer_json=tokenizer_json,
        chat_templates=templates,
        chat_template_origin=origin,
        special_tokens=special_tokens,
        additional_special_tokens=tuple(additional),
        config_added_tokens=_config_added_tokens(config, config_path),
        split_special_tokens=split_special,
    )


def _missing_tokenizer_json(directory: Path) -> str:
    present = sorted(p.name for p in directory.iterdir())
    hint = ""
    if any(name in present for name in ("tokenizer.model", "spiece.model", "vocab.json")):
        hint = (
            "; only slow-tokenizer files are present: save the model's fast tokenizer "
            "(transformers AutoTokenizer.save_pretrained) to produce tokenizer.json"
        )
    shown = ", ".join(present[:12]) + (" ..." if len(present) > 12 else "")
    return f"no {TOKENIZER_FILE} in the directory (found: {shown or 'nothing'}){hint}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerLoadError(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise TokenizerLoadError(path, f"cannot read: {exc.strerror or exc}") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise TokenizerLoadError(path, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TokenizerLoadError(path, "must hold a JSON object")
    return value


def _special_token_value(value: object, where: Path, key: str) -> str | None:
    """A special token is a string or an AddedToken-like object with a string "content"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise TokenizerLoadError(where, f"{key} must be a string or an object with a string 'content'")


def _chat_templates(
    directory: Path, config: Mapping[str, Any], config_path: Path
) -> tuple[dict[str, str], Path | None]:
    templates: dict[str, str] = {}
    origin: Path | None = None
    if "chat_template" in config and config["chat_template"] is not None:
        templates = _parse_template_value(config["chat_template"], config_path)
        origin = config_path
    json_path = directory / CHAT_TEMPLATE_JSON_FILE
    if json_path.is_file():
        data = _read_json_object(json_path)
        if "chat_template" not in data:
            raise TokenizerLoadError(json_path, "no 'chat_template' key")
        templates = _parse_template_value(data["chat_template"], json_path)
        origin = json_path
    jinja_path = directory / CHAT_TEMPLATE_JINJA_FILE
    if jinja_path.is_file():
        if origin is not None:
            log.info("chat template: %s overrides the one in %s", jinja_path, origin)
        templates["default"] = _read_text(jinja_path)
        origin = jinja_path
    extra_dir = directory / ADDITIONAL_TEMPLATES_DIR
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = _read_text(file)
            origin = origin or file
    return templates, origin


def _parse_template_value(value: object, where: Path) -> dict[str, str]:
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        named: dict[str, str] = {}
        for item in value:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise TokenizerLoadError(
                    where,
                    "chat_template list entries must be objects with string 'name' and 'template'",
                )
            if item["name"] in named:
                raise TokenizerLoadError(where, f"chat template {item['name']!r} is defined twice")
            named[item["name"]] = item["template"]
        return named
    raise TokenizerLoadError(where, "chat_template must be a string or a list of {name, template}")


def _config_added_tokens(config: Mapping[str, Any], where: Path) -> tuple[ConfigAddedToken, ...]:
    raw = config.get("added_tokens_decoder")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise TokenizerLoadError(where, "added_tokens_decoder must be an object")
    tokens: list[ConfigAddedToken] = []
    for key, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerLoadError(
                where, f"added_tokens_decoder[{key!r}] has no string 'content'"
            )
        flags = {}
        for flag in ("special", "lstrip", "rstrip", "normalized", "single_word"):
            value = entry.get(flag, False)
            if not isinstance(value, bool):
                raise TokenizerLoadError(
                    where, f"added_tokens_decoder[{key!r}].{flag} must be a boolean"
                )
            flags[flag] = value
        tokens.append(ConfigAddedToken(content=entry["content"], **flags))
    return tuple(tokens)
