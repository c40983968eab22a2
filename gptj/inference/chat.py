"""Chat templates: a conversation (OpenAI `messages`) rendered to the prompt text a model continues.

    template = ChatTemplate.load("gptj_sft")            # a built-in name, a Jinja template, or a file
    prompt = template.render([{"role": "user", "content": "Q: What is two plus two? A:"}])

Templates are Jinja, as HF tokenizers store them (`chat_template` in
tokenizer_config.json), rendered the way transformers' `apply_chat_template`
renders them: a sandboxed environment with `trim_blocks` and `lstrip_blocks`,
the loop controls extension, a `tojson` that keeps non-ASCII text as is, and
the globals `raise_exception` and `strftime_now`. A template sees `messages`
(dicts with `role` and `content`), `add_generation_prompt`, `bos_token` and
`eos_token`.

The built-in `gptj_sft` is the format the `gptj_sft` task trains on
(`gptj.data.tasks.sft`): an example is prompt + completion + EOS with nothing
between them, and packed records (`sft_pack`) put examples back to back. So
a conversation renders as its messages' contents in order, each assistant
turn followed by EOS: one user message renders to exactly its text, the
prompt that `--mode=sample` would complete, and earlier turns read like the
packed examples before it. A system message is text before the first prompt.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Sequence

from gptj.data.vocab import EOT_TOKEN
from gptj.errors import ConfigError

BUILTIN_TEMPLATES = {
    "gptj_sft": ("{% for message in messages %}{{ message['content'] or '' }}"
                 "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"),
}


class ChatTemplateError(ValueError):
    """A conversation the template refuses (its `raise_exception`) or cannot render."""


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The Jinja template of `source` in transformers' rendering environment (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_template_file(path: str) -> str:
    """The template in a .jinja (or any text) file, or the "chat_template" of a tokenizer_config.json."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"serve.chat_template: cannot read {path}: {e}") from None
    if not path.endswith(".json"):
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"serve.chat_template: {path} is not a JSON object: {e}") from None
    if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ConfigError(f"serve.chat_template: {path} has no \"chat_template\" string (or named \"default\")")
    return template


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text."""

    def __init__(self, source: str, name: str = "custom", *, bos_token: str = EOT_TOKEN,
                 eos_token: str = EOT_TOKEN):
        import jinja2

        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"serve.chat_template ({name}): not a valid Jinja template: {e}") from None
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def load(cls, spec: str, **tokens) -> ChatTemplate:
        """The template `spec` names: a built-in (BUILTIN_TEMPLATES), a file path, or the template text.

        Raises ConfigError for a spec that is none of these, an unreadable file or invalid Jinja.
        """
        if spec in BUILTIN_TEMPLATES:
            return cls(BUILTIN_TEMPLATES[spec], spec, **tokens)
        if "{{" in spec or "{%" in spec:
            return cls(spec, "inline", **tokens)
        if os.path.isfile(spec):
            return cls(_read_template_file(spec), spec, **tokens)
        raise ConfigError(f"serve.chat_template: {spec!r} is no built-in template "
                          f"({', '.join(sorted(BUILTIN_TEMPLATES))}), no file and no Jinja template")

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (dicts with at least "role" and "content").

        Raises ChatTemplateError when the template rejects the conversation.
        """
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...), a sandbox violation, a bad lookup
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
