"""The dynamics model: cached stepping, bounds, checkpoints, normaliser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import model as dyn
from research.accuracy import bound_violations
from research.checkpoint import load_model, save_checkpoint
from research.normalise import Normaliser, fit_normaliser

CFG = dyn.DynamicsConfig(
    n_services=3, window=4, d_model=16, n_layers=2, n_heads=2, ensemble=2, rope_period=16
)


def random_steps(rng, batch, length, cfg=CFG, scale=1.0):
    s, m, f = cfg.n_services, cfg.n_metrics, cfg.n_faults
    return dyn.StepInput(
        metrics=jnp.asarray(rng.normal(size=(batch, length, s, m)) * scale, jnp.float32),
        mask=jnp.asarray(rng.random((batch, length, s, m)) > 0.2, jnp.float32),
        replicas=jnp.asarray(rng.integers(0, 7, (batch, length, s, 2)), jnp.float32),
        action=jnp.asarray(rng.integers(1, 7, (batch, length, s)), jnp.float32),
        entry_rate=jnp.asarray(rng.random((batch, length)) * 100 * scale, jnp.float32),
        faults=jnp.asarray(rng.random((batch, length, s, f)), jnp.float32),
    )


def fitted_normaliser(rng, cfg=CFG):
    x = np.abs(rng.lognormal(0, 1.5, size=(500, cfg.n_services, cfg.n_metrics)))
    x[..., dyn.ER] = np.clip(x[..., dyn.ER] / 100, 0, 1)
    return fit_normaliser(x, np.ones_like(x))


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return dyn.init_params(CFG, jax.random.key(0), fitted_normaliser(rng))


def test_step_cached_equals_predict_on_slid_window(params):
    rng = np.random.default_rng(1)
    n_slides = 40  # beyond rope_period: absolute positions wrap and cached keys stay valid
    seq = random_steps(rng, 2, CFG.window + n_slides)
    first = jax.tree.map(lambda a: a[:, : CFG.window], seq)
    cache = dyn.init_cache(params, CFG, first)
    step = jax.jit(lambda c, x: dyn.step_cached(params, CFG, c, x))
    predict = jax.jit(lambda w: dyn.predict(params, CFG, w))
    for j in range(n_slides):
        mean, scale, cache = step(cache, jax.tree.map(lambda a, j=j: a[:, CFG.window + j], seq))
        window = jax.tree.map(lambda a, j=j: a[:, j + 1 : j + 1 + CFG.window], seq)
        ref_mean, ref_scale = predict(window)
        assert mean.shape == (CFG.ensemble, 2, CFG.n_services, CFG.n_metrics)
        np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(scale, ref_scale, atol=1e-4, rtol=1e-4)


def test_sequence_and_rollout_agree_with_predict(params):
    rng = np.random.default_rng(2)
    seq = random_steps(rng, 3, CFG.window + 3)
    window = jax.tree.map(lambda a: a[:, : CFG.window], seq)
    mean, _ = jax.jit(lambda w: dyn.predict(params, CFG, w))(window)
    seq_mean, _ = jax.jit(lambda x: dyn.predict_sequence(params, CFG, x))(seq)
    np.testing.assert_allclose(seq_mean[:, :, CFG.window - 1], mean, atol=1e-4)
    future = jax.tree.map(lambda a: a[:, CFG.window :], seq)
    roll_mean, _ = jax.jit(lambda w, f: dyn.rollout(params, CFG, w, f, 3))(window, future)
    np.testing.assert_allclose(roll_mean[:, :, 0], mean, atol=1e-4)
    assert roll_mean.shape == (CFG.ensemble, 3, 3, CFG.n_services, CFG.n_metrics)


@pytest.fixture(scope="module")
def saturated():
    """Inflated weights so the raw outputs saturate, and a jitted rollout of 4 steps."""
    norm = fitted_normaliser(np.random.default_rng(3))
    params = dyn.init_params(CFG, jax.random.key(1), norm)
    params["net"] = jax.tree.map(lambda w: w * 30.0, params["net"])
    roll = jax.jit(lambda w, f: dyn.rollout(params, CFG, w, f, 4))
    return params, roll


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e8])
def test_bounds_hold_for_any_input(saturated, scale):
    params, roll = saturated
    rng = np.random.default_rng(int(np.log10(scale)))
    seq = random_steps(rng, 64, CFG.window + 3, scale=scale)
    # extremes: zero entry rate, metrics at the clip and beyond, nothing measured
    seq = seq._replace(entry_rate=seq.entry_rate.at[:8].set(0.0))
    seq = seq._replace(metrics=seq.metrics.at[8:16].set(1e4 * scale).at[16:24].set(-1e4 * scale))
    seq = seq._replace(mask=seq.mask.at[24:32].set(0.0))
    window = jax.tree.map(lambda a: a[:, : CFG.window], seq)
    future = jax.tree.map(lambda a: a[:, CFG.window :], seq)
    mean, scale_out = roll(window, future)  # (K, B, 4, S, M): fed its own predictions
    decoded = np.asarray(params["norm"].decode(mean))
    mixture = np.asarray(params["norm"].decode(mean.mean(0)))
    assert np.isfinite(decoded).all() and np.isfinite(np.asarray(scale_out)).all()
    assert (np.asarray(scale_out) > 0).all()
    assert bound_violations(decoded) == 0
    assert bound_violations(mixture) == 0
    # the entry request rate is the exogenous rate of the predicted step
    expected = np.asarray(jnp.maximum(seq.entry_rate[:, CFG.window - 1 : CFG.window + 3], 0.0))
    np.testing.assert_allclose(
        decoded[..., CFG.entry_index, dyn.RR],
        np.broadcast_to(expected, decoded.shape[:3]),
        rtol=1e-3,
        atol=1e-3,
    )


def test_bound_violation_counter_sees_violations():
    x = np.zeros((1, 1, 10))
    x[..., dyn.RR], x[..., dyn.TP] = 1.0, 2.0  # throughput above request rate
    x[..., dyn.P50], x[..., dyn.P95], x[..., dyn.P99] = 0.3, 0.2, 0.4  # p50 > p95
    assert bound_violations(x) == 2


def test_checkpoint_round_trips_to_identical_predictions(params, tmp_path):
    rng = np.random.default_rng(4)
    window = random_steps(rng, 2, CFG.window)
    meta = {
        "model_config": CFG.to_dict(),
        "services": ["a", "b", "c"],
        "entry_service": "a",
        "call_graph": [["a", "b"], ["a", "c"]],
        "interval_s": 2.0,
    }
    path = save_checkpoint(tmp_path / "ckpt", params, meta)
    bundle = load_model(path)
    assert bundle.cfg == CFG and bundle.services == ["a", "b", "c"]
    mean, scale = bundle.predict(window)
    ref_mean, ref_scale = dyn.predict(params, CFG, window)
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(ref_mean))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(ref_scale))


def test_normaliser_round_trip_and_heavy_tails():
    rng = np.random.default_rng(5)
    norm = fitted_normaliser(rng)
    x = jnp.asarray(np.abs(rng.lognormal(0, 3, (100, 3, 10))), jnp.float32)
    back = np.asarray(norm.decode(norm.encode(x)))
    # relative precision, except far below the feature's unit where float32 keeps an absolute one
    assert (
        np.abs(back - np.asarray(x)) <= 1e-3 * np.asarray(x) + 1e-5 * np.asarray(norm.unit)
    ).all()
    assert float(jnp.abs(norm.encode(x)).max()) < 50  # log space tames the tails
    again = Normaliser.from_dict(norm.to_dict())
    np.testing.assert_array_equal(np.asarray(again.unit), np.asarray(norm.unit))


def test_default_model_cost_per_cached_step():
    cfg = dyn.DynamicsConfig(n_services=4)
    flops = dyn.flops_per_cached_step(cfg)
    assert 0.8e6 < flops < 1.1e6
