"""Import a public dataset into a kubeworld dataset folder and print a summary of its runs.

python -m experiments.import_data source=nezha path=../shared/data/nezha-ob out=data/nezha
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from collectors.dataset import run_summary
from collectors.errors import ConfigError
from collectors.importers import IMPORTERS

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="import_data")
def main(cfg: DictConfig) -> None:
    """Run the importer named by `cfg.source.name` and print runs, steps, services and events."""
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    if cfg.source.name not in IMPORTERS:
        raise ConfigError(f"source={cfg.source.name!r}: allowed values are {sorted(IMPORTERS)}")
    out = Path(to_absolute_path(cfg.out)).resolve()
    path = Path(to_absolute_path(cfg.path)).resolve()
    run_ids = IMPORTERS[cfg.source.name](path, out, overwrite=cfg.overwrite)
    for run_id in run_ids:
        summary = run_summary(out, run_id)
        print(
            f"run {run_id}: {summary['steps']} steps, {summary['services']} services, "
            f"{summary['nodes']} nodes, {summary['events']} events -> {out}"
        )


if __name__ == "__main__":
    main()
