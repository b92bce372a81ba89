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
    cpu_free, cpu_total = memory.available, memory.total
    if (limit := cgroup_memory()) is not None:  # a SLURM job's --mem, a container's limit
        cpu_total = min(cpu_total, limit[0])
        cpu_free = max(min(cpu_free, limit[0] - limit[1]), 0)
    if not torch.cuda.is_available():
        return Hardware(cpu_free=cpu_free, cpu_total=cpu_total)
    count = torch.cuda.device_count()
    return Hardware(
        cuda_devices=count,
        cuda_bf16=torch.cuda.is_bf16_supported(),
        cuda_free=tuple(torch.cuda.mem_get_info(index)[0] for index in range(count)),
        cpu_free=cpu_free,
        cpu_total=cpu_total,
    )


def cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> tuple[int, int] | None:
    """(limit, in use) in bytes of the tightest memory limit on this process's cgroups (its own
    and each one above it, cgroup v2 or v1), or None where none is set.

    Why: psutil reports the node's free RAM, but a SLURM job (`--mem`, enforced by its cgroup) or a
    container is killed at its cgroup's limit, which may be far below that. In use counts what the
    kernel cannot reclaim: the cgroup's usage less its inactive file cache, as container runtimes
    count a working set."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    tightest = None
    for line in lines:
        if line.count(":") < 2:
            continue
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:  # v2
            files = ("memory.max", "memory.current", "inactive_file")
            base = root
        elif "memory" in controllers.split(","):  # v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = root / "memory"
        else:
            continue
        group = base / path.lstrip("/")
        for directory in (group, *group.parents):
            room = _cgroup_room(directory, *files)
            if room is not None and (tightest is None or room[0] - room[1] < tightest[0] - tightest[1]):
                tightest = room
            if directory == base:
                break
    return tightest


def _cgroup_room(
    directory: Path, limit_file: str, usage_file: str, inactive_key: str
) -> tuple[int, int] | None:
    """(limit, in use) of one cgroup directory; None where it sets no limit or cannot be read."""
    try:
        limit = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text())
        stat = (directory / "memory.stat").read_text().split()
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 2**60:  # "max" (v2) or v1's page-rounded 2**63
        return None
    inactive = dict(zip(stat[::2], stat[1::2], strict=False)).get(inactive_key, "0")
    return int(limit), max(usage - int(inactive), 0)


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
