"""Train the dynamics model: `python -m experiments.train_dynamics data=<dataset> [train=quick]`.

Writes into the Hydra run folder: `checkpoint/` (orbax), `accuracy.json` (nRMSE against
persistence and the linear model, coverage, bound violations) and `predicted_vs_true.png`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from research.accuracy import evaluate, plot_trajectories, write_report
from research.checkpoint import load_model
from research.logger import MetricsLogger
from research.train import fit

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_dynamics")
def main(cfg: DictConfig) -> str:
    """Compose the config, train, evaluate on held-out data; returns the checkpoint path."""
    log.info("devices: %s", jax.devices())
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    out = Path(HydraConfig.get().runtime.output_dir)
    data = Path(to_absolute_path(cfg.data))
    section = {
        name: OmegaConf.to_container(cfg[name], resolve=True)
        for name in ("model", "train", "data_prep")
    }
    with MetricsLogger(run_dir=out, config=section, use_wandb=bool(cfg.wandb)) as logger:
        checkpoint = fit(data, section, out, logger=logger)
        if cfg.evaluate:
            bundle = load_model(checkpoint)
            result = evaluate(bundle, data)
            write_report(result, out / "accuracy.json")
            plot_trajectories(bundle, data, out / "predicted_vs_true.png")
            logger.summary(
                {
                    **{
                        f"eval/nrmse_{k}_{h}": v
                        for k in result["nrmse"]
                        for h, v in result["nrmse"][k].items()
                    },
                    "eval/coverage90": result["coverage90"],
                    "eval/bound_violations": result["bound_violations"],
                }
            )
    log.info("checkpoint: %s", checkpoint)
    return str(checkpoint)


if __name__ == "__main__":
    main()
