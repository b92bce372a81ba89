"""Hydra's submitit launchers with a checkpoint hook that resumes a preempted or timed-out job.

It lives in the `hydra_plugins` namespace because Hydra instantiates launchers only from there.

submitit calls `checkpoint` when SLURM preempts a job or its time runs out (with
`max_num_timeout > 0`), and requeues what it returns. The hook requeues the same job with
`resume=true`, into the same job dir (`resume` is left out of job dir names), so the run goes on
from its last complete record instead of being refused or starting over.
"""

from __future__ import annotations

from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # without the slurm extra, hydra/launcher=slurm|local fails to compose and says why
    LocalLauncher = SlurmLauncher = None


def resuming_overrides(overrides: list[str]) -> list[str]:
    """The job's overrides with any `resume=...` replaced by `resume=true`."""
    kept = [override for override in overrides if override.split("=", 1)[0].lstrip("+~") != "resume"]
    return [*kept, "resume=true"]


class _ResumeOnRequeue:
    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(resuming_overrides(list(sweep_overrides)), *args, **kwargs)


if SlurmLauncher is not None:

    class ResumingSlurmLauncher(_ResumeOnRequeue, SlurmLauncher):
        """hydra/launcher=slurm."""

    class ResumingLocalLauncher(_ResumeOnRequeue, LocalLauncher):
        """hydra/launcher=local: the same machinery as SLURM, as processes on this machine."""
