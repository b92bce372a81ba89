"""What the machine offers: GPUs and their free memory, free RAM, and measured memory bandwidth."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate.utils import convert_file_size_to_int

from runner.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """What the machine offers, as far as argument translation and the memory plan need to know."""

    cuda_devices: int = 0
    cuda_bf16: bool = False
    cuda_free: tuple[int, ...] = ()  # free bytes of each GPU
    cpu_free: int = 0  # available RAM in bytes
    cpu_total: int = 0  # all RAM in bytes


def granted_cpus() -> tuple[int, str]:
    """The CPUs this process was granted, and by what: SLURM's SLURM_CPUS_PER_TASK, else the
    process's CPU affinity (taskset, cgroups' cpusets). Not the machine's core count."""
    granted = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if granted.isdigit() and int(granted) > 0:
        return int(granted), "SLURM_CPUS_PER_TASK"
    return len(os.sched_getaffinity(0)), "the process's CPU affinity"


def use_granted_cpus() -> int:
    """Size torch's CPU threads to the CPUs granted (torch's default, every core of the machine,
    oversubscribes a shared node: two 1-CPU jobs on 2 cores each ran 10x slower); log it."""
    threads, source = granted_cpus()
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread(s), from %s", threads, source)
    return threads


def detect_hardware() -> Hardware:
    memory = psutil.virtual_memory()
    if not torch.cuda.is_available():
        return Hardware(cpu_free=memory.available, cpu_total=memory.total)
    count = torch.cuda.device_count()
    return Hardware(
        cuda_devices=count,
        cuda_bf16=torch.cuda.is_bf16_supported(),
        cuda_free=tuple(torch.cuda.mem_get_info(index)[0] for index in range(count)),
        cpu_free=memory.available,
        cpu_total=memory.total,
    )


def run_hardware(plan_gpus: list[str]) -> Hardware:
    """The hardware a run plans and loads for, torch's CPU threads sized to the CPUs granted:
    this machine's, or with plan_gpus, GPUs of those sizes."""
    use_granted_cpus()
    return planned_gpus(plan_gpus) if plan_gpus else detect_hardware()


def planned_gpus(sizes: list[str]) -> Hardware:
    """Hardware of GPUs of these sizes (bf16-capable, no CPU offload): what plan_gpus plans for,
    from a machine that has none of them, such as a cluster's login node."""
    try:
        free = tuple(convert_file_size_to_int(size) for size in sizes)
    except ValueError as error:
        raise ConfigError(f"plan_gpus: {error} (sizes look like 80GB or 40GiB)") from None
    return Hardware(cuda_devices=len(free), cuda_bf16=True, cuda_free=free)


def memory_bandwidth(device: str, cache_dir: Path) -> float:
    """Read bandwidth of `device` in bytes/s: measured once (the median of sums over a buffer far
    larger than the caches), then cached per machine and device in `cache_dir`."""
    cached = cache_dir / f"bandwidth-{platform.node()}-{device.replace(':', '')}.json"
    if cached.exists():
        return json.loads(cached.read_text())["bytes_per_second"]
    buffer = torch.ones(512 * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        buffer.sum().item()  # .item() waits for a GPU to finish
        times.append(time.perf_counter() - start)
    bandwidth = buffer.numel() * 4 / statistics.median(times[1:])  # the first run pages the buffer in
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"device": device, "bytes_per_second": bandwidth}))
    return bandwidth


def torch_threads() -> int:
    """The CPU threads torch computes with."""
    return torch.get_num_threads()


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


def accelerator_environment() -> dict[str, Any]:
    """What summary.json's environment adds of torch's view of the machine."""
    return {"gpus": accelerator_names(), "torch_threads": torch_threads()}
