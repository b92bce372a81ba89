"""The generation engine: transformers' TextGenerationPipeline in chat mode, one turn at a time.

The pipeline applies the model's own chat template and generates; the subclass below only adds
the token accounting a replay records (prompt length, new token ids).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from transformers import TextGenerationPipeline, set_seed

from runner.conversations import Message
from runner.replay import Reply

# bitsandbytes int8 warns on every matmul when activations are not fp16; once is enough.
warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")

_SENTINEL = "chat-runner system-role probe"


class ChatReplayPipeline(TextGenerationPipeline):
    """A TextGenerationPipeline whose records also carry `prompt_tokens` and `new_token_ids`."""

    def postprocess(self, model_outputs: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
        records = super().postprocess(model_outputs, **kwargs)
        prompt_tokens = model_outputs["input_ids"].shape[-1]
        for record, sequence in zip(records, model_outputs["generated_sequence"][0], strict=True):
            record["prompt_tokens"] = prompt_tokens
            record["new_token_ids"] = sequence[prompt_tokens:].tolist()
        return records


def template_supports_system_role(tokenizer: Any) -> bool:
    """Render a probe chat: a template without a system role raises or drops the system text."""
    probe = [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return _SENTINEL in rendered


def stop_token_ids(generation_config: Any) -> frozenset[int]:
    """All eos ids of the model's generation config (Llama 3 has two: <|eot_id|>, <|end_of_text|>)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class PipelineEngine:
    """Batch-1 chat replay through a ChatReplayPipeline (the seed's way)."""

    def __init__(self, pipe: ChatReplayPipeline, generate: dict[str, Any]):
        self.pipe = pipe
        self.generate_arguments = generate
        self.stop_ids = stop_token_ids(pipe.model.generation_config)
        template = pipe.tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template")
        self.chat_template_sha256 = hashlib.sha256(template.encode()).hexdigest()
        self.supports_system_role = template_supports_system_role(pipe.tokenizer)

    def generate(self, messages: Sequence[Message], seed: int) -> Reply:
        if self.generate_arguments["do_sample"]:
            set_seed(seed)
        chat = [message.as_dict() for message in messages]
        start = time.perf_counter()
        [record] = self.pipe(chat, return_full_text=False, **self.generate_arguments)
        seconds = time.perf_counter() - start
        new_ids = record["new_token_ids"]
        stopped = bool(new_ids) and new_ids[-1] in self.stop_ids
        return Reply(
            text=record["generated_text"],
            prompt_tokens=record["prompt_tokens"],
            new_tokens=len(new_ids),
            finish_reason="stop" if stopped else "length",
            seconds=seconds,
        )

    def describe(self) -> dict[str, Any]:
        """Where the weights live and what they weigh, for summary.json."""
        model = self.pipe.model
        placement = getattr(model, "hf_device_map", None) or {"": str(model.device)}
        return {
            "weights_bytes": model.get_memory_footprint(),
            "dtype": str(model.dtype).removeprefix("torch."),
            "device_map": {name or "all": str(device) for name, device in placement.items()},
        }


def accelerator_peak_bytes() -> int | None:
    """Peak CUDA memory allocated by this process over all GPUs, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count()))


def accelerator_names() -> list[str]:
    """Names of the visible CUDA GPUs (empty on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
