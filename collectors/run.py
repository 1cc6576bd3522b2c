"""Collection runs as library functions: `collect_testbed` and `collect_kubernetes`.

Each builds the sources, the cluster handle and the fault backend for its target, then runs the
same thing (`run_collection`): the sampling loop, the fault injector in a background thread and
the exploration policy through the replica actuator, writing a dataset through `ParquetSink`
(and the recent window to a `MemoryStore`). Setting `stop` (an Event; the entry point sets it
on SIGTERM and Ctrl-C) ends the run cleanly: faults rolled back, everything flushed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from collectors.actuator import ReplicaActuator
from collectors.collector import Collector, RunInfo, new_run_id
from collectors.errors import ConfigError
from collectors.explore import ExplorationHook, make_explorer
from collectors.faults import (
    FaultInjector,
    FaultJournal,
    FaultSpec,
    Guardrails,
    random_schedule,
    recover_fault_journals,
    scripted_schedule,
)
from collectors.memory import MemoryStore
from collectors.queries import QuerySet, promql_duration
from collectors.sink import ParquetSink

log = logging.getLogger(__name__)


def plain(cfg: Any) -> dict:
    """A Hydra/OmegaConf config (or a dict) as a plain, resolved dict."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def make_schedule(faults: Mapping, horizon_s: float, services: list[str], seed: int):
    """The fault schedule of `conf/faults/<name>.yaml` (name: none | random | scripted)."""
    name = faults.get("name", "none")
    if name == "none":
        return []
    if name == "scripted":
        return scripted_schedule(faults["faults"])
    if name == "random":
        return random_schedule(
            horizon_s=horizon_s,
            targets=faults.get("targets") or services,
            rates_per_min=dict(faults["rates_per_min"]),
            duration_s=tuple(faults["duration_s"]),
            severity=tuple(faults["severity"]),
            seed=seed,
            start_after_s=faults.get("start_after_s", 0.0),
        )
    raise ConfigError(f"faults.name {name!r} not in ['none', 'random', 'scripted']")


def run_collection(
    cfg: Mapping,
    out: str | Path,
    info: RunInfo,
    sources: list,
    cluster,
    backend,
    stop: threading.Event | None = None,
) -> str:
    """Collect for `cfg["duration_s"]` into the dataset `out`; returns the run id."""
    src, faults = cfg["source"], cfg.get("faults", {"name": "none"})
    store = MemoryStore(cfg.get("memory_steps", 600))
    stop = stop or threading.Event()
    with ParquetSink(out, flush_rows=cfg.get("flush_rows", 1000)) as sink:
        if recover_fault_journals(out, sink):
            log.warning("recovered fault events of an earlier killed run in %s", out)
        bounds = (src["min_replicas"], src["max_replicas"])
        actuator = ReplicaActuator(cluster, info.run_id, *bounds, sink=sink, store=store)
        explorer = make_explorer(cfg.get("explorer", {"name": "none"}), list(info.services), bounds)
        collector = Collector(
            info,
            sources,
            store,
            sink,
            on_step=[ExplorationHook(explorer, actuator)],
            stop_event=stop,
        )
        schedule: list[FaultSpec] = make_schedule(
            faults, cfg["duration_s"], list(info.services), cfg.get("seed", 0)
        )
        guardrails = Guardrails(
            namespaces=tuple(faults.get("namespaces") or [backend.namespace]),
            max_concurrent=faults.get("max_concurrent", 2),
            protected_services=tuple(faults.get("protected_services") or ()),
            dry_run=faults.get("dry_run", False),
        )
        injector = FaultInjector(
            backend,
            schedule,
            info.run_id,
            guardrails,
            sink=sink,
            store=store,
            journal=FaultJournal(out, info.run_id) if schedule else None,
        )
        n_steps = max(1, round(cfg["duration_s"] / info.interval_s))
        bar = tqdm(total=n_steps, desc=info.run_id, unit="step", disable=not cfg.get("progress"))
        injector.start()
        try:
            stats = collector.run(n_steps=n_steps, progress=lambda k, s: _tick(bar, s, injector))
        finally:
            bar.close()
            injector.stop()
            sink.flush()
            injector.close_journal()
    log.info(
        "run %s written to %s: %d steps (%d late), %d faults, %d scale actions",
        info.run_id,
        out,
        stats.steps,
        stats.late_steps,
        len(injector.events),
        len(actuator.events),
    )
    return info.run_id


def _tick(bar, stats, injector) -> None:
    bar.update(1)
    bar.set_postfix(late=stats.late_steps, faults=len(injector.active), fails=stats.source_failures)


