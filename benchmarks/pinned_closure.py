"""Print `name==version` for every distribution the given ones need at run time, as installed here.

benchmarks/gpu_check.sh --pack downloads these as wheels, so that a lent GPU machine runs the versions
CI runs rather than its image's (whose transformers and huggingface-hub differ). PyTorch, NumPy and
their CUDA libraries are left out: the device's own builds are the ones to measure.

    python benchmarks/pinned_closure.py hydra-core transformers accelerate
"""

from __future__ import annotations

import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEVICE_OWN = {"torch", "numpy", "triton", "setuptools"}


def pinned_closure(roots: list[str]) -> dict[str, str]:
    """Each distribution `roots` need (markers evaluated, no extras), mapped to its installed version."""
    pins: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pins or name in DEVICE_OWN or name.startswith(("nvidia-", "cuda-")):
            continue
        dist = distribution(name)
        pins[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return pins


if __name__ == "__main__":
    for name, version in sorted(pinned_closure(sys.argv[1:]).items()):
        print(f"{name}=={version}")
