"""Workload traces and fault schedules for the environments.

A workload trace is the entry request rate (rps) per step of one run; a set of traces is an
array (N, T) float32. Each episode replays one trace from a random offset, scaled by a random
factor. Faults follow a per-episode random process: at every step each (service, fault type)
pair that is not active starts with probability `rate_per_step * probs[f] / S`, with a severity
and a duration drawn uniformly from their ranges; an active fault counts down and ends.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
from flax import struct

from collectors.errors import ConfigError, DataError
from collectors.schema import FAULT_TYPES


@struct.dataclass
class FaultSpec:
    """How faults are sampled per episode (all fields vmappable arrays or floats)."""

    rate_per_step: jax.Array | float = 0.02  # expected fault starts per step, all services
    probs: jax.Array = struct.field(
        default_factory=lambda: jnp.full((len(FAULT_TYPES),), 1.0 / len(FAULT_TYPES))
    )  # (F,) distribution over FAULT_TYPES
    severity_low: jax.Array | float = 0.3
    severity_high: jax.Array | float = 1.0
    duration_low_steps: jax.Array | int = 5
    duration_high_steps: jax.Array | int = 30


def no_faults() -> FaultSpec:
    """A fault spec that never starts a fault."""
    return FaultSpec(rate_per_step=0.0)


FAULT_DRAWS = 3  # uniform draws per service and step that `step_faults` uses


def step_faults(
    uniforms: jax.Array, faults: jax.Array, steps_left: jax.Array, spec: FaultSpec
) -> tuple[jax.Array, jax.Array]:
    """Advance the fault process by one step.

    At most one fault starts per service and step: with probability `rate_per_step / S` a type
    is drawn from `probs` and starts unless it is already active on that service.
    uniforms (S, FAULT_DRAWS) in [0, 1): type-and-start, severity and duration draws.
    faults (S, F) float32 severities (0 = inactive), steps_left (S, F) int32.
    Returns the new (faults, steps_left).
    """
    n_services, n_faults = faults.shape
    steps_left = jnp.maximum(steps_left - 1, 0)
    faults = jnp.where(steps_left > 0, faults, 0.0)

    upper = jnp.cumsum(spec.rate_per_step * spec.probs / n_services)  # (F,)
    lower = upper - spec.rate_per_step * spec.probs / n_services
    u = uniforms[:, :1]
    start = (steps_left == 0) & (u >= lower) & (u < upper)  # (S, F)
    severity = spec.severity_low + (spec.severity_high - spec.severity_low) * uniforms[:, 1:2]
    span = spec.duration_high_steps - spec.duration_low_steps + 1
    duration = spec.duration_low_steps + jnp.floor(uniforms[:, 2:3] * span).astype(jnp.int32)
    faults = jnp.where(start, severity, faults).astype(jnp.float32)
    steps_left = jnp.where(start, duration, steps_left).astype(jnp.int32)
    return faults, steps_left


def synthetic_traces(
    seed: int,
    n_traces: int,
    length: int,
    base_rps: float = 60.0,
    amplitude: float = 0.6,
    period_steps: int = 450,
    noise: float = 0.08,
    spike_prob: float = 0.004,
) -> np.ndarray:
    """Diurnal-like entry rates (N, T) float32 in rps: a sinusoid of random phase and period
    around `base_rps`, multiplicative noise and occasional short spikes. Always > 0."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[None, :]
    phase = rng.uniform(0, 2 * np.pi, (n_traces, 1))
    period = period_steps * rng.uniform(0.6, 1.4, (n_traces, 1))
    level = base_rps * rng.uniform(0.7, 1.3, (n_traces, 1))
    wave = 1.0 + amplitude * np.sin(2 * np.pi * t / period + phase)
    jitter = np.exp(noise * rng.standard_normal((n_traces, length)))
    spikes = (rng.random((n_traces, length)) < spike_prob).astype(np.float64)
    spikes = np.convolve(spikes.ravel(), np.ones(8), mode="same").reshape(n_traces, length)
    rate = level * wave * jitter * (1.0 + 1.5 * np.minimum(spikes, 1.0))
    return np.maximum(rate, 1.0).astype(np.float32)


