"""`python -m runner [group=option ...] [key=value ...]`: compose the config and run the replay."""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config.compose import to_run_config
from runner.config.overrides import check_overrides
from runner.config.presets import CONF_DIR
from runner.config.schema import register_configs
from runner.errors import ConfigError, Interrupted, RunInterrupted, RunnerError
from runner.rundir.layout import register_resolvers
from runner.stop_signals import stop_signals_raise

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        from runner.app import run  # imports torch: kept out of --help and --cfg

        run(to_run_config(cfg), Path(HydraConfig.get().runtime.output_dir))
    except RunnerError as error:
        logging.getLogger("runner").error("%s", error)
        if HydraConfig.get().mode is not RunMode.MULTIRUN:
            sys.exit(1)
        if isinstance(error, RunInterrupted) and os.environ.get("SUBMITIT_FOLDER"):
            # A cluster job stopped by a signal (preempted, requeued, cancelled): no result, so that
            # the submitting command waits for the requeued attempt, or reports the job as ended.
            sys.exit(1)
        # Otherwise this job has failed, which its run dir and log say; the sweep's other jobs
        # still run, and the sweep's end lists every job's status (runner.tools.report.ReportCallback).
    except Exception as error:  # a bug, or the cluster ending the job (submitit's UncompletedJobError)
        if HydraConfig.get().mode is not RunMode.MULTIRUN:
            raise
        logging.getLogger("runner").exception("%s: %s", type(error).__name__, error)


def cli() -> None:
    """`chat-runner ...` and `python -m runner ...`."""
    try:
        with stop_signals_raise():
            check_overrides(sys.argv[1:])
            main()
    except ConfigError as error:
        sys.exit(f"error: {error}")
    except (KeyboardInterrupt, Interrupted) as stop:  # before the run began: nothing to keep
        sys.exit(f"interrupted ({type(stop).__name__}) before the run began")


if __name__ == "__main__":
    cli()
