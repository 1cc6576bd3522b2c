"""Collection overhead on the testbed at a 2 s interval: step latency and the collector's CPU.

`python -m experiments.bench_collect [steps] [out.json]` starts the testbed under constant load,
runs the sampling loop (direct scraping + supervisor state) for `steps` steps in this process,
and writes to JSON: mean / p95 / max step duration (ms), the collector's CPU time per step (ms)
and as a fraction of one core, late steps.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import psutil

from collectors.collector import Collector, RunInfo
from collectors.memory import MemoryStore
from collectors.sources.scrape import ScrapeSource
from collectors.sources.testbed import TestbedCluster, TestbedSource
from collectors.testbed import ConstantLoad, Testbed, TestbedConfig

INTERVAL_S = 2.0


def bench(n_steps: int) -> dict:
    """Run the loop for `n_steps` at INTERVAL_S on a fresh testbed; returns the figures."""
    with Testbed(TestbedConfig(load=ConstantLoad(20.0))) as tb:
        cluster = TestbedCluster(tb.api_url)
        sources = [
            TestbedSource(cluster),
            ScrapeSource(cluster.sd_groups, 2 * INTERVAL_S, entry_service=tb.entry_service),
        ]
        run = RunInfo("bench", "testbed", "testbed", INTERVAL_S, tuple(tb.services), "frontend")
        collector = Collector(run, sources, store=MemoryStore())
        me = psutil.Process()
        cpu0, wall0 = me.cpu_times(), time.monotonic()
        stats = collector.run(n_steps=n_steps)
        cpu1, wall1 = me.cpu_times(), time.monotonic()
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    durations_ms = sorted(1000 * d for d in stats.step_durations_s)
    return {
        "interval_s": INTERVAL_S,
        "steps": stats.steps,
        "late_steps": stats.late_steps,
        "step_ms_mean": sum(durations_ms) / len(durations_ms),
        "step_ms_p95": durations_ms[int(0.95 * (len(durations_ms) - 1))],
        "step_ms_max": durations_ms[-1],
        "cpu_ms_per_step": 1000 * cpu_s / stats.steps,
        "cpu_fraction_of_one_core": cpu_s / (wall1 - wall0),
        "cpu_count": psutil.cpu_count(),
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    n_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    out = sys.argv[2] if len(sys.argv) > 2 else "bench_collect.json"
    result = bench(n_steps)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
