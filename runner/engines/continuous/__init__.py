"""engine=continuous: step-level batching over KV-cache slots, turns joining at any step.

engine.py is the thin engine, scheduler.py decides each step (admission, prefix sharing, slot
compaction, the out-of-memory policy) as data, forward.py runs it through the model (attention.py:
its attention function; direct_layers.py: a Llama-family decoder op by op), slot_cache.py holds the
KV cache, sampling.py picks each row's token, fused_projections.py joins projections, rms_norm.py
fuses norms and cpu_linear.py packs CPU weights at load, and decode_graphs.py records decode
passes as CUDA graphs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from runner.engines.protocol import Capabilities, Engine, Sampling

if TYPE_CHECKING:
    from runner.config.schema import RunConfig
    from runner.engines.registry import EngineSetup

log = logging.getLogger(__name__)

CAPABILITIES = Capabilities()


def build(cfg: RunConfig, setup: EngineSetup) -> Engine:
    """The model alone, prepared by `prepare_model`, behind the continuous engine."""
    from runner.engines.continuous.engine import ContinuousEngine
    from runner.model.loading import load_causal_lm

    model = load_causal_lm(setup.arguments.load)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = setup.tokenizer.pad_token_id
    prepare_model(model, setup.batch_rows)
    devices = set((getattr(model, "hf_device_map", None) or {"": model.device}).values())
    cuda_graphs = cfg.engine.cuda_graphs and model.device.type == "cuda" and len(devices) == 1
    if cfg.engine.cuda_graphs and not cuda_graphs:
        log.warning("engine.cuda_graphs needs the model on one CUDA device; this run decodes without graphs")
    budget = setup.kv_budget_bytes  # as the memory plan resolved and printed it
    if budget is not None:
        log.info("KV cache: at most %.2f GB (engine.kv_cache_gb=%s)", budget / 1e9, cfg.engine.kv_cache_gb)
    return ContinuousEngine(
        model,
        setup.tokenizer,
        Sampling.from_config(cfg.generation),
        setup.batch_rows,
        cfg.engine.prefill_chunk,
        cuda_graphs,
        budget,
        setup.context_tokens,
    )


def prepare_model(model: Any, rows: int) -> None:
    """The loaded model as the continuous engine runs it: q/k/v and gate/up projections joined into
    one product each, fp32 RMSNorms as one kernel each, then fp32 CPU linears packed for oneDNN,
    tuned for `rows` rows a pass."""
    from runner.engines.continuous.cpu_linear import use_onednn_linear
    from runner.engines.continuous.fused_projections import join_projections
    from runner.engines.continuous.rms_norm import use_fused_rms_norm

    if joined := join_projections(model):
        log.info("%d groups of projections (q/k/v, gate/up) joined into one matrix product each", joined)
    if fused := use_fused_rms_norm(model):
        log.info("%d RMSNorms run as one kernel each", fused)
    if packed := use_onednn_linear(model, rows):
        log.info("%d fp32 linear layers on the CPU run through oneDNN, their weights packed", packed)
