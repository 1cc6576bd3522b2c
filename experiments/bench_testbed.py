"""Benchmark: how much CPU the testbed (supervisor, replicas, load generator) takes under load.

Writes a JSON with the cores used by the testbed's processes and what is left of the machine.

    python -m experiments.bench_testbed rate_rps=30 measure_s=30
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import hydra
import psutil
import requests
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from prometheus_client.parser import text_string_to_metric_families

from collectors.testbed import ConstantLoad, Testbed, TestbedConfig

log = logging.getLogger(__name__)


def cpu_seconds_by_role(tb: Testbed) -> dict[str, float]:
    """CPU seconds (user + system) so far of the supervisor, the load generator, the replicas."""
    supervisor = psutil.Process(tb.supervisor_pid)
    replica_pids = {p["pid"] for p in tb.pods() if p["pid"]}
    out = {"supervisor": 0.0, "loadgen": 0.0, "replicas": 0.0}
    for proc in [supervisor, *supervisor.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        role = "supervisor" if proc.pid == tb.supervisor_pid else "loadgen"
        role = "replicas" if proc.pid in replica_pids else role
        out[role] += times.user + times.system
    return out


def scrape_all(tb: Testbed, session: requests.Session) -> dict[str, float]:
    """Scrape every target once; returns the load generator's request counts by code."""
    codes: dict[str, float] = {}
    for job, targets in tb.scrape_targets().items():
        for target in targets:
            text = session.get(f"http://{target}/metrics", timeout=5).text
            if job == "loadgen":
                for fam in text_string_to_metric_families(text):
                    for s in fam.samples:
                        if s.name == "loadgen_requests_total":
                            codes[s.labels["code"]] = s.value
    return codes


def measure(tb: Testbed, cfg: DictConfig) -> dict:
    """Scrape at the collector's interval for `measure_s` seconds and account the CPU used."""
    session = requests.Session()
    time.sleep(cfg.warmup_s)
    codes0 = scrape_all(tb, session)
    cpu0, me0, t0 = cpu_seconds_by_role(tb), time.process_time(), time.monotonic()
    node0 = psutil.cpu_times()
    while time.monotonic() - t0 < cfg.measure_s:
        time.sleep(cfg.scrape_interval_s)
        codes1 = scrape_all(tb, session)
    cpu1, me1, wall_s = cpu_seconds_by_role(tb), time.process_time(), time.monotonic() - t0
    node1 = psutil.cpu_times()
    cores = {role: (cpu1[role] - cpu0[role]) / wall_s for role in cpu0}
    testbed_cores = sum(cores.values())
    n_cores = len(os.sched_getaffinity(0))
    node_busy = (node1.user + node1.system) - (node0.user + node0.system)
    answered = {c: codes1[c] - codes0.get(c, 0) for c in codes1}
    return {
        "rate_rps": cfg.rate_rps,
        "measure_s": wall_s,
        "machine_cores": n_cores,
        "testbed_cores": testbed_cores,
        "testbed_cores_by_role": cores,
        "scraper_cores": (me1 - me0) / wall_s,
        "free_cores_for_collector": n_cores - testbed_cores,
        "free_fraction": 1.0 - testbed_cores / n_cores,
        "node_busy_cores_all_processes": node_busy / wall_s,
        "throughput_rps": answered.get("200", 0.0) / wall_s,
        "requests_by_code": answered,
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_testbed")
def main(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    config = TestbedConfig(load=ConstantLoad(cfg.rate_rps), startup_delay_s=cfg.startup_delay_s)
    with Testbed(config) as tb:
        result = measure(tb, cfg)
    out = Path(HydraConfig.get().runtime.output_dir) / cfg.out
    out.write_text(json.dumps(result, indent=2))
    log.info("testbed at %.0f rps uses %.3f of %d cores (%.0f%% free); wrote %s", cfg.rate_rps,
             result["testbed_cores"], result["machine_cores"], 100 * result["free_fraction"],
             out)  # fmt: skip


if __name__ == "__main__":
    main()
