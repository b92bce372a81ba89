"""chat-runner: replay multi-turn conversations through open LLMs, configured with Hydra.

From Python: `runner.run(["model=llama3_8b", "quant=int4"])` runs as the CLI does and returns the
summary; `runner.load_run(dir)` reads a run dir back (`.records`, `.summary`, `.turns()`,
`.to_pandas()`). Both import on first use, so `import runner` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_run", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
