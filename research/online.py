"""Online updates of a trained dynamics model from newly collected samples, with replay.

`update` takes new rows (a polars frame of `service_metrics` as `MemoryStore.frame()` returns
it, a dataset folder with new partitions, run arrays or windows), turns them into windows with
the checkpoint's normaliser (kept fixed, so old and new data live in one space), and runs a few
AdamW steps on batches that mix new windows with replayed old ones, so the model follows a
shift in the workload without forgetting the old regime. It is cheap enough to call from the
collection loop every few minutes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import optax
import polars as pl

from collectors.errors import DataError
from research.checkpoint import ModelBundle, check_services
from research.data import RunArrays, WindowSet, frame_to_runs, load_runs, make_windows
from research.train import horizon_weights, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """steps: optimiser steps per call. batch_size: windows per step. lr: constant learning rate.
    replay_fraction: share of each batch drawn from old data. horizon: rollout horizon of the
    loss. rollout_weight: weight of the rollout loss. clip_norm: gradient clipping. seed."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-4
    replay_fraction: float = 0.5
    horizon: int = 5
    rollout_weight: float = 0.5
    clip_norm: float = 1.0
    weight_decay: float = 1e-4
    seed: int = 0


NewData = pl.DataFrame | str | Path | Sequence[RunArrays] | WindowSet


def as_windows(
    bundle: ModelBundle, data: NewData, horizon: int, events: pl.DataFrame | None = None
) -> WindowSet:
    """New data of any accepted kind -> windows in the bundle's normalised space."""
    if isinstance(data, WindowSet):
        return data
    length = bundle.cfg.window
    if isinstance(data, pl.DataFrame):
        runs = frame_to_runs(data, events, None, bundle.services, min_steps=length + 1)
    elif isinstance(data, str | Path):
        runs = load_runs(data, services=bundle.services, min_steps=length + 1)
    else:
        runs = list(data)
    for run in runs:
        check_services(bundle, run.services, f"run {run.run_id!r}")
    return make_windows(runs, bundle.normaliser, length, horizon)


def update(
    bundle: ModelBundle,
    new_data: NewData,
    replay: WindowSet | str | Path | None,
    cfg: OnlineConfig | None = None,
    events: pl.DataFrame | None = None,
) -> ModelBundle:
    """Returns a bundle whose parameters were updated on `new_data` mixed with `replay`.

    new_data: service_metrics rows (with `events` rows for faults, optional), a dataset folder,
    run arrays or windows. replay: old windows or a dataset folder (None: new data only).
    """
    cfg = cfg or OnlineConfig()
    new = as_windows(bundle, new_data, cfg.horizon, events)
    old = as_windows(bundle, replay, cfg.horizon) if replay is not None else None
    if len(new) == 0:
        raise DataError("online update: the new data holds no complete window")
    optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(cfg.lr, weight_decay=cfg.weight_decay),
    )
    net, norm = bundle.params["net"], bundle.normaliser
    opt_state = optimizer.init(net)
    step_fn = _cached_step(bundle.cfg, optimizer, cfg)
    h_w = horizon_weights(cfg.horizon, cfg.horizon)
    rng = np.random.default_rng(cfg.seed)
    n_old = round(cfg.replay_fraction * cfg.batch_size) if old is not None and len(old) else 0
    for _ in range(cfg.steps):
        batch = _mixed_batch(new, old, cfg.batch_size - n_old, n_old, rng, cfg.horizon)
        net, opt_state, loss, _ = step_fn(net, opt_state, norm, batch, h_w)
    log.info("online update: %d steps, last loss %.4f", cfg.steps, float(loss))
    return bundle.with_params({"net": net, "norm": norm})


_STEPS: dict = {}


def _cached_step(model_cfg, optimizer, cfg: OnlineConfig):
    key = (model_cfg, cfg)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(model_cfg, optimizer, cfg.rollout_weight)
    return _STEPS[key]


def _mixed_batch(new: WindowSet, old: WindowSet | None, n_new, n_old, rng, horizon):
    parts = [_rows(new, rng.integers(0, len(new), n_new), horizon)]
    if n_old:
        parts.append(_rows(old, rng.integers(0, len(old), n_old), horizon))
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def _rows(ws: WindowSet, idx: np.ndarray, horizon: int):
    rows = ws.starts[idx][:, None] + np.arange(ws.window + horizon)
    return type(ws.rows)(*(field[rows] for field in ws.rows))
