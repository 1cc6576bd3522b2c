"""A small synthetic dataset in the Parquet contract, for tests and smoke runs of the model.

A four-service application (frontend -> catalog, frontend -> checkout -> payment) as a fluid
queue per service: a backlog that grows when arrivals exceed the ready replicas' capacity,
latencies that grow with utilisation and backlog, errors under overload and faults, replicas
that follow a random walk with a start-up delay, a diurnal entry load with spikes, and injected
faults recorded in the `events` table. Noise is multiplicative. It is no stand-in for measured
data; it only gives the model something with real dynamics to learn.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from collectors.schema import FAULT_TYPES, METRIC_COLUMNS

SERVICES = ("frontend", "catalog", "checkout", "payment")
CALL_GRAPH = (("frontend", "catalog"), ("frontend", "checkout"), ("checkout", "payment"))
VISITS = np.array([1.0, 0.8, 0.3, 0.3])  # requests per entry request
CAPACITY_RPS = np.array([30.0, 25.0, 12.0, 12.0])  # per ready replica
SERVICE_TIME_S = np.array([0.01, 0.02, 0.04, 0.03])


def simulate_run(
    n_steps: int,
    seed: int,
    load_rps: float = 40.0,
    fault_rate: float = 0.01,
    capacity_scale: float = 1.0,
    interval_s: float = 2.0,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """One run: arrays {metrics (T, S, M), replicas (T, S, 2)} and a list of fault events.

    Events carry `start`/`end` step indices, `type`, `target` and `severity`.
    """
    rng = np.random.default_rng(seed)
    n_s = len(SERVICES)
    t = np.arange(n_steps)
    period = rng.uniform(150, 400)
    rate = load_rps * (1 + 0.5 * np.sin(2 * np.pi * t / period + rng.uniform(0, 6)))
    for _ in range(max(1, n_steps // 300)):
        s0 = rng.integers(0, n_steps)
        rate[s0 : s0 + rng.integers(5, 20)] *= rng.uniform(1.5, 2.5)
    rate *= np.exp(rng.normal(0, 0.05, n_steps))

    events, fault_sev = _faults(rng, n_steps, fault_rate)
    desired = _replica_walk(rng, n_steps)
    ready = np.concatenate([np.ones((3, n_s)), desired[:-3]]).astype(float)
    ready = np.minimum(ready, desired)
    ready = np.maximum(ready - (fault_sev[:, :, 0] > 0), 0)

    metrics = np.zeros((n_steps, n_s, len(METRIC_COLUMNS)))
    backlog = np.zeros(n_s)
    for i in range(n_steps):
        metrics[i], backlog = _one_step(
            rate[i], ready[i], fault_sev[i], backlog, capacity_scale, interval_s
        )
    metrics *= np.exp(rng.normal(0, 0.03, metrics.shape))
    metrics[:, :, 2] = np.clip(metrics[:, :, 2], 0, 1)
    metrics[:, :, 1] = np.minimum(metrics[:, :, 1], metrics[:, :, 0])
    metrics[:, :, 4] = np.maximum(metrics[:, :, 4], metrics[:, :, 3])
    metrics[:, :, 5] = np.maximum(metrics[:, :, 5], metrics[:, :, 4])
    replicas = np.stack([desired, ready], axis=-1)
    return {"metrics": metrics, "replicas": replicas}, events


def _faults(rng, n_steps, fault_rate):
    sev = np.zeros((n_steps, len(SERVICES), len(FAULT_TYPES)))
    events = []
    i = 0
    while i < n_steps:
        if rng.random() < fault_rate:
            f = int(rng.integers(0, len(FAULT_TYPES)))
            s = int(rng.integers(0, len(SERVICES)))
            length = int(rng.integers(10, 40))
            severity = float(rng.uniform(0.3, 1.0))
            sev[i : i + length, s, f] = severity
            events.append(
                {
                    "start": i,
                    "end": min(i + length, n_steps),
                    "type": FAULT_TYPES[f],
                    "target": SERVICES[s],
                    "severity": severity,
                }
            )
            i += length
        i += 1
    return events, sev


def _replica_walk(rng, n_steps):
    desired = np.zeros((n_steps, len(SERVICES)))
    current = rng.integers(1, 4, len(SERVICES)).astype(float)
    for i in range(n_steps):
        change = rng.random(len(SERVICES)) < 0.04
        current = np.clip(current + change * rng.choice([-1, 1], len(SERVICES)), 1, 6)
        desired[i] = current
    return desired


def _one_step(entry_rps, ready, sev, backlog, capacity_scale, interval_s):
    """Metrics (S, M) of one step and the new backlog (S,) of the fluid queues."""
    cpu_f, mem_f, lat_f, err_f, net_f = (FAULT_TYPES.index(n) for n in FAULT_TYPES[1:])
    offered = entry_rps * VISITS
    capacity = np.maximum(ready, 0.05) * CAPACITY_RPS * capacity_scale * (1 - 0.5 * sev[:, cpu_f])
    served = np.minimum(offered + backlog / interval_s, capacity)
    backlog = np.clip(backlog + (offered - served) * interval_s, 0, 2000)
    util = np.clip(offered / capacity, 0, 0.97)
    dropped = np.clip((backlog - 500) / 1500, 0, 1)
    error = np.clip(0.002 + 0.4 * sev[:, err_f] + 0.5 * dropped, 0, 1)
    wait = SERVICE_TIME_S / (1 - util) + backlog / np.maximum(capacity, 1e-3)
    p50 = wait + 0.1 * sev[:, lat_f] + 0.05 * sev[:, net_f]
    out = np.zeros((len(SERVICES), len(METRIC_COLUMNS)))
    out[:, 0] = offered
    out[:, 1] = served * (1 - error)
    out[:, 2] = error
    out[:, 3] = p50
    out[:, 4] = p50 * (2.2 + util)
    out[:, 5] = p50 * (3.5 + 2 * util)
    out[:, 6] = served * SERVICE_TIME_S * 1.5 + 0.02 * ready + sev[:, cpu_f] * 0.5
    out[:, 7] = 60e6 * np.maximum(ready, 1) + 2e4 * backlog + 2e8 * sev[:, mem_f]
    out[:, 8] = offered * 2000
    out[:, 9] = served * 8000
    return out, backlog


def run_arrays(n_runs: int, n_steps: int, seed: int = 0, fault_rate: float = 0.02, prefix="syn"):
    """`n_runs` simulated runs as `research.data.RunArrays`, faults included, without Parquet."""
    from research.data import RunArrays

    rate = METRIC_COLUMNS.index("request_rate_rps")
    runs = []
    for i in range(n_runs):
        arrays, events = simulate_run(n_steps, seed + i, fault_rate=fault_rate)
        faults = np.zeros((n_steps, len(SERVICES), len(FAULT_TYPES)), np.float32)
        for e in events:
            s, f = SERVICES.index(e["target"]), FAULT_TYPES.index(e["type"])
            faults[e["start"] : e["end"], s, f] = e["severity"]
        metrics = arrays["metrics"].astype(np.float32)
        run = RunArrays(
            run_id=f"{prefix}-{seed + i}",
            services=list(SERVICES),
            entry_index=0,
            metrics=metrics,
            mask=np.ones_like(metrics),
            replicas=arrays["replicas"].astype(np.float32),
            entry_rate=metrics[:, 0, rate],
            faults=faults,
        )
        runs.append(run)
    return runs


def write_dataset(
    path: str | Path,
    n_runs: int = 3,
    n_steps: int = 600,
    seed: int = 0,
    load_rps: float = 40.0,
    fault_rate: float = 0.01,
    capacity_scale: float = 1.0,
    interval_s: float = 2.0,
    prefix: str = "syn",
) -> list[str]:
    """Writes `n_runs` simulated runs into a dataset folder; returns their run ids."""
    from collectors.sink import ParquetSink

    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    run_ids = []
    with ParquetSink(path, flush_rows=100_000) as sink:
        for r in range(n_runs):
            run_id = f"{prefix}-{seed:03d}-{r:02d}"
            run_ids.append(run_id)
            arrays, events = simulate_run(
                n_steps, seed * 1000 + r, load_rps, fault_rate, capacity_scale, interval_s
            )
            t0 = start + dt.timedelta(days=r + 10 * seed)
            sink.write("runs", [_run_row(run_id, t0, interval_s)])
            sink.write("service_metrics", _metric_rows(run_id, t0, arrays, interval_s))
            sink.write("events", _event_rows(run_id, t0, events, interval_s))
    return run_ids


def _run_row(run_id, t0, interval_s):
    return {
        "run_id": run_id,
        "source": "reference",
        "app": "synthetic",
        "interval_s": interval_s,
        "started_at": t0,
        "services": list(SERVICES),
        "entry_service": SERVICES[0],
        "call_graph": [{"source": a, "target": b} for a, b in CALL_GRAPH],
        "config": "{}",
    }


def _metric_rows(run_id, t0, arrays, interval_s):
    metrics, replicas = arrays["metrics"], arrays["replicas"]
    rows = []
    for i in range(metrics.shape[0]):
        ts = t0 + dt.timedelta(seconds=i * interval_s)
        for s, service in enumerate(SERVICES):
            row = {
                "run_id": run_id,
                "ts": ts,
                "step": i,
                "service": service,
                "replicas_desired": int(replicas[i, s, 0]),
                "replicas_ready": int(replicas[i, s, 1]),
            }
            row.update({name: float(metrics[i, s, m]) for m, name in enumerate(METRIC_COLUMNS)})
            rows.append(row)
    return rows


def _event_rows(run_id, t0, events, interval_s):
    return [
        {
            "run_id": run_id,
            "ts_start": t0 + dt.timedelta(seconds=e["start"] * interval_s),
            "ts_end": t0 + dt.timedelta(seconds=e["end"] * interval_s),
            "kind": "fault",
            "type": e["type"],
            "target": e["target"],
            "severity": e["severity"],
            "params": "{}",
            "origin": "injector",
        }
        for e in events
    ]
