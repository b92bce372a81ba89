"""A run's workload: its input files read and validated, this shard's conversations, the rejected
lines, the records an earlier session of the run left (on resume), and the context each row needs
once the chat template has measured every conversation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.config.schema import OnError, RunConfig
from runner.engines.chat_template import template_supports_system_role, template_tokens
from runner.errors import InputError
from runner.inputs.conversation import Conversation
from runner.inputs.reader import read_conversations, resolve_input_files
from runner.inputs.rejects import Rejected
from runner.replay import final_shape, replies_to_generate

log = logging.getLogger(__name__)

# How the memory plan's context per row was found.
MEASURED_CONTEXT = "the longest conversation + max_new_tokens per reply"
ESTIMATED_CONTEXT = "estimated as characters / 3 + max_new_tokens per reply"


@dataclass
class Workload:
    """What a run replays, and what it found wrong or already done."""

    files: list[Path]
    conversations: list[Conversation]  # this shard's, in input order
    rejected: list[Rejected]
    kept: list[dict[str, Any]] = field(default_factory=list)  # records of an earlier session (resume)
    context_tokens: int = 0  # the longest conversation's final length, replies included
    context_from: str = ""  # how context_tokens was found

    def planned_replies(self, cfg: RunConfig) -> int:
        """Replies the whole run generates (kept records included), for progress totals."""
        per_sample = sum(replies_to_generate(c, cfg.replay.mode) for c in self.conversations)
        return cfg.generation.num_samples * per_sample

    def streams(self, cfg: RunConfig) -> int:
        """(conversation, sample) pairs: how many rows could ever be in flight at once."""
        return len(self.conversations) * cfg.generation.num_samples


def read_workload(cfg: RunConfig) -> Workload:
    """Every input file read and validated (this shard's conversations), before the model is touched."""
    files = resolve_input_files(cfg.input.path)
    conversations, rejected = read_conversations(files, cfg.input.format, cfg.input.max_line_bytes)
    if rejected and cfg.input.on_error is OnError.fail:
        raise InputError([str(reject) for reject in rejected])
    if not conversations and not rejected:
        raise InputError([f"no conversations in {', '.join(str(path) for path in files)}"])
    if cfg.shard.count > 1:
        conversations = conversations[cfg.shard.index :: cfg.shard.count]
        log.info("shard %d of %d: %d conversation(s)", cfg.shard.index, cfg.shard.count, len(conversations))
    return Workload(files, conversations, rejected)


def measure_with_template(workload: Workload, tokenizer: Any, cfg: RunConfig) -> None:
    """Render each conversation's final shape with the chat template once: a refusal becomes a
    reject (input.on_error=fail stops here, before any weights load), and the longest rendering plus
    max_new_tokens per reply to generate is the context the memory plan reserves per row."""
    fold = not template_supports_system_role(tokenizer)
    accepted, longest = [], 0
    for conversation in workload.conversations:
        tokens = template_tokens(tokenizer, final_shape(conversation, cfg.replay.mode, fold=fold))
        if isinstance(tokens, int):
            accepted.append(conversation)
            replies = replies_to_generate(conversation, cfg.replay.mode)
            longest = max(longest, tokens + replies * max_new_tokens(conversation, cfg))
            continue
        message = f"the model's chat template refuses this conversation: {tokens}"
        workload.rejected.append(
            Rejected.of(
                conversation.source, conversation.line, conversation.id, "template_error", message, b""
            )
        )
    workload.conversations, workload.context_tokens, workload.context_from = (
        accepted,
        longest,
        MEASURED_CONTEXT,
    )
    if workload.rejected and cfg.input.on_error is OnError.fail:
        raise InputError([str(reject) for reject in workload.rejected])


def estimate_without_template(workload: Workload, cfg: RunConfig) -> None:
    """The context per row when no tokenizer is at hand (plan=true for a hub model not cached)."""
    workload.context_tokens = max((_estimated_length(c, cfg) for c in workload.conversations), default=0)
    workload.context_from = ESTIMATED_CONTEXT


def max_new_tokens(conversation: Conversation, cfg: RunConfig) -> int:
    """A reply's token budget: the conversation's own (an OpenAI Batch request's max_tokens), else
    the run's generation.max_new_tokens."""
    return conversation.settings.get("max_new_tokens", cfg.generation.max_new_tokens)


def _estimated_length(conversation: Conversation, cfg: RunConfig) -> int:
    """A conversation's final length in tokens without a tokenizer: characters / 3 (English runs
    near 4 a token), a few tokens of template per message, max_new_tokens per reply."""
    messages = final_shape(conversation, cfg.replay.mode, fold=False)
    replies = replies_to_generate(conversation, cfg.replay.mode)
    return sum(len(m.content) // 3 + 8 for m in messages) + replies * max_new_tokens(conversation, cfg)
