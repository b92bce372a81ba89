"""`python -m runner [group=option ...] [key=value ...]`: compose the config and run the replay."""

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError, Interrupted, RunnerError, raise_interrupted
from runner.outputs import safe_name, unique_dir
from runner.schema import refuse_secrets, register_configs, to_run_config

register_configs()
OmegaConf.register_new_resolver("unique_dir", unique_dir)
OmegaConf.register_new_resolver("safe_name", safe_name)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from runner.app import run  # imports torch: kept out of --help and --cfg

    try:
        run(to_run_config(cfg), Path(HydraConfig.get().runtime.output_dir))
    except RunnerError as error:
        logging.getLogger("runner").error("%s", error)
        if HydraConfig.get().mode is RunMode.MULTIRUN:
            raise  # this job fails; the sweep's other jobs still run
        sys.exit(1)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        refuse_secrets(sys.argv[1:])
        main()
    except ConfigError as error:
        sys.exit(f"error: {error}")
    except (KeyboardInterrupt, Interrupted) as stop:  # before the run began: nothing to keep
        sys.exit(f"interrupted ({type(stop).__name__}) before the run began")
