"""Named, timed, resumable stages of a long job.

A stage is a function returning a JSON-serialisable dict (paths it wrote, figures it measured).
`Stages` runs it, times it, logs it and stores its result as `<run_dir>/stages/<name>.json`;
with `resume=True` a stage whose result file exists is not run again and its stored result is
returned instead, so an interrupted pipeline picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Stages:
    """Runs stages under `run_dir`, recording `timings_s` per stage name."""

    def __init__(self, run_dir: str | Path, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.timings_s: dict[str, float] = {}
        (self.run_dir / "stages").mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.run_dir / "stages" / f"{name.replace('/', '.')}.json"

    def __call__(self, name: str, fn: Callable[..., dict[str, Any]], *args, **kwargs) -> dict:
        done = self.path(name)
        if self.resume and done.exists():
            record = json.loads(done.read_text())
            self.timings_s[name] = record["seconds"]
            log.info("stage %s: skipped, result of an earlier run in %s", name, done)
            return record["result"]

        log.info("stage %s: started", name)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
        self.timings_s[name] = seconds
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": seconds, "result": result}, indent=2, default=str))
        os.replace(tmp, done)
        log.info("stage %s: done in %.1f s", name, seconds)
        return result
