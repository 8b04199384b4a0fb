"""Real tokenizers built locally, for tests, benchmarks and the demo (no model download).

`build_test_tokenizer(directory, kind=...)` trains a small BPE tokenizer with the `tokenizers`
library on a synthetic corpus and writes a model directory like the ones engines load:
`tokenizer.json` plus `tokenizer_config.json` with special tokens and a chat template.

- kind="llama3": byte-level BPE with a Llama-3-style split regex and special tokens
  `<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`...; the
  post-processor adds BOS; a Llama-3-shaped chat template with tool support.
- kind="qwen": the same byte-level BPE with ChatML special tokens (`<|im_start|>`,
  `<|im_end|>`, `<|endoftext|>`), no BOS, and a Qwen-shaped template: string content joined
  with `+`, tools in `<tools>`, RAG `documents`, tool calls printed with their arguments
  through `tojson`, an `enable_thinking` switch.
- kind="deepseek": the same byte-level BPE with DeepSeek-style full-width special tokens
  (`<｜begin▁of▁sentence｜>`, `<｜User｜>`, `<｜Assistant｜>`, tool-call markers), BOS added by
  the post-processor and written by the template, system prompts gathered with a namespace.
- kind="sentencepiece": SentencePiece-style BPE (Metaspace "▁", prepend_scheme "first",
  `<unk>` for unseen characters) with `<s>`, `</s>`, `[INST]`, `[/INST]` and a Mistral-shaped
  `[INST] ... [/INST]` template.

The same inputs give byte-identical files, so tests and benchmarks are reproducible.
"""

# DeepSeek's special tokens use FULLWIDTH VERTICAL LINE on purpose (that is the real spelling).
# ruff: noqa: RUF001, RUF002

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

Kind = Literal["llama3", "sentencepiece", "qwen", "deepseek"]
KINDS: tuple[Kind, ...] = ("llama3", "sentencepiece", "qwen", "deepseek")

# The split pattern of Llama-3-style byte-level tokenizers (contractions, letter runs, up to
# three digits, punctuation runs with trailing newlines, newline runs, other whitespace).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(24)),
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEEPSEEK_SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
SENTENCEPIECE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")

LLAMA3_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {{- 'You may call these functions. Reply with {"name": ..., "parameters": ...}.\\n\\n' }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=4) + '\\n\\n' }}
    {%- endfor %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- for call in message['tool_calls'] | default([]) %}
        {{- '{"name": "' + call.function.name + '", "parameters": ' }}
        {{- call.function.arguments | tojson + '}' }}
    {%- endfor %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- if documents %}
    {{- '<|im_start|>system\\n# Documents' }}
    {%- for doc in documents %}
        {{- '\\n## ' + doc.title + '\\n' + doc.text }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls | default([]) %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
        {{- '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

DEEPSEEK_CHAT_TEMPLATE = """\
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = ns.system + message['content'] %}
    {%- endif %}
{%- endfor %}
{{- bos_token + ns.system }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined %}
        {{- '<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜>' }}
        {%- for tool in message['tool_calls'] %}
            {{- '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' }}
            {{- tool['function']['name'] + '\\n```json\\n' }}
            {{- tool['function']['arguments'] | tojson + '\\n```<｜tool▁call▁end｜>' }}
        {%- endfor %}
        {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}
    {%- elif message['role'] == 'tool' %}
        {{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜>' }}
{%- endif %}
"""

SENTENCEPIECE_CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] + '\\n\\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Roles must alternate user/assistant/user/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# A small, fixed vocabulary of English, code and a few other scripts: the corpus and the
# benchmark's conversations are drawn from it, so every character the tests use is seen.
# One spaced string reads better than two hundred quoted words.
_WORDS = (  # noqa: SIM905
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three router cache token prefix "
    "worker request latency prompt model block hash redis cluster replica stream engine batch "
    "queue memory throughput decode prefill scheduler tensor kernel context window session "
    "résumé naïve café über straße déjà vu 東京 中文 日本語 한국어 Привет мир γεια σου "
    "def return import class self None True False async await lambda yield print json dict list "
    "system user assistant tool function call arguments result error answer question please"
).split()
# Syllables for rarer made-up words (names, jargon), so that text is not a closed vocabulary
# and the BPE model meets words it has not cached, as it does on real prompts.
_SYLLABLES = (  # noqa: SIM905
    "ka lo mi ne ru ta shi do ve ba zen qua ex pro tion ing er al con tri mor vek lan sor "
    "pha gri stu ble nox quin dra fel mun"
).split()
_PUNCT = (".", ",", "!", "?", ";", ":", " -", "...", ")", "(", '"', "'s", "'re", "'ll")
_SNIPPETS = (
    "def f(x):\n    return x + 1\n",
    '{"key": "value", "n": 42, "ok": true}',
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT id, name FROM users WHERE age > 30;",
    "    indented line\n\tand a tab\n",
    "emoji 🙂🚀 and symbols © ® ™ € £ ¥ ½",
    "numbers 0 7 42 1234 3.14159 2025-01-31 10:45:00",
    "line one\r\nline two\r\n\r\nline four",
)


def synthetic_text(rng: random.Random, n_words: int) -> str:
    """Prose-like text of about `n_words` words: sentences, paragraphs, now and then a code
    or number snippet, drawn from a fixed vocabulary with `rng` (deterministic per seed)."""
    parts: list[str] = []
    words = 0
    while words < n_words:
        if rng.random() < 0.06:
            parts.append(rng.choice(_SNIPPETS))
            words += 8
            continue
        length = rng.randint(4, 18)
        sentence = " ".join(
            rng.choice(_WORDS)
            if rng.random() < 0.8
            else "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
            for _ in range(length)
        )
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(_PUNCT[:4])
        parts.append(sentence)
        words += length
        parts.append("\n\n" if rng.random() < 0.15 else " ")
    return "".join(parts).strip()


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [synthetic_text(rng, rng.randint(20, 120)) for _ in range(1500)]
    lines += list(_SNIPPETS) * 20
    return lines


def _train_llama3(
    vocab_size: int,
    seed: int,
    special_tokens: tuple[str, ...] = LLAMA3_SPECIAL_TOKENS,
    bos: str | None = "<|begin_of_text|>",
) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    if bos is None:  # Qwen-style: no BOS at all
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, _id(tok, bos))],
            ),
        ]
    )
    return tok


