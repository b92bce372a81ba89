"""A model's chat template, read through its tokenizer: whether it has a system role, and how many
tokens it renders a conversation into (or why it refuses it). The app checks every conversation
with these before any weights load."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2.exceptions import TemplateError

from runner.inputs.conversation import Message

_SENTINEL = "chat-runner system-role probe"


def template_supports_system_role(tokenizer: Any) -> bool:
    """Render a probe chat: a template without a system role raises or drops the system text."""
    probe = [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return _SENTINEL in rendered


def template_tokens(tokenizer: Any, messages: Sequence[Message]) -> int | str:
    """How many tokens the chat template renders these messages into, or, when the template
    refuses them, its error message."""
    try:
        rendered = tokenizer.apply_chat_template([m.as_dict() for m in messages], return_dict=True)
    except TemplateError as error:
        return str(error)
    return len(rendered["input_ids"])
