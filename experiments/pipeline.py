"""The main job (`make run`): python -m experiments.pipeline [profile=quick] [source=...].

Runs the testbed chain and the reference chain of `research.pipeline` and writes everything,
`report.json` and `report.md` included, under the Hydra run folder.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from research import pipeline

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> dict:
    try:
        report = pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    except pipeline.Interrupted as stopped:
        log.warning("%s; the data collected so far is on disk", stopped)
        sys.exit(130)
    log.info("\n%s", pipeline.report_markdown(report))
    return report


if __name__ == "__main__":
    main()
