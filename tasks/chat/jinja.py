"""Render a Jinja chat template as transformers does, for templates that come without a tokenizer.

transformers' own renderer (`render_jinja_template`: the sandboxed environment, `raise_exception`,
`strftime_now`, loop controls, its `tojson`) is what `apply_chat_template` runs, so a template found in a
GGUF or a Modelfile plan renders here exactly as it would for the HF tokenizer given the same special
tokens. Errors the template raises on purpose ("System role not supported") come back as
`TemplateRefused` so callers can tell a refusal from a broken template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TemplateRefused(Exception):
    """The chat template raised for this conversation (e.g. a role it does not support)."""


def render_jinja(
    template: str,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """The prompt text `template` makes of `messages` (transformers' renderer, given these special tokens)."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[list(messages)],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except jinja2.TemplateSyntaxError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateRefused(str(exc)) from None
    return rendered[0]
