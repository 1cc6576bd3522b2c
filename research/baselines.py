"""Baselines for the dynamics model: persistence and a linear autoregressive model.

Both work on the same windows as the model (`research.data.WindowSet` batches) and predict in
normalised space, so `research.accuracy` scores all three with one protocol.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from research.data import WindowSet
from research.model import DynamicsConfig, StepInput, tokens
from research.normalise import Normaliser


def persistence(batch: StepInput, window: int, horizon: int) -> np.ndarray:
    """(B, horizon, S, M) normalised: the last observed value of the window, repeated."""
    last = np.asarray(batch.metrics[:, window - 1])
    return np.repeat(last[:, None], horizon, axis=1)


@dataclasses.dataclass
class LinearAR:
    """Ridge regression of the next step's normalised change on the flattened window.

    Inputs: the model's tokens of the L window rows (metrics, masks, replicas, the next step's
    action, entry rate and faults), flattened, plus a constant. Target: z[t + 1] - z[t] per
    (S, M), with masked targets counted as no change. Multi-step predictions iterate, feeding
    back the predicted values with a full mask and the true future drivers.
    """

    weights: np.ndarray  # (L * token_dim + 1, S * M)
    norm: Normaliser
    cfg: DynamicsConfig

    @classmethod
    def fit(
        cls,
        windows: WindowSet,
        norm: Normaliser,
        cfg: DynamicsConfig,
        ridge: float = 1.0,
        max_windows: int = 20_000,
    ) -> LinearAR:
        """Fits on up to `max_windows` evenly spaced windows of `windows`."""
        n = min(len(windows), max_windows)
        idx = np.linspace(0, len(windows) - 1, n).astype(int)
        x_parts, y_parts = [], []
        for lo in range(0, n, 1024):
            batch = windows.batch(idx[lo : lo + 1024])
            x_parts.append(_features(norm, cfg, batch, cfg.window))
            y_parts.append(_delta_target(batch, cfg.window))
        x, y = np.concatenate(x_parts), np.concatenate(y_parts)
        gram = x.T @ x + ridge * np.eye(x.shape[1])
        weights = np.linalg.solve(gram, x.T @ y)
        return cls(weights=weights.astype(np.float32), norm=norm, cfg=cfg)

    def rollout(self, batch: StepInput, horizon: int) -> np.ndarray:
        """(B, horizon, S, M) normalised predictions of rows L .. L + horizon - 1."""
        length = self.cfg.window
        rows = jax.tree.map(np.asarray, batch)
        metrics, mask = rows.metrics.copy(), rows.mask.copy()
        out = []
        for h in range(horizon):
            view = rows._replace(metrics=metrics, mask=mask)
            view = jax.tree.map(lambda a, h=h: a[:, h : h + length], view)
            x = _features(self.norm, self.cfg, view, length)
            z = view.metrics[:, -1] + (x @ self.weights).reshape(view.metrics[:, -1].shape)
            out.append(z)
            metrics[:, length + h] = z
            mask[:, length + h] = 1.0
        return np.stack(out, axis=1)


def _features(norm: Normaliser, cfg: DynamicsConfig, batch: StepInput, length: int) -> np.ndarray:
    window = jax.tree.map(lambda a: jnp.asarray(a)[:, :length], batch)
    tok = np.asarray(tokens(norm, cfg, window))  # (B, L, token_dim)
    flat = tok.reshape(tok.shape[0], -1)
    return np.concatenate([flat, np.ones((flat.shape[0], 1), np.float32)], axis=1)


def _delta_target(batch: StepInput, length: int) -> np.ndarray:
    z = np.asarray(batch.metrics)
    ok = np.asarray(batch.mask[:, length]) * np.asarray(batch.mask[:, length - 1])
    delta = (z[:, length] - z[:, length - 1]) * ok
    return delta.reshape(delta.shape[0], -1)
