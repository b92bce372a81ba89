"""The memory plan: what a run needs (weights, KV cache) against what its devices offer; no torch.

Weights take bytes per parameter by precision (4 fp32, 2 bf16/fp16). bitsandbytes quantizes the
linear layers only (int8: 1 byte per weight; int4: half a byte plus one absmax per 64 weights) and
keeps the input embeddings and lm_head in the load precision, which for a small model with a large
vocabulary is most of its quantized size. The KV cache takes 2 (keys, values) x layers x KV heads
x head dim values per token of context, for every row of a batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from runner.config.schema import ArchitectureConfig, QuantConfig, QuantMethod

# Of a device's free memory, what weights and KV cache may take: the rest is for activations,
# logits and the CUDA context.
USABLE_FRACTION = 0.9
_INT4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # by double_quant


def weights_bytes(arch: ArchitectureConfig, dtype_bytes: int, quant: QuantConfig) -> int:
    """Bytes the loaded weights take (what `get_memory_footprint()` reports)."""
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tied_embeddings else 2)
    if quant.method is QuantMethod.none:
        return arch.params * dtype_bytes
    per_weight = 1.0 if quant.method is QuantMethod.int8 else _INT4_BYTES[quant.double_quant]
    return round((arch.params - embeddings) * per_weight + embeddings * dtype_bytes)


def kv_bytes_per_token(arch: ArchitectureConfig, dtype_bytes: int) -> int:
    """KV-cache bytes of one token of context: keys and values of every layer."""
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * dtype_bytes


def gb(size: float) -> str:
    """Bytes as GB (10^9), the unit GPU sizes are sold in."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


@dataclass(frozen=True)
class MemoryPlan:
    """A run's memory needs, its devices' free memory, and the verdict."""

    model: str
    dtype: str
    quant: str
    weights_bytes: int
    kv_bytes_per_token: int
    batch_rows: int
    context_tokens: int
    context_from: str  # how context_tokens was found
    kv_bytes: int  # batch_rows x context_tokens tokens of KV cache, or the KV budget if smaller
    draft_bytes: int  # generation.assistant_model's weights and KV cache
    total_bytes: int
    devices: dict[str, int]  # device -> free bytes the model may use
    offload_bytes: int  # CPU memory device_map="auto" may spill layers into
    verdict: str  # fits | fits_with_offload | does_not_fit
    advice: str | None
    fitting_batch: int | None  # the largest smaller batch that fits, if the batch is what does not
    usable_fraction: float = USABLE_FRACTION  # of the devices' free memory, for weights and KV cache
    speed_note: str | None = None  # a quantization that is slower than fp32 here, with the figure
    kv_budget_bytes: int | None = None  # engine.kv_cache_gb, resolved

    @property
    def fits(self) -> bool:
        return self.verdict != "does_not_fit"

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan as printed by plan=true and logged before a run."""
        quant = "" if self.quant == "none" else f" + {self.quant}"
        devices = ", ".join(f"{name} {gb(free)} free" for name, free in self.devices.items())
        lines = [
            f"memory plan for {self.model} in {self.dtype}{quant}:",
            f"  weights         {gb(self.weights_bytes):>10}",
            f"  KV cache        {gb(self.kv_bytes):>10}  ({self.batch_rows} row(s) x {self.context_tokens:,} "
            f"tokens x {self.kv_bytes_per_token / 2**10:,.0f} KiB; context {self.context_from})",
        ]
        if self.kv_budget_bytes is not None and self.kv_budget_bytes == self.kv_bytes:
            lines[-1] = (
                f"  KV cache        {gb(self.kv_bytes):>10}  (engine.kv_cache_gb; {self.batch_rows} row(s) x "
                f"{self.context_tokens:,} tokens x {self.kv_bytes_per_token / 2**10:,.0f} KiB would take "
                f"{gb(self.batch_rows * self.context_tokens * self.kv_bytes_per_token)}: fewer rows run "
                "while long conversations are in flight)"
            )
        if self.draft_bytes:
            lines.append(f"  draft model     {gb(self.draft_bytes):>10}  (generation.assistant_model)")
        lines += [
            f"  total           {gb(self.total_bytes):>10}",
            f"  available       {gb(usable(self.devices, self.usable_fraction)):>10}  "
            f"({self.usable_fraction:.0%} of {devices})",
            f"  verdict: {self.verdict_text()}",
        ]
        if self.speed_note:
            lines.append(f"  note: {self.speed_note}")
        return lines

    def verdict_text(self) -> str:
        if self.verdict == "fits":
            return "fits"
        if self.verdict == "fits_with_offload":
            return (
                f"fits only by offloading layers to the CPU ({gb(self.offload_bytes)} free there), which "
                f"is far slower{'; ' + self.advice if self.advice else ''}"
            )
        return f"does not fit; {self.advice}"

    def refusal(self) -> str:
        """The one-line error of a run whose plan does not fit."""
        quant = "" if self.quant == "none" else f" {self.quant}"
        cache = self.total_bytes - self.weights_bytes - self.draft_bytes
        draft = f" and {gb(self.draft_bytes)} for the draft model" if self.draft_bytes else ""
        return (
            f"{self.model} in {self.dtype}{quant} needs ~{gb(self.weights_bytes)} for weights and "
            f"{gb(cache)} for the KV cache{draft}; {' + '.join(self.devices)} has "
            f"{gb(usable(self.devices, self.usable_fraction))} usable: {self.advice} (plan=true shows the "
            "whole plan)"
        )


def usable(devices: dict[str, int], fraction: float = USABLE_FRACTION) -> int:
    """What weights and KV cache may take of these devices' free memory."""
    return round(fraction * sum(devices.values()))


