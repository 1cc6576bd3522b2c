"""Per-feature normalisation of service metrics, suited to heavy-tailed rates and latencies.

Every metric x >= 0 (service s, metric m) is mapped in two stages:

    y = log1p(x / unit[s, m])          # compresses heavy tails; y >= 0
    z = (y - mu[s, m]) / sd[s, m]      # standardised

`unit` is the median of the feature's non-null values (floored per metric so a feature that is
mostly zero still gets a sensible scale), `mu` and `sd` are the mean and standard deviation of y.
`decode` inverts this on the image of `encode` (y is taken as >= 0), so a decoded value is never
negative.

Features whose order is a physical bound share one set of statistics per service (`TIED`):
request rate and throughput, and the three latency quantiles. Encoding and decoding are then the
same monotone map for both sides of each bound, so `throughput <= request rate` and
`p50 <= p95 <= p99` survive the round trip through normalised space exactly (up to float
rounding of that one map), however small the values are.

`delta_unit` holds the scales of the latency spreads p95 - p50 and p99 - p95 that the model's
output layer predicts (see `research.model`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from collectors.schema import METRIC_COLUMNS

# Smallest scale per metric, in the metric's own unit: keeps log1p(x / unit) well conditioned
# for features that are zero most of the time (errors) or tiny (latencies of an idle service).
UNIT_FLOOR: dict[str, float] = {
    "request_rate_rps": 0.1,
    "throughput_rps": 0.1,
    "error_ratio": 1e-3,
    "latency_p50_s": 1e-4,
    "latency_p95_s": 1e-4,
    "latency_p99_s": 1e-4,
    "cpu_cores": 1e-3,
    "memory_bytes": 1e6,
    "net_rx_bytes_per_s": 100.0,
    "net_tx_bytes_per_s": 100.0,
}
SD_FLOOR = 0.1  # smallest standard deviation of y, so a constant feature does not blow up z
# Groups of metrics that share normalisation statistics per service (see the module docstring).
TIED: tuple[tuple[str, ...], ...] = (
    ("request_rate_rps", "throughput_rps"),
    ("latency_p50_s", "latency_p95_s", "latency_p99_s"),
)


@struct.dataclass
class Normaliser:
    """Normalisation statistics, a pytree of float32 arrays usable inside jit.

    Fields (S services, M = len(METRIC_COLUMNS) metrics):
        unit: (S, M) scale of each feature in its physical unit.
        mu: (S, M) mean of log1p(x / unit).
        sd: (S, M) standard deviation of log1p(x / unit), at least SD_FLOOR.
        delta_unit: (S, 2) scales of the spreads p95 - p50 and p99 - p95, in seconds.
        scale_factor: (S, M) factor on the model's predicted scales, fitted after training on
            validation windows (`research.calibration`); ones until then.
    """

    unit: jnp.ndarray
    mu: jnp.ndarray
    sd: jnp.ndarray
    delta_unit: jnp.ndarray
    scale_factor: jnp.ndarray

    def to_y(self, x_phys: jnp.ndarray) -> jnp.ndarray:
        """Log space: (..., S, M) physical -> (..., S, M) log1p(x / unit)."""
        return jnp.log1p(jnp.maximum(x_phys, 0.0) / self.unit)

    def from_y(self, y: jnp.ndarray) -> jnp.ndarray:
        """Inverse of `to_y` on y >= 0: (..., S, M) -> (..., S, M) physical, never negative."""
        return self.unit * jnp.expm1(jnp.maximum(y, 0.0))

    def encode(self, x_phys: jnp.ndarray) -> jnp.ndarray:
        """(..., S, M) physical units -> (..., S, M) normalised. Negative inputs count as 0."""
        return (self.to_y(x_phys) - self.mu) / self.sd

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """(..., S, M) normalised -> (..., S, M) physical units (>= 0)."""
        return self.from_y(z * self.sd + self.mu)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for JSON metadata in a checkpoint."""
        return {name: np.asarray(getattr(self, name)).tolist() for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normaliser:
        """Inverse of `to_dict`. Checkpoints written before calibration existed get ones."""
        data = {"scale_factor": np.ones_like(data["mu"]), **data}
        return cls(**{name: jnp.asarray(data[name], jnp.float32) for name in _FIELDS})

    @classmethod
    def identity(cls, n_services: int, n_metrics: int = len(METRIC_COLUMNS)) -> Normaliser:
        """Unit scales and zero means: a placeholder before statistics are fitted."""
        shape = (n_services, n_metrics)
        return cls(
            unit=jnp.ones(shape, jnp.float32),
            mu=jnp.zeros(shape, jnp.float32),
            sd=jnp.ones(shape, jnp.float32),
            delta_unit=jnp.full((n_services, 2), 1e-3, jnp.float32),
            scale_factor=jnp.ones(shape, jnp.float32),
        )


_FIELDS = ("unit", "mu", "sd", "delta_unit", "scale_factor")


def fit_normaliser(metrics: np.ndarray, mask: np.ndarray) -> Normaliser:
    """Fits statistics on physical metrics.

    Args:
        metrics: (T, S, M) physical values (anything where mask is 0).
        mask: (T, S, M) 1 where the value was measured.
    """
    n_services = metrics.shape[1]
    unit = np.empty((n_services, len(METRIC_COLUMNS)))
    mu = np.zeros_like(unit)
    sd = np.ones_like(unit)
    for s in range(n_services):
        for group in _groups():
            values = np.concatenate([metrics[:, s, m][mask[:, s, m] > 0] for m in group])
            values = np.maximum(values, 0.0)
            floor = max(UNIT_FLOOR[METRIC_COLUMNS[m]] for m in group)
            unit[s, group] = max(np.median(values) if values.size else 0.0, floor)
            y = np.log1p(values / unit[s, group[0]])
            if y.size:
                mu[s, group], sd[s, group] = y.mean(), max(y.std(), SD_FLOOR)
    delta_unit = _delta_units(metrics, mask)
    return Normaliser(
        unit=jnp.asarray(unit, jnp.float32),
        mu=jnp.asarray(mu, jnp.float32),
        sd=jnp.asarray(sd, jnp.float32),
        delta_unit=jnp.asarray(delta_unit, jnp.float32),
        scale_factor=jnp.ones(unit.shape, jnp.float32),
    )


def _groups() -> list[list[int]]:
    """Metric indices grouped by shared statistics: the `TIED` groups, every other alone."""
    tied = [[METRIC_COLUMNS.index(name) for name in group] for group in TIED]
    alone = [[m] for m in range(len(METRIC_COLUMNS)) if not any(m in g for g in tied)]
    return tied + alone


def _delta_units(metrics: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, 2) median spreads p95 - p50 and p99 - p95 (seconds), floored like latencies."""
    p50, p95, p99 = (METRIC_COLUMNS.index(f"latency_p{q}_s") for q in (50, 95, 99))
    floor = UNIT_FLOOR["latency_p50_s"]
    out = np.full((metrics.shape[1], 2), floor)
    for s in range(metrics.shape[1]):
        for j, (lo, hi) in enumerate(((p50, p95), (p95, p99))):
            both = (mask[:, s, lo] > 0) & (mask[:, s, hi] > 0)
            spread = np.maximum(metrics[both, s, hi] - metrics[both, s, lo], 0.0)
            if spread.size:
                out[s, j] = max(float(np.median(spread)), floor)
    return out
