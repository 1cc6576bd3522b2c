"""Evaluate PPO against the HPA, the tuned HPA and simple rules, in the learned and the
reference environment, and write the report: `python -m experiments.evaluate
[agent_dir=<agent folder>] [checkpoint=<model folder>]` (conf/evaluate.yaml).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from research.assessment import assess
from research.logger import MetricsLogger

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Log devices and config, run the evaluation, write the report to the run folder."""
    log.info("devices: %s", jax.devices())
    log.info("evaluate config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    out = Path(HydraConfig.get().runtime.output_dir)
    settings = OmegaConf.to_container(cfg, resolve=True)
    with MetricsLogger(run_dir=out, config=settings, use_wandb=bool(cfg.wandb)) as logger:
        assess(settings, out, logger)
    log.info("report written to %s", out / "report.md")


if __name__ == "__main__":
    main()