def make_plan(
    *,
    model: str,
    arch: ArchitectureConfig,
    dtype: str,
    dtype_bytes: int,
    quant: QuantConfig,
    batch_rows: int,
    context_tokens: int,
    context_from: str,
    devices: dict[str, int],
    offload_bytes: int,
    alternatives: dict[str, tuple[int, QuantConfig]],
    draft_bytes: int = 0,
    usable_fraction: float = USABLE_FRACTION,
    kv_budget_bytes: int | None = None,
) -> MemoryPlan:
    """Weigh one run against its devices.

    Args:
        context_tokens: the longest sequence (prompt + reply) one row may reach.
        devices: free bytes of each device the model loads onto.
        offload_bytes: CPU bytes that device_map="auto" may spill into (0 where it cannot).
        alternatives: other choices to advise, "precision=bf16 quant=int4" -> (dtype bytes, quant).
        draft_bytes: what a draft model for speculative decoding takes beside the model.
        usable_fraction: of the devices' free memory, what weights and KV cache may take (an engine
            that reserves its own share, vLLM's gpu_memory_utilization, sets it).
        kv_budget_bytes: the most the engine's KV cache holds (engine.kv_cache_gb), if it has one.
    """
    need = _Need(arch, min(context_tokens, arch.context_length))
    weights = weights_bytes(arch, dtype_bytes, quant)
    kv = need.cache(batch_rows, dtype_bytes)
    if kv_budget_bytes is not None:
        kv = min(kv, kv_budget_bytes)
    total = weights + kv + draft_bytes
    room = usable(devices, usable_fraction)
    if total <= room:
        verdict = "fits"
    elif offload_bytes and total <= room + USABLE_FRACTION * offload_bytes:
        verdict = "fits_with_offload"
    else:
        verdict = "does_not_fit"
    advice, batch = None, None
    if verdict != "fits":
        advice, batch = _advice(need, room - draft_bytes, weights, dtype_bytes, batch_rows, alternatives)
    return MemoryPlan(
        model=model,
        dtype=dtype,
        quant=quant.method.value,
        weights_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(arch, dtype_bytes),
        batch_rows=batch_rows,
        context_tokens=need.context,
        context_from=context_from,
        kv_bytes=kv,
        draft_bytes=draft_bytes,
        total_bytes=total,
        devices=devices,
        offload_bytes=offload_bytes,
        verdict=verdict,
        advice=advice,
        fitting_batch=batch,
        usable_fraction=usable_fraction,
        speed_note=cpu_quant_note(quant.method.value) if set(devices) == {"cpu"} else None,
        kv_budget_bytes=kv_budget_bytes,
    )