def collect_testbed(cfg: Any, out: str | Path, stop: threading.Event | None = None) -> str:
    """Start the testbed (or attach to `source.api_url`), collect, stop it; returns the run id.

    `cfg` is the `conf/collect.yaml` composition (with `source=testbed`) or an equal dict.
    `source.metrics` picks the metrics path: `scrape` (direct) or `prometheus` (a real
    Prometheus started on loopback, discovering the testbed's targets).
    """
    from collectors.faults import TestbedFaultBackend
    from collectors.prometheus_server import PrometheusServer
    from collectors.sources.prometheus import PrometheusSource
    from collectors.sources.scrape import ScrapeSource
    from collectors.sources.testbed import TestbedCluster, TestbedSource
    from collectors.testbed import Testbed, TestbedConfig

    cfg = plain(cfg)
    src, interval_s = cfg["source"], float(cfg["interval_s"])
    with ExitStack() as stack:
        api_url = src.get("api_url")
        if not api_url:
            testbed_cfg = TestbedConfig(
                load=src.get("load"),
                initial_replicas=dict(src.get("initial_replicas") or {}),
                min_replicas=src["min_replicas"],
                max_replicas=src["max_replicas"],
            )
            api_url = stack.enter_context(Testbed(testbed_cfg)).api_url
        cluster = TestbedCluster(api_url)
        doc = cluster.describe()
        entry, window_s = doc["entry"], cfg["rate_window_intervals"] * interval_s
        sources: list = [TestbedSource(cluster)]
        if src["metrics"] == "prometheus":
            prom = stack.enter_context(
                PrometheusServer(sd_url=doc["sd_url"], scrape_interval_s=src["scrape_interval_s"])
            )
            queries = QuerySet.from_mapping(src["queries"]).render(
                doc["namespace"], promql_duration(window_s)
            )
            sources.append(PrometheusSource(prom.url, queries, entry_service=entry))
        elif src["metrics"] == "scrape":
            sources.append(
                ScrapeSource(
                    cluster.sd_groups, window_s, entry_service=entry, default_node=doc["node"]
                )
            )
        else:
            raise ConfigError(f"source.metrics {src['metrics']!r} not in ['scrape', 'prometheus']")
        info = RunInfo(
            run_id=cfg.get("run_id") or new_run_id("tb"),
            source="testbed",
            app="testbed",
            interval_s=interval_s,
            services=tuple(doc["services"]),
            entry_service=entry,
            call_graph=tuple(tuple(e) for e in doc["call_graph"]),
            config=cfg,
        )
        backend = TestbedFaultBackend(cluster, doc["namespace"])
        return run_collection(cfg, out, info, sources, cluster, backend, stop)


def collect_kubernetes(cfg: Any, out: str | Path, stop: threading.Event | None = None) -> str:
    """Collect from a Kubernetes namespace through its Prometheus; returns the run id.

    Replicas (and, when served, the metrics API) come from the Kubernetes API; the metric
    columns from `source.prometheus_url` with `source.queries`. Faults go through the API (pod
    deletion) and Chaos Mesh objects.
    """
    from collectors.faults import KubernetesFaultBackend
    from collectors.sources.kubernetes import KubernetesCluster, KubernetesSource, api_client
    from collectors.sources.prometheus import PrometheusSource

    cfg = plain(cfg)
    src, interval_s = cfg["source"], float(cfg["interval_s"])
    api = api_client(src.get("kubeconfig"), src.get("context"), src["in_cluster"], src.get("host"))
    cluster = KubernetesCluster(
        api, src["namespace"], src.get("services"), src.get("label_selector")
    )
    services = cluster.services()
    if not services:
        raise ConfigError(f"source.namespace {src['namespace']!r}: no deployments found")
    entry = src.get("entry_service") or services[0]
    window = promql_duration(cfg["rate_window_intervals"] * interval_s)
    queries = QuerySet.from_mapping(src["queries"]).render(src["namespace"], window)
    sources = [
        KubernetesSource(cluster, src["use_metrics_api"]),
        PrometheusSource(src["prometheus_url"], queries, entry_service=entry),
    ]
    info = RunInfo(
        run_id=cfg.get("run_id") or new_run_id("k8s"),
        source="kubernetes",
        app=src.get("app") or src["namespace"],
        interval_s=interval_s,
        services=tuple(services),
        entry_service=entry,
        call_graph=tuple(tuple(e) for e in src.get("call_graph") or ()),
        config=cfg,
    )
    backend = KubernetesFaultBackend(cluster, **dict(src.get("chaos") or {}))
    return run_collection(cfg, out, info, sources, cluster, backend, stop)
