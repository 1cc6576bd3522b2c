"""Collect a training dataset: `python -m experiments.collect source=testbed duration_s=600
faults=random explorer=random_walk out=<dataset>`.

SIGTERM or Ctrl-C ends the run cleanly: faults rolled back, everything collected on disk.
"""

from __future__ import annotations

import logging
import signal
import threading

import hydra
from omegaconf import DictConfig, OmegaConf

from collectors.run import collect_kubernetes, collect_testbed

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="collect")
def main(cfg: DictConfig) -> str:
    """Compose the config, log it, install the stop signals, run the collection."""
    log.info("collect config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    stop = threading.Event()

    def on_signal(signum, frame):
        log.warning("signal %d: stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    collect = {"testbed": collect_testbed, "kubernetes": collect_kubernetes}[cfg.source.name]
    run_id = collect(cfg, cfg.out, stop=stop)
    log.info("run %s collected into %s", run_id, cfg.out)
    return run_id


if __name__ == "__main__":
    main()
