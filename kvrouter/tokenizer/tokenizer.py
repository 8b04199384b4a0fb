"""The router's tokenizer: engine-exact token ids for prompts and chats, with a segment cache.

Usage::

    tok = Tokenizer.load("/models/llama-3/")         # tokenizer.json (+ tokenizer_config.json)
    ids = tok.encode_chat(messages)                   # template rendered, no special tokens added
    ids = tok.encode_prompt("Once upon a time")       # post-processor specials (BOS) added
    ids = tok.validate_token_ids(prompt_ids)          # pre-tokenized prompt, checked

Chat and completions follow vLLM's defaults: a rendered chat is tokenized with
`add_special_tokens=False` (the template already wrote BOS), a plain prompt with
`add_special_tokens=True`. Both accept the request's own `add_special_tokens` override.

Text is split at added tokens and each piece's ids are cached (see segments.py for why that
is exact and when it is not used), so turn N of a conversation tokenizes only what is new.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Encoding
from tokenizers import Tokenizer as HFTokenizer

from kvrouter.tokenizer.cache import CacheStats, SegmentCache
from kvrouter.tokenizer.chat_template import ChatTemplates
from kvrouter.tokenizer.errors import (
    InvalidTokenIdsError,
    TokenizationRequestError,
    TokenizerLoadError,
)
from kvrouter.tokenizer.loading import TokenizerFiles, read_tokenizer_files
from kvrouter.tokenizer.preprocess import (
    CONTENT_FORMATS,
    ContentFormat,
    detect_content_format,
    prepare_messages,
    prepare_tools,
    template_kwargs,
)
from kvrouter.tokenizer.segments import (
    AddedTokenRule,
    AddedTokenSplitter,
    SpecialAffixes,
    analyze,
    post_processor_affixes,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE_ENTRIES = 65_536
# About 36 bytes per cached token on CPython: roughly 36 MB at this bound.
DEFAULT_CACHE_TOKENS = 1_000_000

_BatchEncode = Callable[..., list[Encoding]]


def _prepare_backend(source: str, split_special_tokens: bool) -> HFTokenizer:
    backend = HFTokenizer.from_str(source)
    # transformers turns truncation and padding off for every call that does not ask for
    # them, and engines do not ask; tokenizer.json may still carry them from training.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special_tokens
    return backend


def _batch_encoder(backend: HFTokenizer) -> _BatchEncode:
    # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, which is about 40% of
    # the cost of encoding; the ids are the same.
    fast: _BatchEncode | None = getattr(backend, "encode_batch_fast", None)
    return fast if fast is not None else backend.encode_batch


class Tokenizer:
    """Engine-exact tokenization for one model. Safe to share between threads."""

    def __init__(
        self,
        files: TokenizerFiles,
        *,
        segment_cache: bool = True,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        content_format: str = "auto",
    ) -> None:
        """Build from parsed files; most callers want `Tokenizer.load(path)`.

        `content_format` is the chat template content format: "auto" detects it from the
        template as vLLM does; "string" or "openai" override it (vLLM's
        ``--chat-template-content-format``)."""
        if content_format not in CONTENT_FORMATS:
            raise ValueError(
                f"content_format must be one of {', '.join(CONTENT_FORMATS)}, "
                f"not {content_format!r}"
            )
        self._content_format = content_format
        self.path = files.path
        try:
            backend = _prepare_backend(files.tokenizer_json, files.split_special_tokens)
        except Exception as exc:  # tokenizers raises a bare Exception for bad JSON content
            raise TokenizerLoadError(
                files.tokenizer_json_path, f"tokenizers cannot load it: {exc}"
            ) from None
        added = _add_config_tokens(backend, files)
        if added:
            # tokenizer.json lacks tokens that tokenizer_config.json declares; transformers
            # (and so the engine) adds them at load, and they change how text is split.
            log.info(
                "%s: added tokens declared only in tokenizer_config.json: %s", self.path, added
            )
        self._backend = backend
        self._batch = _batch_encoder(backend)
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

        template_vars: dict[str, Any] = dict(files.special_tokens)
        template_vars["additional_special_tokens"] = list(files.additional_special_tokens)
        self._special_tokens = dict(files.special_tokens)
        try:
            self._templates = ChatTemplates(files.chat_templates, template_vars)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerLoadError(
                files.chat_template_origin or files.path,
                f"chat template {exc.name!r}, line {exc.lineno}: syntax error: {exc.message}",
            ) from None

        parsed = json.loads(backend.to_str())
        rules = tuple(
            AddedTokenRule(
                content=tok.content,
                id=token_id,
                normalized=tok.normalized,
                lstrip=tok.lstrip,
                rstrip=tok.rstrip,
                single_word=tok.single_word,
                special=tok.special,
            )
            for token_id, tok in sorted(backend.get_added_tokens_decoder().items())
        )
        self._affixes: SpecialAffixes | None = post_processor_affixes(parsed.get("post_processor"))
        self._splitter: AddedTokenSplitter | None = None
        self._inner_batch: _BatchEncode = self._batch
        self._start_sensitive = False
        self._fallback_reason: str | None = "segment cache disabled by configuration"
        if segment_cache:
            plan = analyze(parsed, rules, encode_special_tokens=files.split_special_tokens)
            self._fallback_reason = plan.reason
            if plan.exact:
                self._splitter = AddedTokenSplitter(plan.rules)
                self._start_sensitive = plan.start_sensitive
                if plan.inner_tokenizer_json is not None:
                    inner = _prepare_backend(plan.inner_tokenizer_json, files.split_special_tokens)
                    self._inner_batch = _batch_encoder(inner)
        self._cache = SegmentCache(cache_entries, cache_tokens)
        self._self_check(rules)
        self._cache = SegmentCache(cache_entries, cache_tokens)
        if segment_cache and self._splitter is None:
            log.warning(
                "%s: segment cache off, tokenizing whole strings: %s",
                self.path,
                self._fallback_reason,
            )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        segment_cache: bool = True,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        content_format: str = "auto",
    ) -> Tokenizer:
        """Load from a tokenizer.json file or a model directory. Raises TokenizerLoadError.

        `segment_cache=False` always tokenizes whole strings (the reference path);
        `cache_entries` and `cache_tokens` bound the segment cache; `content_format` as
        for the constructor.
        """
        return cls(
            read_tokenizer_files(path),
            segment_cache=segment_cache,
            cache_entries=cache_entries,
            cache_tokens=cache_tokens,
            content_format=content_format,
        )

    # -- facts about the tokenizer -------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id, added tokens included."""
        return self._vocab_size

    @property
    def segmented(self) -> bool:
        """True when text is tokenized per cached segment, False on the whole-string path."""
        return self._splitter is not None

    @property
    def fallback_reason(self) -> str | None:
        """Why the segment cache is not used for this tokenizer (None when it is)."""
        return None if self._splitter is not None else self._fallback_reason

    @property
    def special_tokens(self) -> Mapping[str, str]:
        """The special-token strings from the config (bos_token, eos_token, ...)."""
        return dict(self._special_tokens)

    @property
    def chat_template_names(self) -> tuple[str, ...]:
        """Names of the chat templates; empty when the model has none."""
        return self._templates.names

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for decoding); do not reconfigure it."""
        return self._backend

    def content_format(
        self, template_name: str | None = None, tools: object = None
    ) -> ContentFormat:
        """The content format chats are rendered with: the configured one, or the one vLLM
        detects from the template chosen for `template_name` and `tools`."""
        if self._content_format != "auto":
            return self._content_format  # type: ignore[return-value]
        name = self._templates.select_name(template_name, tools)
        return detect_content_format(self._templates.source(name))

    def cache_stats(self) -> CacheStats:
        """Segment cache counters for metrics."""
        return self._cache.stats()

    def clear_cache(self) -> None:
        """Empty the segment cache (counters are kept)."""
        self._cache.clear()

    # -- the router's calls --------------------------------------------------------------

    def encode_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completions prompt, as the engine computes them."""
        if not isinstance(text, str):
            raise TokenizationRequestError("prompt must be a string")
        return self._encode(text, add_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        /,
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt string the chat template makes of `messages`, after vLLM's message
        preprocessing (content parts, tool-call arguments, tools; see preprocess.py).

        Raises ChatTemplateError or TokenizationRequestError for what the engine would
        reject, UntokenizableContent for media parts."""
        fmt = self.content_format(template_name, tools)
        return self._templates.render(
            prepare_messages(messages, fmt),
            add_generation_prompt=add_generation_prompt,
            tools=prepare_tools(tools),
            documents=documents,
            continue_final_message=continue_final_message,
            template_name=template_name,
            template_kwargs=template_kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        /,
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        template_name: str | None = None,
        add_special_tokens: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of a chat request: the rendered template, tokenized without adding
        special tokens again (vLLM's default for chat)."""
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            template_name=template_name,
            **template_kwargs,
        )
        return self._encode(text, add_special_tokens)

    def encode_chat_request(self, body: Mapping[str, Any]) -> list[int]:
        """Token ids of a chat completions request body, as vLLM computes them: the
        request-level switches (add_generation_prompt, continue_final_message, documents,
        reasoning_effort, add_special_tokens) merged over ``chat_template_kwargs``, which are
        filtered to what the template reads; messages and tools preprocessed.

        Raises TokenizationRequestError (UntokenizableContent for media parts)."""
        tools = body.get("tools")
        source = self._templates.source(self._templates.select_name(None, tools))
        kwargs, add_generation_prompt, continue_final, documents = template_kwargs(body, source)
        add_special = body.get("add_special_tokens", False)
        if not isinstance(add_special, bool):
            raise TokenizationRequestError("add_special_tokens must be a boolean")
        return self.encode_chat(
            body.get("messages"),  # type: ignore[arg-type]  # prepare_messages checks it
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final,
            add_special_tokens=add_special,
            **kwargs,
        )

    def validate_token_ids(self, ids: object) -> list[int]:
        """A pre-tokenized prompt, checked: a list of ints in [0, vocab_size).

        Raises InvalidTokenIdsError naming the first bad position. Booleans and floats are
        rejected even though Python would treat some of them as integers.
        """
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
            raise InvalidTokenIdsError("a pre-tokenized prompt must be a list of integers")
        # Fast path in C for the common, valid case; the slow scan only finds the culprit.
        if not ids or (
            set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < self._vocab_size
        ):
            return list(ids)
        for i, value in enumerate(ids):
            if type(value) is not int:
                raise InvalidTokenIdsError(f"prompt[{i}] is not an integer")
            if not 0 <= value < self._vocab_size:
                raise InvalidTokenIdsError(
                    f"prompt[{i}] = {value} is outside the vocabulary [0, {self._vocab_size})"
                )
        raise AssertionError("unreachable: the fast check failed but no id is bad")

    def encode_uncached(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Whole-string tokenization without the segment cache: the reference path."""
        ids: list[int] = self._batch([text], add_special_tokens=add_special_tokens)[0].ids
        return ids

    # -- internals -------------------------------------------------------------------------

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._splitter is None or (add_special_tokens and self._affixes is None):
            return self.encode_uncached(text, add_special_tokens=add_special_tokens)
        body = self._encode_segments(self._splitter, text)
        if add_special_tokens and self._affixes is not None:
            return [*self._affixes.prefix, *body, *self._affixes.suffix]
        return body

    def _encode_segments(self, splitter: AddedTokenSplitter, text: str) -> list[int]:
        pieces = splitter.split(text)
        keys: list[Hashable] = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, str):
                # A start-sensitive tokenizer encodes the piece at offset 0 differently from
                # the same text elsewhere; a 1-tuple key never equals a str key.
                keys.append((piece,) if i == 0 and self._start_sensitive else piece)
        found = self._cache.get_many(keys)
        missing = {key: j for j, key in enumerate(keys) if found[j] is None}
        if missing:
            computed = self._tokenize_missing(list(missing))
            self._cache.put_many(computed.items())
            for j, key in enumerate(keys):
                if found[j] is None:
                    found[j] = computed[key]
        out: list[int] = []
        j = 0
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
            else:
                ids = found[j]
                assert ids is not None
                out.extend(ids)
                j += 1
        return out

    def _tokenize_missing(self, keys: list[Hashable]) -> dict[Hashable, tuple[int, ...]]:
        at_start = [k for k in keys if isinstance(k, tuple)]
        inner = [k for k in keys if isinstance(k, str)]
        result: dict[Hashable, tuple[int, ...]] = {}
        if at_start:
            encodings = self._batch([k[0] for k in at_start], add_special_tokens=False)
            result.update(zip(at_start, (tuple(e.ids) for e in encodings), strict=True))
        if inner:
            encodings = self._inner_batch(inner, add_special_tokens=False)
            result.update(zip(inner, (tuple(e.ids) for e in encodings), strict=True))
        return result

    def _self_check(self, rules: Sequence[AddedTokenRule]) -> None:
        """Compare the segment path with the whole-string path on probes built from this
        tokenizer's own added tokens. analyze() is the proof; this guards against a
        tokenizers release that changes behaviour under it."""
        contents = [r.content for r in rules if r.content][:16]
        texts = ["Hello world", " two  spaces\n\nnew line", "émoji 🙂 中文 tab\tend", "x"]
        probes = list(texts)
        for k, content in enumerate(contents):
            a, b = texts[k % len(texts)], texts[(k + 1) % len(texts)]
            probes += [
                f"{a}{content}{b}",
                f"{content}{a} {content} {b}{content}",
                f" {content}  {a}\n",
            ]
        if self._splitter is not None:
            for probe in probes * 2:  # twice: the second round is served from the cache
                whole = self.encode_uncached(probe, add_special_tokens=False)
                if self._encode_segments(self._splitter, probe) != whole:
                    self._splitter = None
                    self._fallback_reason = f"load-time self-check disagreed on {probe!r}"
                    log.error("%s: segment path disabled: %s", self.path, self._fallback_reason)
                    break
        if self._affixes is not None:
            for probe in probes:
                body = self.encode_uncached(probe, add_special_tokens=False)
                full = self.encode_uncached(probe, add_special_tokens=True)
                if [*self._affixes.prefix, *body, *self._affixes.suffix] != full:
                    log.warning(
                        "%s: post-processor is not a fixed prefix/suffix; prompts with special "
                        "tokens are tokenized whole",
                        self.path,
                    )
                    self._affixes = None
                    break


def _add_config_tokens(backend: HFTokenizer, files: TokenizerFiles) -> list[str]:
    """Add tokens that tokenizer_config.json declares and tokenizer.json does not have as
    added tokens, the way transformers' fast tokenizer does when it loads the directory."""
    existing = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    new: dict[str, AddedToken] = {}
    for declared in files.config_added_tokens:
        if declared.content and declared.content not in existing:
            new.setdefault(
                declared.content,
                AddedToken(
                    declared.content,
                    single_word=declared.single_word,
                    lstrip=declared.lstrip,
                    rstrip=declared.rstrip,
                    normalized=declared.normalized,
                    special=declared.special,
                ),
            )
    for content in (*files.special_tokens.values(), *files.additional_special_tokens):
        if content and content not in existing:
            new.setdefault(content, AddedToken(content, special=True, normalized=False))
    if new:
        backend.add_tokens(list(new.values()))
    return list(new)
