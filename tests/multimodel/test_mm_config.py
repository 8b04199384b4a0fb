"""The router's config file: the documented example loads (TOML and YAML alike), precedence
(file < environment < flags), per-model settings, and errors that name the file and key."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from kvrouter.index.hashing import BlockHasher
from router_node.models import ModelConfig
from router_node.settings import RouterSettings, SettingsError, add_arguments

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"


def doc_block(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, f"docs/configuration.md should have one {lang} example"
    return blocks[0]


@pytest.fixture(params=["toml", "yaml"])
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    p = tmp_path / f"kvrouter.{request.param}"
    p.write_text(doc_block(request.param), encoding="utf-8")
    return p


def flags(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_the_documented_example_loads(example: Path) -> None:
    s = RouterSettings.load(flags(["--config", str(example)]), {})
    assert s.models == (LLAMA, QWEN, "sql-lora", "support-lora")
    assert (s.policy, s.kv_events, s.lora_placement, s.models_interval_s) == (
        "kv",
        True,
        "any_base_worker",
        10.0,
    )
    assert s.redis_url == "redis://redis:6379/0"
    assert [w.id for w in s.workers] == [
        "llama-0",
        "llama-1",
        "vllm-qwen-0:8000",
        "vllm-qwen-1:8000",
    ]
    assert s.workers[0].models == (LLAMA, "sql-lora") and s.workers[1].models == ()
    cat = s.catalogue()
    llama, qwen = cat.bases[LLAMA], cat.bases[QWEN]
    assert (llama.block_size, llama.hash_seed, llama.tokenizer) == (
        16,
        "fleet-a",
        "/models/llama-3.1-8b-instruct",
    )
    assert llama.chat_template == "/models/templates/llama-3.1-tools.jinja"
    assert (qwen.block_size, qwen.hash_seed, qwen.decode_weight, qwen.prefill_weight) == (
        32,
        "",
        1.5,
        1.0,
    )
    assert set(cat.adapters) == {"sql-lora", "support-lora"}
    assert cat.lora_path("sql-lora") == "/adapters/sql-lora"
    # An adapter hashes as its base model with its own name folded into the root.
    sql = cat.resolve("sql-lora")
    assert sql is not None and sql.base is llama and sql.lora_name == "sql-lora"
    tokens = list(range(100))
    assert sql.keys(tokens) == BlockHasher(LLAMA, 16, "fleet-a").keys(tokens, lora_name="sql-lora")
    assert sql.keys(tokens) != llama.hasher.keys(tokens)
    assert cat.resolve("nobody-lora") is None
    assert cat.resolve("listed-lora", listed_parent=QWEN) is not None


def test_toml_and_yaml_examples_are_the_same(tmp_path: Path) -> None:
    loaded = []
    for lang in ("toml", "yaml"):
        p = tmp_path / f"c.{lang}"
        p.write_text(doc_block(lang), encoding="utf-8")
        loaded.append(RouterSettings.load(None, {}, config=str(p)))
    a, b = loaded
    assert a.with_(config="") == b.with_(config="")
    assert a.model_configs == b.model_configs


def test_environment_and_flags_win_and_lists_add_up(example: Path) -> None:
    env = {"KVR_CONFIG": str(example), "KVR_POLICY": "least_load", "KVR_MODEL": "extra-model"}
    s = RouterSettings.load(flags(["--lora-placement", "loaded_only"]), env)
    assert s.policy == "least_load"  # env over file
    assert s.lora_placement == "loaded_only"  # flag over file
    assert s.models[-1] == "extra-model" and LLAMA in s.models
    extra = s.catalogue().bases["extra-model"]
    assert (extra.block_size, extra.hash_seed) == (16, "")  # router-wide settings


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[router]\nno_such = 1\n[[models]]\nname = "m"\n', "no_such"),
        ('[router]\nmodels = "m"\n', "[[models]]"),
        ('[[models]]\nname = "m"\nblock_size = "big"\n', "block_size"),
        ('[[models]]\nname = "m"\nblock_size = 0\n', "block_size"),
        ('[[models]]\nname = "m"\nchat_template_content_format = "html"\n', "content_format"),
        ('[[models]]\nname = "a"\nparent = "m"\ntokenizer = "x"\n', "tokenizer"),
        ('[[models]]\nname = "a"\nparent = "ghost"\n', "ghost"),
        ('[[models]]\nname = "m"\n[[models]]\nname = "m"\n', "unique"),
        ('[[models]]\nname = "m{x}"\n', "brace"),
        ('[[models]]\nname = "m"\n[[workers]]\nurl = "ftp://x"\n', "workers"),
        ('[[models]]\nname = "m"\n[[workers]]\nurl = "http://x:1"\nport = 3\n', "port"),
        ('[[models]]\nname = "m"\n[router]\nlora_placement = "anywhere"\n', "--lora-placement"),
        ("models = [", "invalid TOML"),
        ("[elsewhere]\n", "elsewhere"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, named: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(SettingsError) as e:
        RouterSettings.load(None, {}, config=str(p))
    assert "KVR_CONFIG / --config" in str(e.value) or "KVR_LORA_PLACEMENT" in str(e.value)
    assert named in str(e.value)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        RouterSettings.load(None, {}, config=str(tmp_path / "none.toml"))
    p = tmp_path / "c.ini"
    p.write_text("", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"\.toml, \.yaml or \.yml"):
        RouterSettings.load(None, {}, config=str(p))


def test_adapter_config_needs_a_base_parent() -> None:
    with pytest.raises(SettingsError, match="not a configured base model"):
        RouterSettings(models=("m", "a", "b"), model_configs=(
            ModelConfig("a", parent="m"), ModelConfig("b", parent="a"),
        ))  # fmt: skip
