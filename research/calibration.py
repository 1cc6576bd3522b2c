"""Calibration of the predicted scales after training, on validation windows.

Trained by likelihood on a few thousand windows, the members' scales come out too narrow where
the data are noisier than what the model saw (the testbed's short rate windows): the 90%
interval of the mixture then covers far less than 90% of what happens. `fit_scale_factor` finds,
per feature, the smallest factor on the members' scales whose mixture interval covers the
target share of one-step validation targets; `bounded_output` multiplies the scales by it
(`Normaliser.scale_factor`), so the environment's sampled noise and every report use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research import model as dyn
from research.data import WindowSet

FACTORS = np.geomspace(0.25, 1024.0, 241)  # candidates, about 3.5% apart
MAX_WINDOWS = 2048


def fit_scale_factor(
    params, cfg: dyn.DynamicsConfig, windows: WindowSet, target: float = 0.9
) -> jnp.ndarray:
    """(S, M) factors for the members' scales so that the mixture's central `target` interval
    covers that share of the one-step targets of `windows`, feature by feature.

    params must carry the scale factor the factors multiply (ones right after training).
    Features the model does not predict (given inputs) or never measured in `windows` keep 1; a
    feature that no candidate covers gets the largest candidate.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target coverage {target} must lie in (0, 1)")
    half_width = float(jax.scipy.stats.norm.ppf(0.5 + target / 2))
    idx = np.linspace(0, len(windows) - 1, min(len(windows), MAX_WINDOWS)).astype(int)
    predict = jax.jit(dyn.predict, static_argnums=1)
    second, spread, error, mask = [], [], [], []
    for lo in range(0, len(idx), 512):
        batch = windows.batch(idx[lo : lo + 512])
        window = jax.tree.map(lambda a: a[:, : cfg.window], batch)
        mean, scale = predict(params, cfg, window)  # (K, B, S, M)
        second.append(np.asarray((scale**2).mean(0)))
        spread.append(np.asarray(mean.var(0)))
        error.append(np.abs(np.asarray(mean.mean(0) - batch.metrics[:, cfg.window])))
        mask.append(np.asarray(batch.mask[:, cfg.window] * dyn.loss_mask(cfg)))
    second, spread = np.concatenate(second), np.concatenate(spread)  # (N, S, M)
    error, mask = np.concatenate(error), np.concatenate(mask)

    sd = np.sqrt(np.float32(FACTORS)[:, None, None, None] ** 2 * second + spread)  # (C, N, S, M)
    inside = (error <= half_width * sd) * mask
    coverage = inside.sum(1) / np.maximum(mask.sum(0), 1)  # (C, S, M)
    enough = coverage >= target
    first = np.where(enough.any(0), enough.argmax(0), len(FACTORS) - 1)
    factor = np.where(mask.sum(0) > 0, FACTORS[first], 1.0)
    return jnp.asarray(factor * np.asarray(params["norm"].scale_factor), jnp.float32)
