"""Loading: the tokenizer (alone, to check input before the weights), the model, the pipeline
around it, and a draft model for speculative decoding."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from runner.config.schema import RunConfig
from runner.errors import ConfigError, ModelLoadError
from runner.model.arguments import TransformersArguments, draft_model, transformers_arguments
from runner.model.embedded import embedded_dir
from runner.model.hardware import Hardware

log = logging.getLogger(__name__)


def model_arguments(cfg: RunConfig, hardware: Hardware) -> TransformersArguments:
    """The load arguments of the configured model, converting an embedded model into its cache
    first if it is not there yet."""
    return transformers_arguments(cfg, hardware, embedded_dir(cfg))


def load_tokenizer(load: dict[str, Any], local_files_only: bool = False) -> Any:
    """The model's tokenizer (and chat template) alone, so input can be checked before the weights load."""
    from transformers import AutoTokenizer

    if load.get("trust_remote_code"):
        log.warning("trust_remote_code=true: running Python code shipped with %s", load["model"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            load["model"],
            revision=load.get("revision"),
            trust_remote_code=load["trust_remote_code"],
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {load['model']!r}: {error}") from error
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{load['model']!r} has no chat template: chat replay needs one")
    if tokenizer.pad_token is None:
        # Padding only ever sits under a zero attention mask, so eos is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    return tokenizer


def load_pipeline(load: dict[str, Any], pipeline_class: type, tokenizer: Any) -> Any:
    """`transformers.pipeline(**load)` around `tokenizer`, with a project error for a missing model."""
    from transformers import pipeline

    try:
        # A copy: pipeline() writes device_map into the model_kwargs it is given.
        own = {**load, "model_kwargs": dict(load["model_kwargs"])} if "model_kwargs" in load else load
        pipe = pipeline(**own, tokenizer=tokenizer, pipeline_class=pipeline_class)
    except (OSError, ImportError, SafetensorError) as error:
        raise _load_error(load, error) from error
    if pipe.model.generation_config.pad_token_id is None:
        pipe.model.generation_config.pad_token_id = tokenizer.pad_token_id
    return pipe


def load_assistant(cfg: RunConfig, hardware: Hardware, tokenizer: Any) -> Any:
    """The draft model that generation.assistant_model names, on the main model's device and dtype
    (never quantized: a draft is small), refused unless it shares the main model's vocabulary."""
    name = cfg.generation.assistant_model
    _, load = draft_model(cfg, hardware)
    if load_tokenizer(load).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"generation.assistant_model={name} does not share {cfg.model.name}'s tokenizer: a draft "
            "model must use the same vocabulary (or use generation.prompt_lookup_num_tokens=N)"
        )
    log.info("loading the draft model %s (%s)", name, load["model"])
    return load_causal_lm(load)


def load_causal_lm(load: dict[str, Any]) -> Any:
    """The model alone (AutoModelForCausalLM) from the same arguments the pipeline takes."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            load["model"],
            revision=load.get("revision"),
            trust_remote_code=load["trust_remote_code"],
            dtype=load["dtype"],
            device_map=load["device_map"],
            **load.get("model_kwargs", {}),
        )
    except (OSError, ImportError, SafetensorError) as error:
        raise _load_error(load, error) from error
    return model.eval()


def _load_error(load: dict[str, Any], error: Exception) -> ModelLoadError:
    """One line naming the model, and for weights that do not read (random bytes, a truncated
    copy), the weights files of its checkpoint directory."""
    if isinstance(error, SafetensorError):
        files = sorted(Path(load["model"]).glob("*.safetensors"))
        named = ", ".join(str(path) for path in files) or load["model"]
        return ModelLoadError(f"could not read the weights of {load['model']!r} ({named}): {error}")
    return ModelLoadError(f"could not load model {load['model']!r}: {error}")
