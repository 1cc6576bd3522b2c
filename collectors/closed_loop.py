"""Run a replica policy in closed loop on the live testbed and return what it saw.

`run_live(testbed, policy, ...)` samples the testbed every `interval_s` (direct scraping), hands
the policy the recent `service_metrics` rows after each step, applies its targets through the
replica actuator (origin `agent`, so every change is an event), optionally runs a fault
schedule, and returns the per-step service metrics of the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import polars as pl

from collectors.actuator import ReplicaActuator
from collectors.collector import Collector, RunInfo, new_run_id
from collectors.faults import FaultInjector, FaultSpec, Guardrails, TestbedFaultBackend
from collectors.memory import MemoryStore
from collectors.sources.scrape import ScrapeSource
from collectors.sources.testbed import TestbedCluster, TestbedSource

Policy = Callable[[pl.DataFrame], dict[str, int]]


def run_live(
    testbed,
    policy: Policy,
    duration_s: float,
    interval_s: float = 2.0,
    load_curve=None,
    fault_schedule: Sequence[FaultSpec] = (),
    history_steps: int = 32,
    sink=None,
) -> pl.DataFrame:
    """Closed-loop run of `policy` on `testbed` (a started `Testbed`) for `duration_s`.

    `policy(history)` gets the last `history_steps` steps of service metrics (all services,
    oldest first) and returns service -> target replicas (clamped to the testbed's bounds).
    `load_curve` (a curve or its dict spec) is set before the run when given. Returns the
    run's service metrics, one row per step and service, as the dataset would hold them.
    """
    if load_curve is not None:
        testbed.set_load(load_curve)
    cluster = TestbedCluster(testbed.api_url)
    run = RunInfo(
        run_id=new_run_id("live"),
        source="testbed",
        app="testbed",
        interval_s=interval_s,
        services=tuple(testbed.services),
        entry_service=testbed.entry_service,
        call_graph=tuple(testbed.call_graph),
        config={"closed_loop": True, "duration_s": duration_s},
    )
    n_steps = max(1, round(duration_s / interval_s))
    store = MemoryStore(capacity_steps=n_steps + 1)
    bounds = (testbed.config.min_replicas, testbed.config.max_replicas)
    actuator = ReplicaActuator(cluster, run.run_id, *bounds, sink, store, origin="agent")

    def act(step: int, ts_s: float, rows: list[dict]) -> None:
        history = store.frame().filter(pl.col("step") > step - history_steps)
        actuator.apply(policy(history), {r["service"]: r["replicas_desired"] for r in rows})

    sources = [
        TestbedSource(cluster),
        ScrapeSource(
            cluster.sd_groups,
            2 * interval_s,
            entry_service=testbed.entry_service,
            default_node=testbed.node_name,
        ),
    ]
    collector = Collector(run, sources, store, sink, on_step=[act])
    injector = FaultInjector(
        TestbedFaultBackend(cluster, testbed.namespace),
        fault_schedule,
        run.run_id,
        Guardrails((testbed.namespace,), max_concurrent=len(fault_schedule) or 1),
        sink=sink,
        store=store,
    )
    injector.start()
    try:
        collector.run(n_steps=n_steps)
    finally:
        injector.stop()
    return store.frame().sort("step", "service")
