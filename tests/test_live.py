"""Live policies see what the simulated environments show, and live runs reduce to the same
figures."""

from __future__ import annotations

import jax
import numpy as np
import polars as pl
import pytest

from collectors.errors import DataError
from collectors.schema import METRIC_COLUMNS
from jaxsim.core import Layout
from jaxsim.queueing_env import QueueingEnv
from research.agents import ppo
from research.live import LiveActor, history_arrays, live_figures

LAYOUT = Layout()


def frame_from_states(states: list, services) -> pl.DataFrame:
    """The service_metrics rows a collector would write for a list of env states."""
    rows = []
    for step, state in enumerate(states):
        for s, service in enumerate(services):
            row = {"step": step, "service": service}
            row.update({c: float(state.metrics[s, m]) for m, c in enumerate(METRIC_COLUMNS)})
            row["replicas_desired"] = int(state.replicas[s])
            row["replicas_ready"] = int(state.ready[s])
            rows.append(row)
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def reference_run():
    env = QueueingEnv(LAYOUT, window_steps=4)
    params = env.default_params
    obs, state = env.reset(jax.random.key(0), params)
    states, observations = [state], [obs]
    rng = np.random.default_rng(0)
    for i in range(8):
        action = jax.numpy.asarray(rng.integers(0, 3, 4), jax.numpy.int32)
        obs, state, *_ = env.step_env(jax.random.key(i + 1), state, action, params)
        states.append(state)
        observations.append(obs)
    return env, params, states, observations


def test_live_observation_equals_the_environment_observation(reference_run):
    env, params, states, observations = reference_run
    cfg = ppo.PPOConfig(hidden_sizes=(8,))
    network = ppo.make_network(env, cfg)
    agent = network.init(jax.random.key(0), observations[0][None])
    actor = LiveActor(network, agent, LAYOUT, params.normaliser, window_steps=4)
    history = frame_from_states(states, LAYOUT.services)
    np.testing.assert_allclose(
        np.asarray(actor.observation(history)), np.asarray(observations[-1]), rtol=1e-5, atol=1e-5
    )
    targets = actor(history)
    current = dict(zip(LAYOUT.services, np.asarray(states[-1].replicas), strict=True))
    for service, target in targets.items():
        assert LAYOUT.min_replicas <= target <= LAYOUT.max_replicas
        assert abs(target - current[service]) <= LAYOUT.max_delta


def test_history_arrays_pads_short_history_and_names_missing_services(reference_run):
    _, _, states, _ = reference_run
    history = frame_from_states(states[:2], LAYOUT.services)
    metrics, desired, _ = history_arrays(history, LAYOUT.services, 4)
    assert metrics.shape == (4, 4, len(METRIC_COLUMNS))
    np.testing.assert_array_equal(metrics[0], metrics[2])
    np.testing.assert_array_equal(desired, np.asarray(states[1].replicas))
    with pytest.raises(DataError, match="payment"):
        history_arrays(history.filter(pl.col("service") != "payment"), LAYOUT.services, 4)


def test_live_figures_by_hand():
    services = LAYOUT.services
    rows = []
    # step 0: 4 replicas, p95 0.1 s; step 1: 6 replicas (+2), p95 0.5 s, 10% errors;
    # step 2: no request completed, p95 unknown
    steps = [(1, 0.1, 0.0), ((1, 2, 1, 2), 0.5, 0.1), (1, None, 0.0)]
    for step, (reps, p95, err) in enumerate(steps):
        per = reps if isinstance(reps, tuple) else (reps,) * 4
        for s, service in enumerate(services):
            rows.append(
                {"step": step, "service": service, "replicas_desired": per[s],
                 "latency_p95_s": p95 if s == 0 else 0.01, "error_ratio": err if s == 0 else 0.0}
            )  # fmt: skip
    figures = live_figures(pl.DataFrame(rows), LAYOUT, slo_s=0.3, reward_weights=[1, 1, 0.3, 0.05])
    assert figures["steps"] == 3
    assert figures["slo_violation_rate"] == pytest.approx(2 / 3)
    assert figures["unknown_latency_steps"] == 1
    assert figures["mean_replicas"] == pytest.approx((4 + 6 + 4) / 3)
    assert figures["scaling_actions"] == 4
    cost = 0.3 * np.array([4, 6, 4]) / 24
    churn = 0.05 * np.array([0, 2, 2]) / 4
    expected = -(np.array([0, 1, 1]) + np.array([0, 0.1, 0]) + cost + churn).sum()
    assert figures["return"] == pytest.approx(expected)
