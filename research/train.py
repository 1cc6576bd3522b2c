"""Training of the dynamics model with Optax: one-step likelihood plus rollout loss, curriculum.

Loss of a batch of windows (B, L + H rows):
    one-step: Gaussian negative log-likelihood in normalised space of every teacher-forced
        prediction (row t -> row t + 1), masked by the target mask; the entry request rate,
        which the model takes from its exogenous input, is left out.
    rollout: mean squared error of each member's open-loop rollout (fed its own means, with the
        true future actions and exogenous inputs) at steps 2 .. H of the horizon, weighted by a
        (H,) vector: 1 up to the curriculum's current horizon, 0 after it. The weights are an
        argument, so growing the horizon does not recompile the step.
Curriculum: windows are sorted by `research.data.difficulty`; at training progress p the batch is
drawn from the easiest fraction start + (1 - start) * min(1, p / ramp) of them, and the rollout
horizon grows from 1 to H over the same ramp. Early stopping on the validation loss.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from collectors.errors import ConfigError, DataError
from research import model as dyn
from research.calibration import fit_scale_factor
from research.data import DataConfig, WindowSet, load_runs, make_windows, split_labels
from research.logger import MetricsLogger
from research.normalise import Normaliser, fit_normaliser

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and curriculum settings (see conf/train/default.yaml for each field)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    horizon: int = 10
    rollout_weight: float = 0.5
    curriculum_frac: float = 0.5
    start_fraction: float = 0.3
    eval_every: int = 200
    val_windows: int = 512
    patience: int = 5
    time_budget_s: float = 270.0
    seed: int = 0
    log_every: int = 50


def _from_mapping(cls, data: Mapping[str, Any] | None):
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data or {})
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def train_config(data: Mapping[str, Any] | None) -> TrainConfig:
    """A `TrainConfig` from a mapping (e.g. the Hydra `train` group)."""
    return _from_mapping(TrainConfig, data)


def data_config(data: Mapping[str, Any] | None) -> DataConfig:
    """A `DataConfig` from a mapping (e.g. the Hydra `data_prep` group)."""
    return _from_mapping(DataConfig, data)


# ---------------------------------------------------------------------------------------------
# Loss and step


def gaussian_nll(mean, scale, target, mask) -> jnp.ndarray:
    """Masked mean of the Gaussian negative log-likelihood (constant dropped).

    mean, scale: (K, ...) ; target, mask: (...) broadcast over K.
    """
    nll = 0.5 * ((target - mean) / scale) ** 2 + jnp.log(scale)
    weight = jnp.broadcast_to(mask, nll.shape)
    return (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def loss_fn(
    net,
    norm: Normaliser,
    cfg: dyn.DynamicsConfig,
    rollout_weight: float,
    batch,
    h_w,
    rollout_batch: int = 8,
):
    """Loss of a batch (B, L + H rows) -> (loss, {"nll": .., "rollout": ..}).

    The rollout loss uses the first `rollout_batch` windows of the (shuffled) batch: rollouts
    cost several times the teacher-forced pass per window on a CPU.
    """
    params = {"net": net, "norm": norm}
    length, horizon = cfg.window, h_w.shape[0]
    feature_mask = dyn.loss_mask(cfg)
    seq = jax.tree.map(lambda a: a[:, : length + horizon - 1], batch)
    mean, scale = dyn.predict_sequence(params, cfg, seq)
    nll = gaussian_nll(mean, scale, batch.metrics[:, 1:], batch.mask[:, 1:] * feature_mask)
    if horizon == 1:
        return nll, {"nll": nll, "rollout": jnp.zeros(())}

    sub = jax.tree.map(lambda a: a[:rollout_batch], batch)  # rollouts on the first windows only
    window = jax.tree.map(lambda a: a[:, :length], sub)
    future = jax.tree.map(lambda a: a[:, length:], sub)
    means, _ = dyn.rollout(params, cfg, window, future, horizon)  # (K, B', H, S, M)
    target = sub.metrics[:, length + 1 :]
    weight = sub.mask[:, length + 1 :] * feature_mask * h_w[1:, None, None]
    err = (means[:, :, 1:] - target) ** 2 * weight
    roll = err.sum() / jnp.maximum(weight.sum() * cfg.ensemble, 1.0)
    return nll + rollout_weight * roll, {"nll": nll, "rollout": roll}


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * 0.05
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def make_train_step(cfg: dyn.DynamicsConfig, optimizer, rollout_weight: float):
    """A jitted `step(net, opt_state, norm, batch, h_w) -> (net, opt_state, loss, parts)`."""

    def step(net, opt_state, norm, batch, h_w):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, parts), grads = grad_fn(net, norm, cfg, rollout_weight, batch, h_w)
        updates, opt_state = optimizer.update(grads, opt_state, net)
        return optax.apply_updates(net, updates), opt_state, loss, parts

    return jax.jit(step)


def make_eval_loss(cfg: dyn.DynamicsConfig, rollout_weight: float):
    """A jitted `loss(net, norm, batch, h_w) -> (loss, parts)`."""
    return jax.jit(
        lambda net, norm, batch, h_w: loss_fn(net, norm, cfg, rollout_weight, batch, h_w)
    )


_COMPILED: dict = {}


def compiled_steps(model_cfg: dyn.DynamicsConfig, cfg: TrainConfig):
    """(optimizer, train step, eval loss) for a pair of configs, built once per process.

    Repeated `fit_windows` calls with the same configs (tests, several seeds) reuse the jitted
    functions instead of compiling them again.
    """
    key = (model_cfg, cfg)
    if key not in _COMPILED:
        optimizer = make_optimizer(cfg)
        _COMPILED[key] = (
            optimizer,
            make_train_step(model_cfg, optimizer, cfg.rollout_weight),
            make_eval_loss(model_cfg, cfg.rollout_weight),
        )
    return _COMPILED[key]


def horizon_weights(horizon: int, current: int) -> jnp.ndarray:
    """(H,) 1 for steps 1..current, 0 after."""
    return (jnp.arange(horizon) < current).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Curriculum sampling


class CurriculumSampler:
    """Batches from the easiest growing fraction of windows (sorted by difficulty score)."""

    def __init__(self, windows: WindowSet, cfg: TrainConfig, key_seed: int):
        self.order = np.argsort(windows.score, kind="stable")
        self.cfg = cfg
        self.rng = np.random.default_rng(key_seed)

    def progress_ramp(self, progress: float) -> float:
        return min(1.0, progress / max(self.cfg.curriculum_frac, 1e-9))

    def horizon(self, progress: float) -> int:
        return 1 + round((self.cfg.horizon - 1) * self.progress_ramp(progress))

    def sample(self, progress: float) -> np.ndarray:
        frac = self.cfg.start_fraction + (1 - self.cfg.start_fraction) * self.progress_ramp(
            progress
        )
        pool = max(self.cfg.batch_size, int(frac * len(self.order)))
        return self.order[self.rng.integers(0, min(pool, len(self.order)), self.cfg.batch_size)]


# ---------------------------------------------------------------------------------------------
# Training loops


def evaluate_loss(eval_loss, net, norm, windows: WindowSet, cfg: TrainConfig) -> float:
    """Mean validation loss over up to `val_windows` evenly spaced windows, full horizon."""
    n = min(len(windows), cfg.val_windows)
    idx = np.linspace(0, len(windows) - 1, n).astype(int)
    h_w = horizon_weights(cfg.horizon, cfg.horizon)
    total = 0.0
    for lo in range(0, n, cfg.batch_size):
        chunk = idx[lo : lo + cfg.batch_size]
        chunk = np.pad(chunk, (0, cfg.batch_size - len(chunk)), mode="edge")
        total += float(eval_loss(net, norm, windows.batch(chunk), h_w)[0]) * len(
            idx[lo : lo + cfg.batch_size]
        )
    return total / max(n, 1)


def fit_windows(
    train: WindowSet,
    val: WindowSet | None,
    model_cfg: dyn.DynamicsConfig,
    cfg: TrainConfig,
    norm: Normaliser,
    logger: MetricsLogger | None = None,
    progress: bool = True,
    params: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains on in-memory windows -> (params {"net", "norm"}, history).

    Stops at `cfg.steps`, at `cfg.time_budget_s`, or when the validation loss has not improved
    for `cfg.patience` evaluations; returns the parameters of the best validation loss.
    """
    if len(train) == 0:
        raise DataError("no training windows: runs too short for window + horizon, or split")
    if train.horizon < cfg.horizon:
        raise ConfigError(f"windows carry horizon {train.horizon} < train.horizon {cfg.horizon}")
    init_key = jax.random.key(cfg.seed)
    net = params["net"] if params is not None else dyn.init_params(model_cfg, init_key)["net"]
    optimizer, train_step, eval_loss = compiled_steps(model_cfg, cfg)
    opt_state = optimizer.init(net)
    sampler = CurriculumSampler(train, cfg, cfg.seed)

    best = (np.inf, net, 0)
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "steps": 0}
    started = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train", leave=False)
    for step in bar:
        frac = step / max(cfg.steps, 1)
        horizon = sampler.horizon(frac)
        batch = train.batch(sampler.sample(frac))
        h_w = horizon_weights(cfg.horizon, horizon)
        net, opt_state, loss, parts = train_step(net, opt_state, norm, batch, h_w)
        history["steps"] = step + 1

        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            loss_v = float(loss)
            if not np.isfinite(loss_v):
                raise DataError(f"training loss is {loss_v} at step {step}: check the data")
            history["train_loss"].append((step, loss_v))
            bar.set_postfix(loss=f"{loss_v:.3f}", h=horizon)
            if logger is not None:
                logger.log(
                    {
                        "loss/train": loss_v,
                        "loss/nll": float(parts["nll"]),
                        "loss/rollout": float(parts["rollout"]),
                        "train/horizon": horizon,
                    },
                    step=step,
                )
        last = step == cfg.steps - 1
        over_time = time.perf_counter() - started > cfg.time_budget_s
        if val is not None and len(val) and (step % cfg.eval_every == 0 or last or over_time):
            val_loss = evaluate_loss(eval_loss, net, norm, val, cfg)
            history["val_loss"].append((step, val_loss))
            if logger is not None:
                logger.log({"eval/val_loss": val_loss}, step=step)
            # only full-horizon losses are comparable: count from the end of the ramp
            if val_loss < best[0] or frac < cfg.curriculum_frac:
                best = (val_loss, net, 0)
            else:
                best = (best[0], best[1], best[2] + 1)
            if best[2] >= cfg.patience:
                log.info("early stop at step %d (val loss %.4f)", step, best[0])
                break
        if over_time:
            log.info("time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
            break
    bar.close()
    history["train_s"] = time.perf_counter() - started
    history["best_val_loss"] = float(best[0])
    final = best[1] if val is not None and len(val) else net
    return {"net": final, "norm": norm}, history


def prepare(dataset: str | Path, model_section: Mapping, train_cfg: TrainConfig, data_cfg):
    """Dataset -> (runs, split labels, normaliser fitted on train rows, model config)."""
    window = int(model_section.get("window", 16))
    runs = load_runs(dataset, missing_ok=data_cfg.missing_ok, min_steps=window + 1)
    services = runs[0].services
    for run in runs[1:]:
        if run.services != services:
            raise DataError(
                f"run {run.run_id!r}, column 'service': services {run.services} differ from "
                f"{services} of run {runs[0].run_id!r}"
            )
    labels = split_labels(runs, data_cfg)
    rows = [(r.metrics[lab == 0], r.mask[lab == 0]) for r, lab in zip(runs, labels, strict=True)]
    norm = fit_normaliser(
        np.concatenate([m for m, _ in rows]), np.concatenate([k for _, k in rows])
    )
    model_cfg = dyn.DynamicsConfig(
        n_services=len(services), entry_index=runs[0].entry_index, **dict(model_section)
    )
    return runs, labels, norm, model_cfg


def fit(
    dataset_path: str | Path,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    logger: MetricsLogger | None = None,
) -> Path:
    """Trains on a dataset and writes a checkpoint; returns the checkpoint folder.

    cfg: mapping with sections `model` (DynamicsConfig fields but n_services/entry_index),
    `train` (TrainConfig fields) and `data_prep` (DataConfig fields).
    """
    from research.checkpoint import save_checkpoint

    train_cfg = train_config(cfg.get("train"))
    data_cfg = data_config(cfg.get("data_prep"))
    runs, labels, norm, model_cfg = prepare(dataset_path, cfg.get("model", {}), train_cfg, data_cfg)
    L, H = model_cfg.window, train_cfg.horizon
    train = make_windows(runs, norm, L, H, labels, 0)
    val = make_windows(runs, norm, L, H, labels, 1)
    log.info("windows: train %d, val %d, runs %d", len(train), len(val), len(runs))
    params, history = fit_windows(train, val, model_cfg, train_cfg, norm, logger)
    if len(val):
        factor = fit_scale_factor(params, model_cfg, val)
        params = {**params, "norm": params["norm"].replace(scale_factor=factor)}
        log.info("scale calibration on validation: median factor %.2f", float(jnp.median(factor)))

    first = runs[0]
    meta = {
        "model_config": model_cfg.to_dict(),
        "train_config": dataclasses.asdict(train_cfg),
        "data_config": dataclasses.asdict(data_cfg),
        "services": first.services,
        "entry_service": first.services[first.entry_index],
        "call_graph": _call_graph(dataset_path, first.run_id),
        "interval_s": first.interval_s,
        "dataset": str(dataset_path),
        "history": {k: v for k, v in history.items() if k in ("steps", "train_s", "best_val_loss")},
        "train_windows": len(train),
    }
    return save_checkpoint(Path(out_dir) / "checkpoint", params, meta)


def _call_graph(dataset: str | Path, run_id: str) -> list[list[str]]:
    from collectors.dataset import list_runs

    runs = list_runs(dataset)
    row = runs.filter(runs["run_id"] == run_id)
    if row.is_empty() or row["call_graph"][0] is None:
        return []
    return [[edge["source"], edge["target"]] for edge in row["call_graph"][0]]
