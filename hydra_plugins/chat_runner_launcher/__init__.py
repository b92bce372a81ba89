"""Hydra's submitit launchers with a checkpoint hook that resumes a preempted or timed-out job.

It lives in the `hydra_plugins` namespace because Hydra instantiates launchers only from there.

submitit calls `checkpoint` when SLURM preempts a job or its time runs out (with
`max_num_timeout > 0`), and requeues what it returns. The hook requeues the same job with
`resume=true`, into the same job dir (`resume` is left out of job dir names), so the run goes on
from its last complete record instead of being refused or starting over. (A job requeued by SLURM
itself, `scontrol requeue`, reruns with its first overrides: the runner resumes it from
`SLURM_RESTART_COUNT`.)

A job that fails, whatever raised, is logged in its job dir and returned as a finished job: the
sweep's end lists it as failed in one line (runner.tools.report), never as a traceback that would hide
the other jobs. On a cluster without accounting, where submitit's `sacct` polls would fail (a
warning each, and a job killed before its result would be waited for for ever), job states come
from `squeue`.
"""

from __future__ import annotations

import logging
import re
import subprocess
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # without the slurm extra, hydra/launcher=slurm|local fails to compose and says why
    LocalLauncher = SlurmLauncher = None

log = logging.getLogger("runner")


def accounting_is_off() -> bool:
    """Whether the cluster keeps no job accounting (`AccountingStorageType=accounting_storage/none`),
    so that `sacct`, which submitit polls for job states, has nothing to read."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none\s*$", config.stdout, re.M))


def queue_watcher(delay_s: int) -> Any:
    """A submitit job watcher that reads job states from `squeue` instead of `sacct`: a job squeue no
    longer lists has ended (its result file, or the lack of one, says how), so a job killed before
    it wrote a result ends the wait instead of leaving its state unknown for ever."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            if not self._registered - self._finished:
                return None
            return ["squeue", "--me", "--noheader", "--array", "--format=%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            listed = {}
            for line in text.splitlines():
                job_id, state, nodes = line.split("|", 2)
                listed[job_id] = {"JobID": job_id, "State": state, "NodeList": nodes}
            for job_id in self._registered - self._finished:
                listed.setdefault(job_id, {"JobID": job_id, "State": "ENDED", "NodeList": ""})
            return listed

    return QueueWatcher(delay_s=delay_s)


def result_or_end(job_class: type) -> type:
    """`job_class` with `results()` that turns a job ended without a result (cancelled, killed, or
    failed outside the task) into one log line and a finished job for Hydra, instead of an
    exception that would stop the wait for the sweep's other jobs; the job's run dir and the
    sweep's end say how far it got."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    class ResultOrEnd(job_class):
        def results(self) -> list[Any]:
            try:
                return super().results()
            except (UncompletedJobError, FailedJobError) as error:
                reason = " ".join(str(error).splitlines()[:2])
                log.error("SLURM job %s ended without a result: %s", self.job_id, reason)
                return [JobReturn(status=JobStatus.COMPLETED)]

    return ResultOrEnd


def resuming_overrides(overrides: list[str]) -> list[str]:
    """The job's overrides with any `resume=...` replaced by `resume=true`."""
    kept = [override for override in overrides if override.split("=", 1)[0].lstrip("+~") != "resume"]
    return [*kept, "resume=true"]


class _ResumeOnRequeue:
    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(resuming_overrides(list(sweep_overrides)), *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """The job itself (on the node): a failure is logged in the job's log and returned as done."""
        job_return = super().__call__(*args, **kwargs)
        if job_return.status is JobStatus.FAILED:
            error = job_return._return_value
            log.error("%s: %s", type(error).__name__, error)
            job_return.status, job_return.return_value = JobStatus.COMPLETED, None
        return job_return


if SlurmLauncher is not None:

    class ResumingSlurmLauncher(_ResumeOnRequeue, SlurmLauncher):
        """hydra/launcher=slurm."""

        def launch(self, *args: Any, **kwargs: Any) -> Any:
            from submitit.slurm.slurm import SlurmExecutor, SlurmJob

            SlurmExecutor.job_class = result_or_end(SlurmJob)
            if accounting_is_off():
                log.info("SLURM accounting is off: job states come from squeue, not sacct")
                SlurmJob.watcher = queue_watcher(delay_s=SlurmJob.watcher._delay_s)
            return super().launch(*args, **kwargs)

    class ResumingLocalLauncher(_ResumeOnRequeue, LocalLauncher):
        """hydra/launcher=local: the same machinery as SLURM, as processes on this machine."""
