"""Rollouts of the reference queueing environment written as an ordinary dataset.

Each run is one episode of `QueueingEnv` driven by a random-walk replica explorer (per service
and step, with probability `change_prob`, one replica up or down) with faults sampled inside the
environment. The runs are simulated together (vmap + scan) and written through `ParquetSink` as
the four tables of the data contract, with `source="reference"`: scale decisions as `events` of
origin `explorer`, faults as `events` of origin `injector`.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from collectors.schema import FAULT_TYPES, METRIC_COLUMNS, NODE_METRIC_COLUMNS
from collectors.sink import ParquetSink
from jaxsim import workload
from jaxsim.queueing_env import QueueingEnv, QueueingParams
from jaxsim.rollout import collect_metrics, rollout
from research.data import RunArrays

log = logging.getLogger(__name__)

NODE_NAME = "testbed-node"
APP = "reference-queueing"


def explorer_policy(env: QueueingEnv, change_prob: float):
    """Random walk of replicas: each service moves one replica up or down with probability
    `change_prob` per step (bounds are enforced by the environment)."""

    def policy(key: jax.Array, obs: jax.Array, state) -> jax.Array:
        move_key, sign_key = jax.random.split(key)
        shape = (env.layout.n_services,)
        move = jax.random.bernoulli(move_key, change_prob, shape)
        sign = jnp.where(jax.random.bernoulli(sign_key, 0.5, shape), 1, -1)
        return (env.max_delta + move * sign).astype(jnp.int32)

    return policy


def simulate(
    n_runs: int,
    steps_per_run: int,
    seed: int,
    change_prob: float = 0.1,
    fault_rate_per_step: float = 0.03,
    env: QueueingEnv | None = None,
    params: QueueingParams | None = None,
) -> dict[str, np.ndarray]:
    """Simulate `n_runs` runs of `steps_per_run` steps (the reset state is step 0).

    Returns numpy arrays with axes (T, B, ...): metrics (T, B, S, M) physical, replicas and
    ready (T, B, S) int32, faults (T, B, S, F), reward and done (T, B).
    """
    env = env or QueueingEnv()
    params = _run_params(env, params, n_runs, steps_per_run, seed, fault_rate_per_step)
    policy = explorer_policy(env, change_prob)
    _, _, steps = rollout(
        env, params, jax.random.key(seed), policy, n_runs, steps_per_run - 1, collect_metrics
    )
    first = _first_step(env, params, jax.random.key(seed), n_runs)
    return {k: np.concatenate([first[k][None], np.asarray(steps[k])]) for k in first}


def reference_runs(
    n_runs: int, steps_per_run: int, seed: int, env: QueueingEnv | None = None, **kwargs
) -> list[RunArrays]:
    """Simulated runs as `research.data.RunArrays` (what `load_runs` returns for a dataset),
    without writing them: a quick data source for `ClusterEnv` and tests."""
    env = env or QueueingEnv()
    trajectory = simulate(n_runs, steps_per_run, seed, env=env, **kwargs)
    entry = env.layout.entry_index
    rate = METRIC_COLUMNS.index("request_rate_rps")
    runs = []
    for b in range(n_runs):
        metrics = trajectory["metrics"][:, b].astype(np.float32)
        runs.append(
            RunArrays(
                run_id=f"sim-{seed}-{b}",
                services=list(env.services),
                entry_index=entry,
                metrics=metrics,
                mask=np.ones_like(metrics),
                replicas=np.stack(
                    [trajectory["replicas"][:, b], trajectory["ready"][:, b]], axis=-1
                ).astype(np.float32),
                entry_rate=metrics[:, entry, rate],
                faults=trajectory["faults"][:, b].astype(np.float32),
                interval_s=float(env.interval_s),
            )
        )
    return runs


def write_reference_dataset(
    out: str | Path,
    n_runs: int,
    steps_per_run: int,
    seed: int,
    change_prob: float = 0.1,
    fault_rate_per_step: float = 0.03,
    env: QueueingEnv | None = None,
    params: QueueingParams | None = None,
    started_at: datetime | None = None,
    node_cores: float = 8.0,
    node_memory_bytes: float = 16 * 2**30,
) -> list[str]:
    """Simulate `n_runs` runs of `steps_per_run` steps and write them to the dataset `out`.

    `params` defaults to the environment's defaults with synthetic traces long enough for the
    runs and the given fault rate. Returns the new run ids, in order.
    """
    env = env or QueueingEnv()
    trajectory = simulate(
        n_runs, steps_per_run, seed, change_prob, fault_rate_per_step, env, params
    )
    started_at = started_at or datetime.now(UTC).replace(microsecond=0)
    run_ids = [_run_id(started_at) for _ in range(n_runs)]
    config = {
        "seed": seed,
        "steps": steps_per_run,
        "change_prob": change_prob,
        "fault_rate_per_step": fault_rate_per_step,
        "layout": asdict(env.layout),
    }
    with ParquetSink(out, flush_rows=50_000) as sink:
        for b, run_id in enumerate(run_ids):
            run = {k: v[:, b] for k, v in trajectory.items()}
            _write_run(sink, env, run_id, run, started_at, config, node_cores, node_memory_bytes)
    log.info("wrote %d reference runs of %d steps to %s", n_runs, steps_per_run, out)
    return run_ids


def _run_params(env, params, n_runs, steps_per_run, seed, fault_rate_per_step) -> QueueingParams:
    if params is None:
        traces = workload.synthetic_traces(seed, max(n_runs, 4), steps_per_run * 2 + 16)
        params = env.make_params(
            traces=jnp.asarray(traces),
            faults=workload.FaultSpec(rate_per_step=fault_rate_per_step),
            max_steps_in_episode=steps_per_run,
        )
    else:
        params = params.replace(
            max_steps_in_episode=max(int(params.max_steps_in_episode), steps_per_run)
        )
        env.check_params(params)
    return params


def _first_step(env, params, key, n_runs) -> dict[str, np.ndarray]:
    """The reset states of the rollout (the same keys as `rollout` uses)."""
    reset_key, _ = jax.random.split(key)
    keys = jax.random.split(reset_key, n_runs)
    _, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    zeros = np.zeros(n_runs, np.float32)
    return {
        "metrics": np.asarray(state.metrics),
        "replicas": np.asarray(state.replicas),
        "ready": np.asarray(state.ready),
        "faults": np.asarray(state.faults),
        "reward": zeros,
        "done": zeros.astype(bool),
    }


def _run_id(started_at: datetime) -> str:
    return f"ref-{started_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"


def _write_run(sink, env, run_id, run, started_at, config, node_cores, node_memory_bytes):
    n_steps = run["metrics"].shape[0]
    interval = timedelta(seconds=env.interval_s)
    naive = started_at.astimezone(UTC).replace(tzinfo=None)
    times = np.array([naive + i * interval for i in range(n_steps + 1)], dtype="datetime64[ms]")
    sink.write("runs", [_runs_row(env, run_id, started_at, config)])
    sink.write("service_metrics", _service_table(env, run_id, run, times[:-1]))
    sink.write("node_metrics", _node_table(run_id, run, times[:-1], node_cores, node_memory_bytes))
    events = _fault_events(env, run_id, run["faults"], times) + _scale_events(
        env, run_id, run["replicas"], times
    )
    if events:
        sink.write("events", events)


def _runs_row(env, run_id, started_at, config) -> dict:
    return {
        "run_id": run_id,
        "source": "reference",
        "app": APP,
        "interval_s": float(env.interval_s),
        "started_at": started_at,
        "services": list(env.services),
        "entry_service": env.entry_service,
        "call_graph": [{"source": a, "target": b} for a, b in env.layout.call_graph],
        "config": json.dumps(config),
    }


def _service_table(env, run_id, run, times) -> pa.Table:
    n_steps, n_services = run["replicas"].shape
    columns = {
        "run_id": np.full(n_steps * n_services, run_id, dtype=object),
        "ts": np.repeat(times, n_services),
        "step": np.repeat(np.arange(n_steps, dtype=np.int64), n_services),
        "service": np.tile(np.array(env.services, dtype=object), n_steps),
        "replicas_desired": run["replicas"].reshape(-1).astype(np.int32),
        "replicas_ready": run["ready"].reshape(-1).astype(np.int32),
    }
    metrics = run["metrics"].reshape(-1, len(METRIC_COLUMNS)).astype(np.float64)
    columns.update({name: metrics[:, i] for i, name in enumerate(METRIC_COLUMNS)})
    return pa.table(columns)


def _node_table(run_id, run, times, node_cores, node_memory_bytes) -> pa.Table:
    total = run["metrics"].sum(axis=1).astype(np.float64)  # (T, M)
    column = {name: i for i, name in enumerate(METRIC_COLUMNS)}
    values = {
        "cpu_utilization": np.minimum(total[:, column["cpu_cores"]] / node_cores, 1.0),
        "memory_utilization": np.minimum(total[:, column["memory_bytes"]] / node_memory_bytes, 1.0),
        "net_rx_bytes_per_s": total[:, column["net_rx_bytes_per_s"]],
        "net_tx_bytes_per_s": total[:, column["net_tx_bytes_per_s"]],
    }
    n_steps = total.shape[0]
    return pa.table(
        {
            "run_id": np.full(n_steps, run_id, dtype=object),
            "ts": times,
            "step": np.arange(n_steps, dtype=np.int64),
            "node": np.full(n_steps, NODE_NAME, dtype=object),
            **{name: values[name] for name in NODE_METRIC_COLUMNS},
        }
    )


def _fault_events(env, run_id, faults, times) -> list[dict]:
    """One event per contiguous stretch of one fault (type, service) at one severity."""
    events = []
    padded = np.concatenate([faults, np.zeros_like(faults[:1])])  # (T + 1, S, F)
    previous = np.concatenate([np.zeros_like(faults[:1]), faults])
    starts = np.argwhere((padded > 0) & (padded != previous))
    for t, s, f in starts:
        severity = padded[t, s, f]
        end = t + 1
        while padded[end, s, f] == severity:
            end += 1
        events.append(
            {
                "run_id": run_id,
                "ts_start": times[t].item(),
                "ts_end": times[end].item(),
                "kind": "fault",
                "type": FAULT_TYPES[f],
                "target": env.services[s],
                "severity": float(min(max(severity, 0.0), 1.0)),
                "params": json.dumps({"start_step": int(t), "end_step": int(end)}),
                "origin": "injector",
            }
        )
    return events


def _scale_events(env, run_id, replicas, times) -> list[dict]:
    """One event per change of desired replicas of one service."""
    changed = np.argwhere(np.diff(replicas, axis=0) != 0)
    return [
        {
            "run_id": run_id,
            "ts_start": times[t + 1].item(),
            "ts_end": times[t + 1].item(),
            "kind": "scale",
            "type": "scale",
            "target": env.services[s],
            "severity": None,
            "params": json.dumps(
                {"from": int(replicas[t, s]), "to": int(replicas[t + 1, s]), "step": int(t + 1)}
            ),
            "origin": "explorer",
        }
        for t, s in changed
    ]