def _train_sentencepiece(vocab_size: int, seed: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SENTENCEPIECE_SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", _id(tok, "<s>"))]
    )
    return tok


def _id(tok: HFTokenizer, content: str) -> int:
    token_id = tok.token_to_id(content)
    if token_id is None:  # pragma: no cover - the trainer always adds its special tokens
        raise RuntimeError(f"{content!r} missing after training")
    return token_id


def _added_tokens_decoder(tok: HFTokenizer) -> dict[str, dict[str, Any]]:
    return {
        str(token_id): {
            "content": added.content,
            "lstrip": added.lstrip,
            "normalized": added.normalized,
            "rstrip": added.rstrip,
            "single_word": added.single_word,
            "special": added.special,
        }
        for token_id, added in sorted(tok.get_added_tokens_decoder().items())
    }


def build_test_tokenizer(
    directory: str | Path, kind: Kind = "llama3", *, vocab_size: int = 4000, seed: int = 0
) -> Path:
    """Train a tokenizer of `kind` and write tokenizer.json and tokenizer_config.json into
    `directory` (created if needed). Returns the directory. Takes well under a second."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if vocab_size < 400:
        raise ValueError("vocab_size must be at least 400 (the byte alphabet plus merges)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any]
    if kind == "llama3":
        tok = _train_llama3(vocab_size, seed)
        config = {
            "bos_token": "<|begin_of_text|>",
            # An AddedToken-style object, as many published configs store it.
            "eos_token": {
                "__type": "AddedToken",
                "content": "<|eot_id|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "chat_template": LLAMA3_CHAT_TEMPLATE,
        }
    elif kind == "qwen":
        tok = _train_llama3(vocab_size, seed, QWEN_SPECIAL_TOKENS, bos=None)
        config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": QWEN_CHAT_TEMPLATE,
        }
    elif kind == "deepseek":
        bos = DEEPSEEK_SPECIAL_TOKENS[0]
        tok = _train_llama3(vocab_size, seed, DEEPSEEK_SPECIAL_TOKENS, bos=bos)
        config = {
            "bos_token": bos,
            "eos_token": DEEPSEEK_SPECIAL_TOKENS[1],
            "chat_template": DEEPSEEK_CHAT_TEMPLATE,
        }
    else:
        tok = _train_sentencepiece(vocab_size, seed)
        config = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "chat_template": SENTENCEPIECE_CHAT_TEMPLATE,
        }
    config["added_tokens_decoder"] = _added_tokens_decoder(tok)
    config["model_max_length"] = 131072
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Serialise through json with sorted keys so the files are byte-stable across runs.
    tokenizer_json = json.loads(tok.to_str())
    (out / "tokenizer.json").write_text(
        json.dumps(tokenizer_json, ensure_ascii=False, indent=1, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return out