def check_traces(traces: np.ndarray | jax.Array, steps_needed: int, what: str = "workload") -> None:
    """Raise `ConfigError` unless `traces` is (N, T) with T > `steps_needed`, finite, >= 0."""
    shape = tuple(traces.shape)
    if len(shape) != 2 or shape[0] < 1:
        raise ConfigError(f"{what}: traces must be an (N, T) array with N >= 1, got {shape}")
    if shape[1] <= steps_needed:
        raise ConfigError(
            f"{what}: traces hold {shape[1]} steps but an episode needs {steps_needed + 1} "
            "(episode length plus warm-up); collect longer runs or shorten the episode"
        )
    values = np.asarray(traces)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ConfigError(f"{what}: traces must be finite and non-negative")


def sample_episode(
    uniforms: jax.Array, n_traces: int, trace_steps: int, horizon, scale_low, scale_high
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Trace index, offset in [0, T - horizon) and scale for one episode (int32, int32, f32)
    from three uniform draws `uniforms` (3,) in [0, 1)."""
    index = jnp.minimum(jnp.floor(uniforms[0] * n_traces), n_traces - 1).astype(jnp.int32)
    n_offsets = jnp.maximum(trace_steps - horizon, 1)
    offset = jnp.minimum(jnp.floor(uniforms[1] * n_offsets), n_offsets - 1).astype(jnp.int32)
    scale = scale_low + (scale_high - scale_low) * uniforms[2]
    return index, offset, scale.astype(jnp.float32)


def entry_rate(traces: jax.Array, index, offset, scale, t) -> jax.Array:
    """Entry request rate (rps) of step `t` of the episode, clamped inside the trace."""
    position = jnp.clip(offset + t, 0, traces.shape[1] - 1)
    return traces[index, position] * scale


def traces_from_dataset(
    dataset: str | Path, entry_service: str | None = None, runs: list[str] | None = None
) -> np.ndarray:
    """Entry request rates of each run of a dataset as traces (N, T) float32.

    Runs are cut to the shortest one; missing samples are filled from the previous one (then the
    next). Raises `DataError` when the dataset holds no usable run.
    """
    frame = _entry_rates(Path(dataset), entry_service, runs)
    series = [
        group.sort("step")["request_rate_rps"].fill_null(strategy="forward")
        for _, group in frame.group_by("run_id", maintain_order=True)
    ]
    series = [s.fill_null(strategy="backward").fill_null(0.0).to_numpy() for s in series]
    if not series:
        raise DataError(f"{dataset}: no service_metrics rows for the entry service")
    length = min(len(s) for s in series)
    return np.stack([s[:length] for s in series]).astype(np.float32)


def _entry_rates(dataset: Path, entry_service: str | None, runs: list[str] | None) -> pl.DataFrame:
    from collectors.dataset import read_table

    metrics = read_table(dataset, "service_metrics", runs=runs)
    if entry_service is None:
        entries = read_table(dataset, "runs", runs=runs).select("run_id", "entry_service")
        metrics = metrics.join(entries, on="run_id").filter(
            pl.col("service") == pl.col("entry_service")
        )
    else:
        metrics = metrics.filter(pl.col("service") == entry_service)
    return metrics.select("run_id", "step", "request_rate_rps").collect()


def fault_probs_from_dataset(dataset: str | Path, runs: list[str] | None = None) -> np.ndarray:
    """The distribution (F,) of fault types among the dataset's fault events; uniform when the
    dataset has none."""
    from collectors.dataset import read_table

    events = read_table(Path(dataset), "events", runs=runs).filter(pl.col("kind") == "fault")
    counts = events.group_by("type").len().collect()
    found = dict(zip(counts["type"].to_list(), counts["len"].to_list(), strict=True))
    probs = np.array([found.get(name, 0) for name in FAULT_TYPES], dtype=np.float32)
    if probs.sum() == 0:
        return np.full(len(FAULT_TYPES), 1.0 / len(FAULT_TYPES), dtype=np.float32)
    return probs / probs.sum()
