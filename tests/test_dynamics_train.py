"""Training of the dynamics model: compile once, overfit, online updates, the fit contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import model as dyn
from research import synthetic
from research.accuracy import evaluate
from research.calibration import fit_scale_factor
from research.checkpoint import ModelBundle, load_model
from research.data import load_runs, make_windows, stack_runs
from research.normalise import Normaliser, fit_normaliser
from research.online import OnlineConfig, update
from research.train import TrainConfig, compiled_steps, fit, fit_windows

CFG = dyn.DynamicsConfig(
    n_services=4, window=4, d_model=16, n_layers=1, n_heads=2, ensemble=2, rope_period=16
)
HORIZON = 3
TRAIN = TrainConfig(
    steps=300,
    batch_size=16,
    lr=5e-3,
    warmup_steps=20,
    horizon=HORIZON,
    curriculum_frac=0.3,
    eval_every=1000,
    log_every=100,
)


def windows_of(path, norm=None):
    runs = load_runs(path)
    norm = norm if norm is not None else fit_normaliser(*stack_runs(runs))
    return make_windows(runs, norm, CFG.window, HORIZON), norm


@pytest.fixture(scope="module")
def regimes(tmp_path_factory):
    """Windows of an old regime and of a shifted one (more load, less capacity per replica)."""
    root = tmp_path_factory.mktemp("regimes")
    synthetic.write_dataset(root / "old", n_runs=1, n_steps=160, seed=2)
    synthetic.write_dataset(
        root / "new", n_runs=2, n_steps=160, seed=3, load_rps=90.0, capacity_scale=0.6
    )
    old, norm = windows_of(root / "old")
    new, _ = windows_of(root / "new", norm)
    return old, new, norm


@pytest.fixture(scope="module")
def trained(regimes):
    """A tiny model trained on a tiny dataset: one batch of windows of the old regime."""
    old, _, norm = regimes
    tiny = old.subset(np.arange(0, len(old), len(old) // TRAIN.batch_size)[: TRAIN.batch_size])
    params, history = fit_windows(tiny, None, CFG, TRAIN, norm, progress=False)
    return tiny, params, history


def one_step_mse(params, windows) -> float:
    """Mean squared error of the mixture mean of the next step, learned and measured features."""
    batch = windows.batch(np.arange(len(windows)))
    window = jax.tree.map(lambda a: a[:, : CFG.window], batch)
    mean, _ = jax.jit(dyn.predict, static_argnums=1)(params, CFG, window)
    weight = batch.mask[:, CFG.window] * dyn.loss_mask(CFG)
    err = (mean.mean(0) - batch.metrics[:, CFG.window]) ** 2 * weight
    return float(err.sum() / weight.sum())


def persistence_mse(windows) -> float:
    batch = windows.batch(np.arange(len(windows)))
    weight = batch.mask[:, CFG.window] * batch.mask[:, CFG.window - 1] * dyn.loss_mask(CFG)
    err = (batch.metrics[:, CFG.window - 1] - batch.metrics[:, CFG.window]) ** 2 * weight
    return float(err.sum() / weight.sum())


def coverage90(params, windows) -> float:
    """Share of learned, measured one-step targets inside the mixture's central 90% interval."""
    batch = windows.batch(np.arange(len(windows)))
    window = jax.tree.map(lambda a: a[:, : CFG.window], batch)
    mean, scale = jax.jit(dyn.predict, static_argnums=1)(params, CFG, window)
    mix_mean, mix_sd = dyn.ensemble_moments(mean, scale)
    inside = jnp.abs(batch.metrics[:, CFG.window] - mix_mean) <= dyn.Z90 * mix_sd
    weight = batch.mask[:, CFG.window] * dyn.loss_mask(CFG)
    return float((inside * weight).sum() / weight.sum())


def test_train_step_compiles_once(trained):
    _, _, history = trained
    # the curriculum grew the rollout horizon from 1 to H while training: weights, not shapes
    assert history["steps"] == TRAIN.steps
    _, train_step, _ = compiled_steps(CFG, TRAIN)
    assert train_step._cache_size() == 1


def test_tiny_model_overfits_tiny_dataset(trained):
    tiny, params, history = trained
    first, last = history["train_loss"][0][1], history["train_loss"][-1][1]
    assert last < first
    assert one_step_mse(params, tiny) < 0.75 * persistence_mse(tiny)


def test_online_update_changes_params_and_lowers_new_regime_error(regimes, trained):
    _, new, _ = regimes
    tiny, params, _ = trained
    bundle = ModelBundle(CFG, params, list(synthetic.SERVICES), "frontend", [], 2.0, {})
    new_train = new.subset(np.flatnonzero(new.run_of == 0))
    new_test = new.subset(np.flatnonzero(new.run_of == 1))
    before_new = one_step_mse(params, new_test)

    cfg = OnlineConfig(steps=100, batch_size=16, lr=2e-3, horizon=HORIZON)
    updated = update(bundle, new_train, replay=tiny, cfg=cfg)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updated.params["net"], params["net"])
    assert all(jax.tree.leaves(changed))
    assert updated.normaliser is bundle.normaliser  # one normalised space for old and new data
    after_new = one_step_mse(updated.params, new_test)
    assert after_new < 0.8 * before_new


def test_fit_writes_a_checkpoint_that_evaluates(tmp_path):
    synthetic.write_dataset(tmp_path / "ds", n_runs=5, n_steps=120, seed=4)
    model = {k: getattr(CFG, k) for k in ("window", "d_model", "n_layers", "n_heads", "ensemble")}
    train = {"steps": 30, "batch_size": 8, "horizon": 10, "eval_every": 10, "val_windows": 16}
    cfg = {"model": {**model, "rope_period": 16}, "train": train, "data_prep": {}}
    path = fit(tmp_path / "ds", cfg, tmp_path / "out")
    bundle = load_model(path)
    assert bundle.services == list(synthetic.SERVICES) and bundle.entry_service == "frontend"
    assert bundle.meta["history"]["steps"] <= 30
    result = evaluate(bundle, tmp_path / "ds", max_windows=64)
    for name in ("model", "persistence", "linear"):
        assert set(result["nrmse"][name]) == {"h1", "h5", "h10"}
        assert all(np.isfinite(v) for v in result["nrmse"][name].values())
    assert 0.0 <= result["coverage90"] <= 1.0
    assert result["bound_violations"] == 0


def test_scale_calibration_reaches_the_target_coverage(regimes, trained):
    _, new, _ = regimes
    _, params, _ = trained
    # trained on one batch of the old regime, the tiny model is overconfident on the new one
    before = coverage90(params, new)
    factor = fit_scale_factor(params, CFG, new)
    calibrated = {**params, "norm": params["norm"].replace(scale_factor=factor)}
    after = coverage90(calibrated, new)
    assert before < 0.85
    assert 0.9 <= after <= 0.95
    assert float(factor.max()) > 1.0
    # fitting again on the calibrated model changes nothing
    again = fit_scale_factor(calibrated, CFG, new)
    np.testing.assert_allclose(np.asarray(again), np.asarray(factor), rtol=0.05)


def test_checkpoints_without_a_scale_factor_load_with_ones():
    norm = Normaliser.identity(4)
    old = {k: v for k, v in norm.to_dict().items() if k != "scale_factor"}
    assert bool(jnp.all(Normaliser.from_dict(old).scale_factor == 1.0))
