"""Process-wide settings every kubeworld process needs, applied when `research` or `jaxsim` is
imported.

XLA: jaxlib 0.10.2 on CPU: a jitted PPO training loop vmapped over two or more seeds never
finishes with the concurrency-optimised thunk scheduler (every XLA thread waits for work, the
caller waits for the result; one seed, or the same program with the scheduler off, finishes).
`XLA_FLAGS` turns that scheduler off. It only takes effect before JAX creates its CPU backend,
i.e. before the first computation of the process, which importing this package precedes.

Logging: orbax logs every checkpoint save and restore through absl at INFO, dozens of lines
each, which buries the pipeline's own log; absl is raised to WARNING.
"""

from __future__ import annotations

import logging
import os

XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def configure() -> None:
    """Appends `XLA_FLAGS` to the environment's unless the user already sets them, and quiets
    absl's INFO records."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    missing = [f for f in XLA_FLAGS if f.split("=")[0] not in names]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    logging.getLogger("absl").setLevel(logging.WARNING)
