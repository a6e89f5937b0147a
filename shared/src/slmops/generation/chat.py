"""Chat messages → the prompt text a model was trained on, through its own chat template.

Templates are Jinja2, as Hugging Face tokenizers ship them, rendered the way transformers'
``apply_chat_template`` renders them (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the
``raise_exception`` / ``strftime_now`` globals and a ``tojson`` that keeps non-ASCII text). The
template comes from a model file, so it is untrusted code: it runs in Jinja2's immutable
sandbox, which refuses attribute access to Python internals and mutation of the inputs.

A model without a template (a base model like gemma-3-270m) gets :data:`FALLBACK_TEMPLATE`, a
plain "role: content" transcript, and the caller is told (``Prompt.template``): llama.cpp's
server falls back to ChatML, which a model never trained on it reads as noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or it is broken)."""


#: The fallback transcript's next turn: where a base model's answer ends.
FALLBACK_STOPS = ("\nuser:",)


@dataclass(frozen=True)
class Prompt:
    text: str
    template: str  # "model" or "fallback"
    stops: tuple[str, ...] = ()  # stop strings the template implies


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    template: str | None,
    special_tokens: Mapping[str, str],
    *,
    add_generation_prompt: bool = True,
) -> Prompt:
    """The prompt text for ``messages`` (``{"role": ..., "content": ...}`` dicts)."""
    import jinja2

    source = template or FALLBACK_TEMPLATE
    try:
        compiled = _compile(source)
        text = compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template refused the messages: {exc}") from exc
    if template:
        return Prompt(text, "model")
    return Prompt(text, "fallback", FALLBACK_STOPS)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc
