"""Accuracy of the dynamics model on held-out windows against persistence and a linear model.

Protocol, the same for the three predictors. From each held-out window of L observed steps,
predict the next H = max(horizons) steps open loop: the model feeds its own predicted means
back (each ensemble member its own; the point prediction is the members' average in
normalised space), with the true future actions, entry rates and faults; persistence repeats
the last observed value; the linear model iterates its one-step regression. Horizon h compares
the prediction of step L + h - 1 (h = 1 is the next step) with the truth.

nRMSE of a feature (service s, metric m) at horizon h = RMSE in physical units over the
windows where the truth is measured, divided by the standard deviation of that feature over
the held-out truth (horizon-1 targets of all evaluated windows). The reported figure averages
over features, leaving out features that are constant on the held-out set (std 0) and the
entry service's request rate, which the model is given as an exogenous input.

coverage90: fraction of measured horizon-1 targets (learned features) inside the central 90%
interval of the predicted Gaussian mixture, mixture mean +- 1.645 mixture std, in normalised
space (monotone in each feature, so the same as in physical units).

bound_violations: count, over the model's decoded means at all horizons (ensemble average and
every member), of negative values, error ratios above 1, throughput above the request rate and
p50 > p95 or p95 > p99, with a relative tolerance of 1e-5 for float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collectors.schema import METRIC_COLUMNS
from research import model as dyn
from research.baselines import LinearAR, persistence
from research.checkpoint import ModelBundle, check_services
from research.data import WindowSet, load_runs, make_windows, split_labels
from research.train import data_config

TOL = 1e-5


def feature_names(services: list[str]) -> list[str]:
    """'service/metric' names in (S, M) row-major order."""
    return [f"{s}/{m}" for s in services for m in METRIC_COLUMNS]


def held_out(bundle: ModelBundle, dataset: str | Path, horizon: int, split: int = 2):
    """(train windows, held-out windows) of a dataset, split as the checkpoint's data config."""
    cfg = data_config(bundle.meta.get("data_config"))
    runs = load_runs(dataset, services=bundle.services, missing_ok=cfg.missing_ok)
    for run in runs:
        check_services(bundle, run.services, f"run {run.run_id!r}")
    labels = split_labels(runs, cfg)
    norm, length = bundle.normaliser, bundle.cfg.window
    return (
        make_windows(runs, norm, length, horizon, labels, 0),
        make_windows(runs, norm, length, horizon, labels, split),
    )


def _model_rollout(bundle: ModelBundle, batch: dyn.StepInput, horizon: int):
    cfg, length = bundle.cfg, bundle.cfg.window
    window = jax.tree.map(lambda a: a[:, :length], batch)
    future = jax.tree.map(lambda a: a[:, length:], batch)
    return _rollout_jit(bundle.params, cfg, window, future, horizon)


@jax.jit
def _decode(norm, z):
    return norm.decode(z)


def _rollout_impl(params, cfg, window, future, horizon):
    return dyn.rollout(params, cfg, window, future, horizon)


_rollout_jit = jax.jit(_rollout_impl, static_argnums=(1, 4))


def bound_violations(x: np.ndarray) -> int:
    """Count of bound violations in decoded predictions x (..., S, M), physical units."""
    tol = lambda ref: TOL * np.abs(ref) + 1e-9  # noqa: E731
    rr, tp, er = x[..., dyn.RR], x[..., dyn.TP], x[..., dyn.ER]
    p50, p95, p99 = x[..., dyn.P50], x[..., dyn.P95], x[..., dyn.P99]
    count = int((x < 0).sum()) + int((~np.isfinite(x)).sum())
    count += int((er > 1 + TOL).sum()) + int((tp > rr + tol(rr)).sum())
    count += int((p50 > p95 + tol(p95)).sum()) + int((p95 > p99 + tol(p99)).sum())
    return count


