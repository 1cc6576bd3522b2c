"""Train PPO agents: `python -m experiments.train_agent env=reference` or
`python -m experiments.train_agent env=learned checkpoint=<model folder>`.

Trains `agent.n_seeds` agents at once (vmapped), keeps the best, evaluates it, and writes the
agent (orbax) to `<run dir>/agent` and the summary to `<run dir>/train_agent.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from research.agents.training import train_agent
from research.logger import MetricsLogger

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_agent")
def main(cfg: DictConfig) -> float:
    """Log devices and config, train, save; returns the kept agent's evaluation return."""
    log.info("devices: %s", jax.devices())
    log.info("train_agent config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    out = Path(HydraConfig.get().runtime.output_dir)
    settings = OmegaConf.to_container(cfg, resolve=True)
    with MetricsLogger(run_dir=out, config=settings, use_wandb=bool(cfg.wandb)) as logger:
        summary = train_agent(
            settings["agent"],
            settings["env"],
            out,
            checkpoint=cfg.checkpoint,
            seed=int(cfg.seed),
            eval_episodes=int(cfg.eval_episodes),
            logger=logger,
        )
    (out / "train_agent.json").write_text(json.dumps(summary, indent=2))
    log.info("agent saved to %s", summary["agent_dir"])
    return float(summary["eval"]["return"])


if __name__ == "__main__":
    main()
