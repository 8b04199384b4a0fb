"""Chat templates rendered the way Hugging Face transformers renders them.

The engine (vLLM, SGLang) renders with transformers, so the router must reproduce its jinja2
environment exactly or the prompt, and with it every block key, differs: an immutable
sandbox with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`{% generation %}` block tag (used by templates that mark assistant turns; it renders its body
unchanged), a `tojson` filter that does not escape HTML and keeps non-ASCII text, and the
globals `raise_exception` and `strftime_now`. Variables: `messages`, `tools`, `documents`,
`add_generation_prompt`, the special-token strings (`bos_token`, `eos_token`, ...) and any
extra keyword arguments, which override the special tokens as they do in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvrouter.tokenizer.errors import ChatTemplateError

# Names the renderer sets itself; a caller's extra kwargs may not shadow them.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant tokens
    for training masks; for rendering it is transparent."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares this as a plain class attribute

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        body: list[jinja2.nodes.Node] = parser.parse_statements(
            ("name:endgeneration",), drop_needle=True
        )
        return body


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and ' which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_environment() -> ImmutableSandboxedEnvironment:
    """A jinja2 environment configured as transformers configures its chat-template one."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplates:
    """A model's compiled chat templates (one "default" or several named ones)."""

    def __init__(self, sources: Mapping[str, str], special_tokens: Mapping[str, Any]) -> None:
        """Compile every template now, so a broken one fails at start-up and not per request.

        Raises `jinja2.TemplateSyntaxError`; the loader turns it into a TokenizerLoadError.
        """
        env = make_environment()
        self._sources = dict(sources)
        self._templates: dict[str, jinja2.Template] = {}
        for name, source in sources.items():
            try:
                self._templates[name] = env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                exc.name = name
                raise
        self._special_tokens = dict(special_tokens)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the available templates."""
        return tuple(self._templates)

    def select(self, template_name: str | None, tools: object) -> jinja2.Template:
        """Pick a template as transformers does: the named one if asked; otherwise "tool_use"
        when tools are given and such a template exists; otherwise "default"."""
        return self._templates[self.select_name(template_name, tools)]

    def source(self, name: str) -> str:
        """The jinja source of the template called `name`."""
        return self._sources[name]

    def select_name(self, template_name: str | None, tools: object) -> str:
        """The name of the template `select` picks (raises ChatTemplateError like it)."""
        if not self._templates:
            raise ChatTemplateError(
                "this model has no chat template; send a completions request with a prompt instead"
            )
        if template_name is not None:
            if template_name not in self._templates:
                raise ChatTemplateError(
                    f"unknown chat template {template_name!r}; available: {', '.join(self.names)}"
                )
            return template_name
        if tools is not None and "tool_use" in self._templates:
            return "tool_use"
        if "default" in self._templates:
            return "default"
        raise ChatTemplateError(
            f"this model has several chat templates and no default; choose one of: "
            f"{', '.join(self.names)}"
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        template_name: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render a conversation to the prompt string the engine would build.

        Raises ChatTemplateError for every failure a request can cause: bad message shapes,
        `raise_exception` in the template, undefined variables used as values, type errors
        inside the template, sandbox violations.
        """
        _check_messages(messages)
        extra = dict(template_kwargs or {})
        clash = RESERVED_TEMPLATE_VARIABLES.intersection(extra)
        if clash:
            raise ChatTemplateError(
                f"chat template arguments may not redefine {', '.join(sorted(clash))}"
            )
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be true"
            )
        template = self.select(template_name, tools)
        if continue_final_message:
            messages = _tag_final_message(messages)
        variables: dict[str, Any] = {**self._special_tokens, **extra}
        try:
            rendered = template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc.message or exc}") from None
        except RecursionError:
            raise ChatTemplateError("chat template error: recursion too deep") from None
        except Exception as exc:
            # Anything else raised while evaluating the template comes from the request's
            # content meeting the template (a number where a string was expected, a missing
            # key): it is the client's to fix, so it must not become a 500.
            raise ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}") from None
        if continue_final_message:
            rendered = _cut_at_tag(rendered)
        return rendered


def _check_messages(messages: object) -> None:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of message objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object")


# What transformers appends to the final message's text before rendering when asked to
# continue it; the prompt ends where the tag begins. Matching it exactly matters: the old rule
# (find the stripped content, cut after it) cuts in the wrong place when the content is only
# whitespace or also appears later, for example inside the end-of-turn marker.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A copy of `messages` whose final message's text ends with CONTINUE_TAG: appended to
    the content string, or to the last text part of a content list. The caller's messages
    are not touched."""
    if not messages:
        raise ChatTemplateError("continue_final_message needs at least one message")
    final = dict(messages[-1])
    content = final.get("content")
    if isinstance(content, list | tuple):
        parts = list(content)
        for i in range(len(parts) - 1, -1, -1):
            part = parts[i]
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts[i] = {**part, "text": part["text"] + CONTINUE_TAG}
                break
        else:
            raise ChatTemplateError(
                "continue_final_message: the final message has no text to continue"
            )
        final["content"] = parts
    elif isinstance(content, str):
        final["content"] = content + CONTINUE_TAG
    else:
        raise ChatTemplateError("continue_final_message: the final message has no text content")
    return [*messages[:-1], final]


def _cut_at_tag(rendered: str) -> str:
    """Drop the tag and whatever the template wrote after it (an end-of-turn token), so the
    model continues the final message; transformers' rule: when the template kept the tag's
    trailing space the text before the tag is kept as is, otherwise the template trimmed the
    message and its trailing whitespace is dropped too."""
    tag = CONTINUE_TAG.strip()
    if tag not in rendered:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not reproduce the final message"
        )
    at = rendered.rindex(tag)
    if rendered.startswith(CONTINUE_TAG, at):
        return rendered[:at]
    return rendered[:at].rstrip()
