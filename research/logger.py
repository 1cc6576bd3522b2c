"""One metrics path for the whole codebase: the terminal (through `logging`) and wandb.

Keys are grouped by prefix: `train/`, `eval/`, `loss/`, `data/`, `bench/`. wandb runs offline
unless `WANDB_MODE` says otherwise, so nothing leaves the machine by default.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """Logs scalar metrics to the terminal and, when enabled, to a wandb run.

    Use as a context manager so the wandb run is finished even when training fails:

        with MetricsLogger(project="kubeworld", run_dir=out, config=cfg) as logger:
            logger.log({"loss/nll": 0.3}, step=10)
    """

    def __init__(
        self,
        project: str = "kubeworld",
        run_dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        use_wandb: bool = True,
        name: str | None = None,
        group: str | None = None,
        every: int = 1,
    ):
        self.project = project
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = dict(config or {})
        self.use_wandb = use_wandb
        self.name = name
        self.group = group
        self.every = max(1, every)
        self._run = None
        self._last_time: float | None = None
        self._last_step: int | None = None

    def __enter__(self) -> MetricsLogger:
        if self.use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            wandb_dir = self.run_dir if self.run_dir is not None else Path.cwd()
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=self.project,
                dir=str(wandb_dir),
                config=self.config,
                name=self.name,
                group=self.group,
                reinit="create_new",
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Records `metrics` at `step`; adds `<prefix>/steps_per_s` from the previous call."""
        scalars = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        if self._last_time is not None and step > (self._last_step or 0):
            prefix = next(iter(scalars), "train/").split("/")[0]
            rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            scalars.setdefault(f"{prefix}/steps_per_s", rate)
        self._last_time, self._last_step = now, step

        if self._run is not None:
            self._run.log(scalars, step=step)
        if step % self.every == 0:
            text = "  ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            log.info("step %d  %s", step, text)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Final figures of a run, stored as the wandb run summary and logged once."""
        if self._run is not None:
            for key, value in metrics.items():
                self._run.summary[key] = value
        log.info("summary  %s", "  ".join(f"{k}={v}" for k, v in metrics.items()))