def kv_budget(setting: Any, cpu_free: int | None, weights: int) -> int | None:
    """engine.kv_cache_gb in bytes (None: no limit). auto on a CPU (`cpu_free`: the RAM free before
    the weights load): half of what the weights leave, since there running out of RAM ends the
    process rather than a pass the engine could back off from; on a GPU auto sets no limit, and a
    pass that runs out of memory backs off."""
    if setting == "auto":
        return max(cpu_free - weights, 0) // 2 if cpu_free is not None else None
    return None if setting is None else int(setting * 1e9)


# bitsandbytes' CPU kernels decode no faster than fp32 weights through oneDNN: tokens/s of the
# continuous engine as a fraction of fp32's, medians of `benchmarks/throughput.py --workloads forced
# --contenders continuous,int8,int4 --repeats 3` on 2026-12-05 (16 MT-bench conversations, 64 tokens
# a reply, a 2-core x86 CPU): fp32 356.1, int8 174.4, int4 348.0 tokens/s.
CPU_QUANT_SPEED = {"int8": 0.49, "int4": 0.98}


def cpu_quant_note(quant: str) -> str | None:
    """One sentence for a quantization no faster than fp32 on a CPU, with the figure."""
    ratio = CPU_QUANT_SPEED.get(quant)
    if ratio is None or ratio >= 1:
        return None
    return (
        f"quant={quant} shrinks the weights but is no faster on a CPU: bitsandbytes decodes at "
        f"{ratio:.2f}x fp32's tokens/s (measured on a 2-core CPU by benchmarks/throughput.py)"
    )


@dataclass(frozen=True)
class _Need:
    """KV-cache bytes of a batch: every slot at full context (a conversation keeps its slot's cache
    between turns, so nothing is held beyond the slots)."""

    arch: ArchitectureConfig
    context: int

    def cache(self, rows: int, dtype_bytes: int) -> int:
        return rows * self.context * kv_bytes_per_token(self.arch, dtype_bytes)


def _advice(
    need: _Need,
    room: int,
    weights: int,
    dtype_bytes: int,
    batch_rows: int,
    alternatives: dict[str, tuple[int, QuantConfig]],
) -> tuple[str, int | None]:
    """The cheapest change that fits, and the batch size if that is it: a smaller batch, else the
    least compressed precision/quantization (at this batch, else at batch 1)."""
    batch = next(
        (rows for rows in range(batch_rows - 1, 0, -1) if weights + need.cache(rows, dtype_bytes) <= room),
        None,
    )
    if batch is not None:
        return f"engine.batch_size={batch} fits", batch
    candidates = sorted(
        (
            (weights_bytes(need.arch, other_bytes, other_quant), name, other_bytes)
            for name, (other_bytes, other_quant) in alternatives.items()
        ),
        reverse=True,
    )
    for rows in dict.fromkeys([batch_rows, 1]):
        for other_weights, name, other_bytes in candidates:
            if other_weights + need.cache(rows, other_bytes) <= room:
                smaller = "" if rows == batch_rows else f" engine.batch_size={rows}"
                return f"{name}{smaller} needs ~{gb(other_weights)} for weights and fits", None
    smallest = min(candidates, default=None)
    start = (
        f"nothing fits here: even {smallest[1]} needs ~{gb(smallest[0])} for weights; "
        if smallest is not None and smallest[0] < weights
        else "no smaller precision or quantization is left; "
    )
    return start + "use a device with more memory, more GPUs (device=auto), or a smaller model", None