def evaluate(
    bundle: ModelBundle,
    data: str | Path | WindowSet,
    horizons: tuple[int, ...] = (1, 5, 10),
    train_data: WindowSet | None = None,
    max_windows: int = 2000,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Scores the model and both baselines; returns the report dict (see module docstring).

    data: a dataset folder (its test split, by the checkpoint's data config; the linear model
    is fitted on its train split) or held-out windows with `train_data` for the linear model.
    Keys: nrmse.{model,persistence,linear}.h<h>, nrmse_per_feature, coverage90,
    bound_violations, n_windows, features.
    """
    horizon = max(horizons)
    if isinstance(data, WindowSet):
        test, train = data, train_data
    else:
        train, test = held_out(bundle, data, horizon)
    if len(test) == 0:
        raise ValueError("no held-out windows to evaluate")
    linear = LinearAR.fit(train, bundle.normaliser, bundle.cfg) if train is not None else None

    idx = np.linspace(0, len(test) - 1, min(len(test), max_windows)).astype(int)
    preds = {"model": [], "persistence": [], "linear": []}
    truth, tmask, members, cover = [], [], [], []
    length = bundle.cfg.window
    for lo in range(0, len(idx), batch_size):
        batch = test.batch(idx[lo : lo + batch_size])
        means, scales = _model_rollout(bundle, batch, horizon)  # (K, B, H, S, M)
        mix_mean, mix_sd = dyn.ensemble_moments(means, scales)
        preds["model"].append(np.asarray(mix_mean))
        members.append(np.asarray(means))
        preds["persistence"].append(persistence(batch, length, horizon))
        if linear is not None:
            preds["linear"].append(linear.rollout(batch, horizon))
        target = np.asarray(batch.metrics[:, length : length + horizon])
        tmask.append(np.asarray(batch.mask[:, length : length + horizon]))
        truth.append(target)
        inside = np.abs(target[:, 0] - np.asarray(mix_mean[:, 0])) <= dyn.Z90 * np.asarray(
            mix_sd[:, 0]
        )
        cover.append(inside)

    norm = bundle.normaliser
    truth_z, mask = np.concatenate(truth), np.concatenate(tmask)
    truth_x = np.asarray(_decode(norm, jnp.asarray(truth_z)))
    learned = np.asarray(dyn.loss_mask(bundle.cfg)) > 0
    std = _masked_std(truth_x[:, 0], mask[:, 0])  # (S, M)
    keep = learned & (std > 1e-12)

    result: dict[str, Any] = {"nrmse": {}, "nrmse_per_feature": {}}
    names = feature_names(bundle.services)
    for name, parts in preds.items():
        if not parts:
            continue
        pred_x = np.asarray(_decode(norm, jnp.asarray(np.concatenate(parts))))
        result["nrmse"][name], result["nrmse_per_feature"][name] = {}, {}
        for h in horizons:
            rmse = _masked_rmse(pred_x[:, h - 1], truth_x[:, h - 1], mask[:, h - 1])
            nrmse = np.where(keep, rmse / np.maximum(std, 1e-12), np.nan)
            result["nrmse"][name][f"h{h}"] = float(np.nanmean(nrmse))
            result["nrmse_per_feature"][name][f"h{h}"] = dict(
                zip(names, [None if np.isnan(v) else float(v) for v in nrmse.ravel()], strict=True)
            )
    cov_mask = mask[:, 0] * learned
    result["coverage90"] = float((np.concatenate(cover) * cov_mask).sum() / cov_mask.sum())
    all_means = np.concatenate(members, axis=1)
    decoded = np.asarray(_decode(norm, jnp.asarray(all_means)))
    result["bound_violations"] = bound_violations(decoded) + bound_violations(
        np.asarray(_decode(norm, jnp.asarray(np.concatenate(preds["model"]))))
    )
    result["n_windows"] = len(idx)
    result["features_scored"] = [n for n, k in zip(names, keep.ravel(), strict=True) if k]
    result["horizons"] = list(horizons)
    return result


def _masked_std(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = np.maximum(mask.sum(0), 1)
    mean = (x * mask).sum(0) / n
    return np.sqrt((((x - mean) ** 2) * mask).sum(0) / n)


def _masked_rmse(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.sqrt((((pred - truth) ** 2) * mask).sum(0) / np.maximum(mask.sum(0), 1))


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """Writes the evaluation dict as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def plot_trajectories(
    bundle: ModelBundle,
    test: WindowSet | str | Path,
    path: str | Path,
    horizon: int = 10,
    n_windows: int = 3,
    metrics: tuple[str, ...] = ("throughput_rps", "latency_p95_s", "cpu_cores"),
    train: WindowSet | None = None,
) -> Path:
    """Plots predicted (model, persistence, linear) against true trajectories; writes a PNG.

    test: held-out windows, or a dataset folder (its test split; the linear model is then fitted
    on its train split).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(test, WindowSet):
        train, test = held_out(bundle, test, horizon)
    length, norm = bundle.cfg.window, bundle.normaliser
    idx = np.linspace(0, len(test) - 1, n_windows).astype(int)
    batch = test.batch(idx)
    means, _ = _model_rollout(bundle, batch, horizon)
    model_x = np.asarray(_decode(norm, means.mean(0)))
    true_x = np.asarray(_decode(norm, batch.metrics[:, : length + horizon]))
    linear = LinearAR.fit(train, norm, bundle.cfg) if train is not None else None
    lin_x = (
        np.asarray(_decode(norm, jnp.asarray(linear.rollout(batch, horizon))))
        if linear is not None
        else None
    )
    fig, axes = plt.subplots(len(metrics), n_windows, figsize=(4 * n_windows, 2.6 * len(metrics)))
    axes = np.atleast_2d(axes)
    service = 0 if len(bundle.services) == 1 else 1
    t_ctx, t_fut = np.arange(length + horizon), np.arange(length, length + horizon)
    for r, metric in enumerate(metrics):
        m = METRIC_COLUMNS.index(metric)
        for c in range(n_windows):
            ax = axes[r, c]
            ax.plot(t_ctx, true_x[c, :, service, m], "k-", label="true")
            ax.plot(t_fut, model_x[c, :, service, m], "C0o-", ms=3, label="model")
            ax.plot(
                t_fut,
                np.full(horizon, true_x[c, length - 1, service, m]),
                "C1--",
                label="persistence",
            )
            if lin_x is not None:
                ax.plot(t_fut, lin_x[c, :, service, m], "C2:", label="linear")
            ax.set_title(f"{bundle.services[service]} {metric}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
