"""The secrets policy: hub tokens and keys come from the environment, never from configs or overrides
(which Hydra saves in the run dir)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from runner.errors import ConfigError

# Keys that name a secret, and values shaped like a Hugging Face token.
SECRET_KEYS = {
    "token",
    "hf_token",
    "hub_token",
    "auth_token",
    "access_token",
    "api_key",
    "apikey",
    "secret",
    "password",
}


HF_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")


def refuse_secrets(arguments: Sequence[str]) -> None:
    """Stop before Hydra writes the overrides to .hydra/: secrets come from the environment only."""
    for argument in arguments:
        key, _, value = argument.partition("=")
        if value and (key.lstrip("+~").split(".")[-1].lower() in SECRET_KEYS or HF_TOKEN_VALUE.search(value)):
            raise ConfigError(
                f"refusing the override {key}=...: it looks like a secret, and overrides are saved in "
                "the run dir; set HF_TOKEN in the environment instead"
            )
