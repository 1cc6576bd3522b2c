"""Plausibility checks pass the true queueing equations and catch a deliberately wrong model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collectors.schema import FAULT_TYPES, METRIC_COLUMNS
from jaxsim.core import Layout
from jaxsim.queueing_env import Physics, service_metrics
from research import model as dyn
from research import plausibility

LAYOUT = Layout()
S, M, F, L = LAYOUT.n_services, len(METRIC_COLUMNS), len(FAULT_TYPES), 4
TP, RR = METRIC_COLUMNS.index("throughput_rps"), METRIC_COLUMNS.index("request_rate_rps")
P95 = METRIC_COLUMNS.index("latency_p95_s")


@pytest.fixture(scope="module")
def windows():
    """64 windows of random replicas (1..6) and entry rates (10..150 rps), no faults."""
    keys = jax.random.split(jax.random.key(0), 2)
    n = 64
    replicas = jax.random.randint(keys[0], (n, L, S), 1, 7).astype(jnp.float32)
    rate = jax.random.uniform(keys[1], (n, L), minval=10.0, maxval=150.0)
    return dyn.StepInput(
        metrics=jnp.zeros((n, L, S, M)),
        mask=jnp.ones((n, L, S, M)),
        replicas=jnp.stack([replicas, replicas], axis=-1),
        action=replicas,
        entry_rate=rate,
        faults=jnp.zeros((n, L, S, F)),
    )


def truth(window: dyn.StepInput) -> jax.Array:
    """The reference environment's noise-free equations, with the next desired replicas ready."""
    step = jax.tree.map(lambda a: a[:, -1], window)
    one = lambda rate, ready, faults: service_metrics(  # noqa: E731
        LAYOUT, Physics(), rate, ready.astype(jnp.int32), faults, jnp.zeros((S,))
    )
    return jax.vmap(one)(step.entry_rate, step.action, step.faults)


def wrong(window: dyn.StepInput) -> jax.Array:
    """Latency rising with replicas, falling with load, throughput above the offered load."""
    x = truth(window)
    step = jax.tree.map(lambda a: a[:, -1], window)
    latency = 0.05 * step.action / step.entry_rate[:, None] * 100.0
    x = x.at[..., P95].set(latency).at[..., METRIC_COLUMNS.index("latency_p99_s")].set(latency)
    x = x.at[..., METRIC_COLUMNS.index("latency_p50_s")].set(0.5 * latency)
    return x.at[..., TP].set(1.5 * x[..., RR])


def test_true_equations_are_plausible(windows):
    rates = plausibility.check(truth, windows, LAYOUT.edges)
    assert set(plausibility.CHECKS) <= set(rates)
    assert rates["n_windows"] == 64
    for name in plausibility.CHECKS:
        assert rates[name] == 0.0, name


def test_a_wrong_model_is_caught(windows):
    rates = plausibility.check(wrong, windows, LAYOUT.edges)
    assert rates["bounds"] == 0.0  # its values are in range, only their relations are wrong
    assert rates["throughput_above_load"] == 1.0
    assert rates["monotone_replicas"] == 1.0  # latency grows by 1/replicas at every service
    assert rates["monotone_load"] > 0.9
    assert rates["littles_law"] > 0.0


def test_bounds_and_littles_law_count_cases():
    x = np.ones((2, 3, M), np.float32)
    x[0, 1, METRIC_COLUMNS.index("error_ratio")] = 1.5
    x[1, 2, METRIC_COLUMNS.index("latency_p50_s")] = 3.0  # p50 above p95
    assert plausibility.bound_cases(x).tolist() == [[False, True, False], [False, False, True]]

    def predict(window):
        return jnp.ones((2, 3, M)).at[:, 1, RR].set(jnp.array([0.5, 5.0]))

    stub = dyn.StepInput(*(jnp.zeros((2, 1, 3, 1)) for _ in range(6)))
    rates = plausibility.check(predict, stub, [(0, 1), (0, 2)])
    # Edge 0->1: the callee has 5 requests in flight against the caller's 1 in window 1 only.
    assert rates["littles_law"] == 0.25


def test_counterfactual_windows_change_only_what_they_name(windows):
    more = plausibility.with_more_replicas(windows, service=2)
    assert float((more.replicas - windows.replicas).sum()) == 2 * 64
    assert float((more.action - windows.action)[:, -1, 2].min()) == 1.0
    loaded = plausibility.with_more_load(windows, 2.0)
    np.testing.assert_allclose(loaded.entry_rate[:, -1], 2.0 * windows.entry_rate[:, -1])
    np.testing.assert_array_equal(loaded.entry_rate[:, :-1], windows.entry_rate[:, :-1])
