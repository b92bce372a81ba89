"""What every engine over a local transformers model shares: the chat template, stop ids, the
context check, decoding of the new tokens only, and a description of the loaded weights."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from runner.engines.chat_template import template_supports_system_role
from runner.engines.protocol import Reply, Request, TurnError
from runner.inputs.conversation import Message


def stop_token_ids(generation_config: Any) -> frozenset[int]:
    """All eos ids of the model's generation config (Llama 3: <|eot_id|> and <|end_of_text|>)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class ChatTokenizer:
    """A model's tokenizer and chat template, seen from a chat: prompts as token ids, stop ids, the
    context check and the reply's text. Engines that hold the model elsewhere (vLLM) start here."""

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int], context_tokens: int | None):
        self.tokenizer, self.stop_ids, self.context_tokens = tokenizer, stop_ids, context_tokens
        template = tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template")
        self.chat_template_sha256 = hashlib.sha256(template.encode()).hexdigest()
        self.supports_system_role = template_supports_system_role(tokenizer)
        # Text that the tokenizer turns into control tokens: in user content it could forge a turn.
        self.control_strings = sorted(
            {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
            | set(tokenizer.all_special_tokens)
        )

    def close(self) -> None:
        """Nothing outside this process to let go of (engines that hold some override it)."""

    def control_tokens_in(self, messages: Sequence[Message]) -> int:
        """How many control-token strings the messages' texts hold (flagged per turn, not removed)."""
        return sum(message.content.count(token) for message in messages for token in self.control_strings)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The chat template rendered and tokenized, exactly as the pipeline does it."""
        chat = [message.as_dict() for message in messages]
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]

    def overflow(self, prompt_tokens: int, max_new_tokens: int) -> TurnError | None:
        """A turn whose prompt plus max_new_tokens outgrows the model's context."""
        if self.context_tokens is None or prompt_tokens + max_new_tokens <= self.context_tokens:
            return None
        return TurnError(
            "context_overflow",
            f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} "
            f"exceeds the model's context of {self.context_tokens} tokens",
            {
                "prompt_tokens": prompt_tokens,
                "max_new_tokens": max_new_tokens,
                "context_tokens": self.context_tokens,
            },
        )

    def reply(
        self, request: Request, prompt_tokens: int, new_ids: list[int], seconds: float, first: float
    ) -> Reply:
        """Cut the new ids at the first stop id (kept, as the pipeline counts it) and decode them."""
        stop = next((i for i, token in enumerate(new_ids) if token in self.stop_ids), None)
        if stop is not None:
            new_ids = new_ids[: stop + 1]
        text, stopped = cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True), request)
        return Reply(
            text=text,
            prompt_tokens=prompt_tokens,
            new_tokens=len(new_ids),
            finish_reason="stop" if stop is not None or stopped else "length",
            seconds=seconds,
            first_token_seconds=first,
            control_tokens_in_content=self.control_tokens_in(request.messages),
        )


class ChatModel(ChatTokenizer):
    """A loaded causal LM and its tokenizer, seen as a chat model."""

    def __init__(self, model: Any, tokenizer: Any):
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        super().__init__(tokenizer, stop_token_ids(model.generation_config), context)
        self.model = model

    def describe(self) -> dict[str, Any]:
        """Where the weights live and what they weigh, for summary.json."""
        placement = getattr(self.model, "hf_device_map", None) or {"": str(self.model.device)}
        return {
            "weights_bytes": self.model.get_memory_footprint(),
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device_map": {name or "all": str(device) for name, device in placement.items()},
            "device": str(self.model.device),
        }

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of context takes: 2 x layers x KV heads x head dim x dtype size."""
        config = self.model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim * self.model.dtype.itemsize


def cut_at_stop(text: str, request: Request) -> tuple[str, bool]:
    """The reply's text up to its turn's first stop string (not kept, as OpenAI's `stop`), and
    whether one was found."""
    stops = request.sampling.stop if request.sampling is not None else ()
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return (text[: min(found)], True) if found else (text, False)
