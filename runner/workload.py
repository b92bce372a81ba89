"""A run's workload: its input files read and validated in one streaming pass, this shard's
conversations (held as where they are), the rejected lines, the records an earlier session of the
run left (on resume), and the context each row needs once the chat template has measured it."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.config.schema import OnError, ReplayMode, RunConfig
from runner.engines.chat_template import template_supports_system_role, template_tokens
from runner.errors import InputError
from runner.inputs.conversation import Conversation
from runner.inputs.reader import resolve_input_files, scan_conversations
from runner.inputs.rejects import Rejected
from runner.inputs.store import StoredConversations
from runner.replay import REPLY_PLACEHOLDER, final_shape, replies_to_generate
from runner.rundir.resume import KeptRecords

log = logging.getLogger(__name__)

# How the memory plan's context per row was found.
MEASURED_CONTEXT = "the longest conversation + max_new_tokens per reply"
SAMPLED_CONTEXT = "the longest of the {sample} longest conversations by characters + max_new_tokens per reply"
ESTIMATED_CONTEXT = "estimated as characters / 3 + max_new_tokens per reply"

# Up to this many conversations the chat template renders every one before the model loads (its
# refusals are rejects at once, and the context is exact); above, the LONGEST_SAMPLE longest by
# characters, and each other one as the replay reaches it.
RENDER_ALL_UP_TO = 20_000
LONGEST_SAMPLE = 256


@dataclass
class Workload:
    """What a run replays, and what it found wrong or already done. Conversations are held as
    where they are in the input (see StoredConversations), with running figures of them."""

    files: list[Path]
    conversations: StoredConversations  # this shard's, in input order
    rejected: list[Rejected]
    kept: list[KeptRecords] = field(default_factory=list)  # what an earlier session left, per chats file
    context_tokens: int = 0  # the longest conversation's final length, replies included
    context_from: str = ""  # how context_tokens was found
    replies: int = 0  # replies to generate per sample, over every conversation
    has_system: bool = False  # a conversation starts with a system message
    longest: list[tuple[int, int]] = field(default_factory=list)  # (estimated length, position), a heap
    check_template: Callable[[Conversation], str | None] | None = None  # as the replay reaches each

    @classmethod
    def of(cls, conversations: list[Conversation], cfg: RunConfig) -> Workload:
        """A workload of conversations read elsewhere (`read_conversations`: the first N of a file)."""
        files = list(dict.fromkeys(conversation.source for conversation in conversations))
        workload = cls(files, StoredConversations(files, cfg.input.format, cfg.input.max_line_bytes), [])
        for conversation in conversations:
            workload.add(conversation, cfg)
        return workload

    def add(self, conversation: Conversation, cfg: RunConfig) -> None:
        """Hold an accepted conversation of the input pass, and count it in."""
        position = self.conversations.add(conversation)
        replies = replies_to_generate(conversation, cfg.replay.mode)
        self.replies += replies
        self.has_system = self.has_system or conversation.messages[0].role == "system"
        entry = (_estimated_length(conversation, replies, cfg), position)
        if len(self.longest) < LONGEST_SAMPLE:
            heapq.heappush(self.longest, entry)
        else:
            heapq.heappushpop(self.longest, entry)

    @property
    def kept_records(self) -> int:
        return sum(kept.count for kept in self.kept)

    def planned_replies(self, cfg: RunConfig) -> int:
        """Replies the whole run generates (kept records included), for progress totals."""
        return cfg.generation.num_samples * self.replies

    def streams(self, cfg: RunConfig) -> int:
        """(conversation, sample) pairs: how many rows could ever be in flight at once."""
        return len(self.conversations) * cfg.generation.num_samples

    def replayed(self) -> Iterator[Conversation]:
        """The conversations to replay, in input order, each checked by the chat template first
        where the template did not see it before the model loaded."""
        for conversation in self.conversations:
            if self.check_template is None or self.check_template(conversation) is None:
                yield conversation


def read_workload(cfg: RunConfig) -> Workload:
    """One streaming pass over the input files: this shard's lines read and validated, each
    conversation held as where it is, the other lines read for their ids alone; before the model is
    touched."""
    files = resolve_input_files(cfg.input.path)
    workload = Workload(files, StoredConversations(files, cfg.input.format, cfg.input.max_line_bytes), [])
    shard = (cfg.shard.index, cfg.shard.count)
    for item in scan_conversations(files, cfg.input.format, cfg.input.max_line_bytes, shard):
        if isinstance(item, Rejected):
            workload.rejected.append(item)
        else:
            workload.add(item, cfg)
    if workload.rejected and cfg.input.on_error is OnError.fail:
        raise InputError([str(reject) for reject in workload.rejected])
    if not workload.conversations and not workload.rejected and cfg.shard.count == 1:
        raise InputError([f"no conversations in {', '.join(str(path) for path in files)}"])
    if cfg.shard.count > 1:
        count = len(workload.conversations)
        log.info("shard %d of %d: %d conversation(s)", cfg.shard.index, cfg.shard.count, count)
    return workload


def measure_with_template(workload: Workload, tokenizer: Any, cfg: RunConfig) -> None:
    """Render conversations' final shape with the chat template before any weights load: every one
    up to RENDER_ALL_UP_TO of them, else the LONGEST_SAMPLE longest by characters (the others are
    checked as the replay reaches them). A refusal becomes a reject (input.on_error=fail stops),
    and the longest rendering plus max_new_tokens per reply to generate is the context the memory
    plan reserves per row."""
    fold = not template_supports_system_role(tokenizer)
    stored = workload.conversations
    if len(stored) <= RENDER_ALL_UP_TO:
        positions, workload.context_from = list(stored.positions()), MEASURED_CONTEXT
    else:
        positions = sorted(position for _, position in workload.longest)
        workload.context_from = SAMPLED_CONTEXT.format(sample=len(positions))
        checked = {stored.ordinal(position) for position in positions}

        def check(conversation: Conversation) -> str | None:
            if conversation.ordinal in checked:
                return None
            return _refusal(workload, tokenizer, conversation, cfg, fold)

        workload.check_template = check
        log.info(
            "%d conversations: the chat template measured the %d longest by characters; it checks each "
            "other one as the replay reaches it",
            len(stored),
            len(positions),
        )
    longest = 0
    for position in positions:
        conversation = stored[position]
        tokens = template_tokens(tokenizer, final_shape(conversation, cfg.replay.mode, fold=fold))
        if isinstance(tokens, int):
            replies = replies_to_generate(conversation, cfg.replay.mode)
            longest = max(longest, tokens + replies * max_new_tokens(conversation, cfg))
            continue
        _reject_refused(workload, conversation, tokens)
        stored.drop(position)
        workload.replies -= replies_to_generate(conversation, cfg.replay.mode)
    workload.context_tokens = longest
    if workload.rejected and cfg.input.on_error is OnError.fail:
        raise InputError([str(reject) for reject in workload.rejected])


def _refusal(
    workload: Workload, tokenizer: Any, conversation: Conversation, cfg: RunConfig, fold: bool
) -> str | None:
    """The template's refusal of a conversation the replay reached (rejected, or with
    input.on_error=fail an InputError that ends the run), or None."""
    tokens = template_tokens(tokenizer, final_shape(conversation, cfg.replay.mode, fold=fold))
    if isinstance(tokens, int):
        return None
    reject = _reject_refused(workload, conversation, tokens)
    if cfg.input.on_error is OnError.fail:
        raise InputError([str(reject)])
    log.warning("%s (id %r): %s", conversation.where, conversation.id, reject.message)
    return tokens


def _reject_refused(workload: Workload, conversation: Conversation, refusal: str) -> Rejected:
    message = f"the model's chat template refuses this conversation: {refusal}"
    reject = Rejected.of(
        conversation.source, conversation.line, conversation.id, "template_error", message, b""
    )
    workload.rejected.append(reject)
    return reject


def estimate_without_template(workload: Workload, cfg: RunConfig) -> None:
    """The context per row when no tokenizer is at hand (plan=true for a hub model not cached)."""
    workload.context_tokens = max((estimate for estimate, _ in workload.longest), default=0)
    workload.context_from = ESTIMATED_CONTEXT


def max_new_tokens(conversation: Conversation, cfg: RunConfig) -> int:
    """A reply's token budget: the conversation's own (an OpenAI Batch request's max_tokens), else
    the run's generation.max_new_tokens."""
    return conversation.settings.get("max_new_tokens", cfg.generation.max_new_tokens)


def _estimated_length(conversation: Conversation, replies: int, cfg: RunConfig) -> int:
    """A conversation's final length in tokens without a tokenizer: characters / 3 (English runs
    near 4 a token) and a few tokens of template per message, over the messages the replay ends
    with (regenerate drops the input's replies), and a placeholder plus max_new_tokens per reply."""
    messages = conversation.messages
    if cfg.replay.mode is not ReplayMode.gold_history:
        messages = tuple(message for message in messages if message.role != "assistant")
    per_reply = len(REPLY_PLACEHOLDER) // 3 + 8 + max_new_tokens(conversation, cfg)
    return sum(len(message.content) // 3 + 8 for message in messages) + replies * per_reply
