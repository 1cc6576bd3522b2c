"""Environment throughput benchmark (`make bench`): writes bench.json in the Hydra run folder and
prints a table.

    python -m experiments.bench [checkpoint=<folder>] [quick=true] [hydra.run.dir=<folder>]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from jaxsim.bench import run_benchmark

log = logging.getLogger(__name__)


def print_table(result: dict) -> None:
    table = Table(title="environment throughput")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for n, rate in result["env_steps_per_s"].items():
        table.add_row(f"ClusterEnv steps/s, {n} envs (scan)", f"{rate:,.0f}")
    table.add_row(
        "ClusterEnv steps/s, 1 env (Python loop)", f"{result['python_loop_steps_per_s']:,.0f}"
    )
    table.add_row("QueueingEnv steps/s (scan)", f"{result['reference_env_steps_per_s']:,.0f}")
    table.add_row("model FLOPs per step", f"{result['flops_per_step']:,}")
    table.add_row("matmul peak GFLOP/s", f"{result['matmul_peak_flops'] / 1e9:,.1f}")
    table.add_row(
        f"fraction of peak at {result['peak_fraction_at']} envs", f"{result['peak_fraction']:.1%}"
    )
    Console().print(table)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    sizes = cfg.quick_sizes if cfg.quick else cfg.sizes
    result = run_benchmark(
        OmegaConf.to_container(cfg.model, resolve=True),
        checkpoint=cfg.checkpoint,
        window_steps=int(cfg.env.window_steps),
        episode_steps=int(cfg.env.episode_steps),
        n_starts=int(cfg.env.n_starts),
        progress=lambda name: log.info("measuring %s", name),
        **OmegaConf.to_container(sizes, resolve=True),
    )
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
