"""Policies on the live testbed in closed loop, and the figures of such a run.

`collectors.closed_loop.run_live` calls `policy(history) -> {service: target replicas}` once per
sample interval with the recent `service_metrics` rows. `LiveActor` turns a trained actor into
that shape by building the observation exactly as the simulated environments do
(`jaxsim.core.observation`: the last W steps encoded by the model's normaliser, then desired and
ready replicas over `max_replicas`). `evaluate_live` runs several policies one after the other,
each on a freshly started testbed under the same load curve and fault schedule, and reduces
each run to the figures of `research.evaluation` (return, SLO-violation rate, error ratio, mean
replicas, scaling actions) computed with the same reward terms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from collectors.errors import DataError
from collectors.schema import METRIC_COLUMNS
from jaxsim import core
from jaxsim.core import Layout
from research.normalise import Normaliser

log = logging.getLogger(__name__)

LivePolicy = Callable[[pl.DataFrame], dict[str, int]]


def history_arrays(history: pl.DataFrame, services: Sequence[str], steps: int):
    """The last `steps` steps of `history` as metrics (W, S, M) with NaN where missing, and the
    newest desired and ready replicas (S,). Fewer steps than W repeat the oldest one."""
    if history.is_empty():
        raise DataError("live policy got an empty service_metrics history")
    step_ids = sorted(history["step"].unique().to_list())[-steps:]
    frames = []
    for step in step_ids:
        rows = {
            r["service"]: r for r in history.filter(pl.col("step") == step).iter_rows(named=True)
        }
        missing = [s for s in services if s not in rows]
        if missing:
            raise DataError(f"service_metrics step {step} has no rows for services {missing}")
        frames.append(
            [[np.nan if rows[s][c] is None else float(rows[s][c]) for c in METRIC_COLUMNS]
             for s in services]
        )  # fmt: skip
    metrics = np.asarray(frames, np.float32)
    if len(frames) < steps:
        metrics = np.concatenate([np.repeat(metrics[:1], steps - len(frames), axis=0), metrics])
    newest_rows = history.filter(pl.col("step") == step_ids[-1]).iter_rows(named=True)
    newest = {r["service"]: r for r in newest_rows}
    desired = np.array([int(newest[s]["replicas_desired"] or 0) for s in services], np.int32)
    ready = np.array([int(newest[s]["replicas_ready"] or 0) for s in services], np.int32)
    return metrics, desired, ready


class LiveActor:
    """A trained actor-critic as a live policy (argmax action, one call per interval).

    Missing metrics are carried forward from the previous step of the window, and encode to 0
    (the normalised centre) when never seen.
    """

    def __init__(
        self, network, params: Any, layout: Layout, norm: Normaliser, window_steps: int
    ) -> None:
        self.layout, self.norm, self.window_steps = layout, norm, window_steps

        def act(obs):
            logits, _ = network.apply(params, obs[None])
            return jnp.argmax(logits[0], axis=-1)

        self._act = jax.jit(act)

    def observation(self, history: pl.DataFrame) -> jax.Array:
        metrics, desired, ready = history_arrays(history, self.layout.services, self.window_steps)
        filled = (
            pl.DataFrame(metrics.reshape(len(metrics), -1))
            .fill_nan(None)
            .fill_null(strategy="forward")
        )
        z = self.norm.encode(jnp.asarray(filled.to_numpy().reshape(metrics.shape), jnp.float32))
        z = jnp.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        return core.observation(self.layout, z, jnp.asarray(desired), jnp.asarray(ready))

    def __call__(self, history: pl.DataFrame) -> dict[str, int]:
        _, desired, _ = history_arrays(history, self.layout.services, 1)
        delta = np.asarray(self._act(self.observation(history))) - self.layout.max_delta
        target = np.clip(desired + delta, self.layout.min_replicas, self.layout.max_replicas)
        return {s: int(t) for s, t in zip(self.layout.services, target, strict=True)}


def live_figures(
    frame: pl.DataFrame, layout: Layout, slo_s: float, reward_weights: Sequence[float]
) -> dict[str, Any]:
    """Figures of one closed-loop run (rows per step and service) with the simulated
    environments' reward terms. Steps whose entry p95 is unknown (no request completed) are
    counted as SLO violations, since users saw no answer in time."""
    services = list(layout.services)
    wide = (
        frame.select("step", "service", "replicas_desired", "latency_p95_s", "error_ratio")
        .pivot(on="service", index="step", values=["replicas_desired", "latency_p95_s",
                                                   "error_ratio"])
        .sort("step")
    )  # fmt: skip
    entry = layout.entry_service
    replicas = wide.select([f"replicas_desired_{s}" for s in services]).to_numpy().astype(float)
    p95 = wide[f"latency_p95_s_{entry}"].to_numpy().astype(float)
    errors = np.nan_to_num(wide[f"error_ratio_{entry}"].to_numpy().astype(float), nan=0.0)
    change = np.abs(np.diff(replicas, axis=0, prepend=replicas[:1]))
    violation = np.where(np.isfinite(p95), p95 > slo_s, True).astype(float)
    w = np.asarray(reward_weights, float)[:4]
    reward = -(
        w[0] * violation
        + w[1] * errors
        + w[2] * replicas.sum(axis=1) / (len(services) * layout.max_replicas)
        + w[3] * change.sum(axis=1) / len(services)
    )
    return {
        "return": float(reward.sum()),
        "slo_violation_rate": float(violation.mean()),
        "error_ratio": float(errors.mean()),
        "mean_replicas": float(replicas.sum(axis=1).mean()),
        "scaling_actions": float(change.sum()),
        "steps": int(len(wide)),
        "unknown_latency_steps": int((~np.isfinite(p95)).sum()),
        "trace": {
            "replicas": replicas.astype(int).tolist(),
            "replicas_total": replicas.sum(axis=1).tolist(),
            "latency_p95_s": np.nan_to_num(p95, nan=-1.0).tolist(),
            "reward": reward.tolist(),
        },
    }


def evaluate_live(
    policies: Mapping[str, Callable[[], LivePolicy]],
    source: Mapping[str, Any],
    layout: Layout,
    duration_s: float,
    load: Mapping[str, Any],
    faults: Sequence[Mapping[str, Any]],
    slo_s: float,
    reward_weights: Sequence[float],
    out: str | Path | None = None,
    stop=None,
) -> dict[str, dict[str, Any]]:
    """Runs each policy (a factory, so every run starts from a fresh policy state) on its own
    freshly started testbed for `duration_s` under `load` and `faults`; returns the figures
    per policy name. The runs' rows go to the dataset `out` when given."""
    from collectors.closed_loop import run_live
    from collectors.faults import FaultSpec
    from collectors.sink import ParquetSink
    from collectors.testbed import Testbed, TestbedConfig

    schedule = [FaultSpec(**f) for f in faults]
    results: dict[str, dict[str, Any]] = {}
    for name, make_policy in policies.items():
        if stop is not None and stop.is_set():
            break
        log.info("live testbed: %s for %.0f s", name, duration_s)
        config = TestbedConfig(
            load=None,
            initial_replicas=dict(source.get("initial_replicas") or {}),
            min_replicas=layout.min_replicas,
            max_replicas=layout.max_replicas,
        )
        sink = ParquetSink(out) if out is not None else None
        try:
            with Testbed(config) as testbed:
                frame = run_live(
                    testbed,
                    make_policy(),
                    duration_s,
                    interval_s=layout.interval_s,
                    load_curve=dict(load),
                    fault_schedule=schedule,
                    sink=sink,
                )
        finally:
            if sink is not None:
                sink.close()
        results[name] = live_figures(frame, layout, slo_s, reward_weights)
        log.info(
            "live testbed: %s mean replicas %.2f, SLO violations %.1f%%",
            name,
            results[name]["mean_replicas"],
            100 * results[name]["slo_violation_rate"],
        )
    return results
