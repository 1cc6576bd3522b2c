"""Start the local testbed for interactive use, print its endpoints, run until Ctrl-C.

python -m experiments.testbed
python -m experiments.testbed testbed.load.mean_rps=30 run_s=60
"""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from collectors.testbed import Testbed, TestbedConfig

log = logging.getLogger(__name__)


def describe(tb: Testbed) -> str:
    """The testbed's endpoints, one per line."""
    lines = [
        f"supervisor API   {tb.api_url}  (GET /replicas, POST /scale, POST /faults, GET /faults)",
        f"Prometheus SD    {tb.sd_url}  (http_sd_configs)",
        f"load generator   {tb.loadgen_url}/load",
        f"services         {' '.join(tb.services)} (entry {tb.entry_service})",
    ]
    for job, targets in tb.scrape_targets().items():
        lines.append(f"/metrics {job:<17} {' '.join(targets)}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="testbed")
def main(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    config = TestbedConfig.from_dict(OmegaConf.to_container(cfg.testbed, resolve=True))
    with Testbed(config) as tb:
        print(describe(tb), flush=True)
        deadline = time.monotonic() + cfg.run_s if cfg.run_s > 0 else float("inf")
        try:
            while time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.info("stopping the testbed")


if __name__ == "__main__":
    main()
