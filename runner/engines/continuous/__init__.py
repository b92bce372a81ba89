"""engine=continuous: step-level batching over KV-cache slots, turns joining at any step.

engine.py is the thin engine, scheduler.py decides each step (admission, prefix sharing, slot
compaction, the out-of-memory policy) as data, forward.py runs it through the model,
slot_cache.py holds the KV cache, sampling.py picks each row's token, cpu_linear.py packs CPU weights.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def build(cfg: Any, setup: Any) -> Any:
    """engine=continuous: the model alone, or the pipeline engine when decoding speculatively
    (transformers drafts for one sequence at a time, so that stays a batch-1 generate path)."""
    from runner.engines.continuous.cpu_linear import use_onednn_linear
    from runner.engines.continuous.engine import ContinuousEngine
    from runner.engines.protocol import Sampling
    from runner.model.loading import load_causal_lm

    if cfg.generation.speculation:
        from runner.engines import pipeline

        log.info(
            "speculative decoding (%s) runs one turn at a time through generate (engine=pipeline's path)",
            cfg.generation.speculation,
        )
        return pipeline.build(cfg, setup)
    model = load_causal_lm(setup.arguments.load)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = setup.tokenizer.pad_token_id
    if packed := use_onednn_linear(model, setup.batch_rows):
        log.info("%d fp32 linear layers on the CPU run through oneDNN, their weights packed", packed)
    return ContinuousEngine(
        model,
        setup.tokenizer,
        Sampling.from_config(cfg.generation),
        setup.batch_rows,
        cfg.engine.prefill_chunk,
    )
