"""Where a model's files come from, checked before anything slow: a local checkpoint directory
holds one, and a hub model that is not cached can be downloaded (the hub answers).

Without these checks a missing local path reads as a hub repo id ("Repo id must be in the
form..."), a relative one goes to the hub, and an unreachable hub costs ~50 s of retries first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runner.errors import ModelLoadError

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 5.0
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.gguf")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_local_checkpoint(path: Path) -> None:
    """Refuse a model.path that is not a checkpoint directory, naming what is missing."""
    if not path.is_dir():
        raise ModelLoadError(
            f"model.path {path} is not a directory (relative paths are from {Path.cwd()}): model=local "
            "reads a checkpoint directory and never the hub"
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in TOKENIZER):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    if missing:
        raise ModelLoadError(f"model.path {path} holds no checkpoint: it has no {', '.join(missing)}")


def check_hub(model_id: str, revision: str | None) -> None:
    """With the hub unreachable: load a cached model from the cache alone (saying so), and refuse at
    once a model that is not cached, saying how to run offline. Does nothing with HF_HUB_OFFLINE set."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return
    problem = _hub_problem(model_id)
    if problem is None:
        return
    cached = huggingface_hub.try_to_load_from_cache(model_id, "config.json", revision=revision)
    if isinstance(cached, str):
        log.warning(
            "the Hugging Face hub is unreachable (%s): loading %s from the local cache only "
            "(as with HF_HUB_OFFLINE=1)",
            problem,
            model_id,
        )
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # read at import time: set the live value too
        return
    raise ModelLoadError(
        f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {problem}) and {model_id} is not in the "
        "local cache. Download it where the hub is reachable (`hf download "
        f"{model_id}`, then copy the cache) and set HF_HUB_OFFLINE=1 here, or point at a local copy: "
        "model=local model.path=<checkpoint dir>"
    )


def _hub_problem(model_id: str) -> str | None:
    """Why the hub does not answer within a few seconds, or None when it does (any HTTP answer,
    even 401 or 404, means it is reachable). Uses huggingface_hub's session, so proxies apply."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{model_id}", timeout=HUB_PROBE_SECONDS)
    except Exception as error:  # any transport failure: DNS, refused, timeout, TLS
        return f"{type(error).__name__}: {error}"
    return None
