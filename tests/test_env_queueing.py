"""The reference queueing environment: interface, compile-once, rollouts, physics, dataset."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper

from collectors.dataset import read_table
from collectors.errors import ConfigError
from collectors.schema import METRIC_COLUMNS
from jaxsim import core, workload
from jaxsim.queueing_env import Physics, QueueingEnv, service_metrics
from jaxsim.reference_data import write_reference_dataset
from jaxsim.rollout import python_loop_rollout, random_policy, rollout

M = {name: i for i, name in enumerate(METRIC_COLUMNS)}


class CountingEnv(QueueingEnv):
    """Counts how often `reset_env` and `step_env` are traced."""

    traces = {"reset": 0, "step": 0}

    def reset_env(self, key, params):
        self.traces["reset"] += 1
        return super().reset_env(key, params)

    def step_env(self, key, state, action, params):
        self.traces["step"] += 1
        return super().step_env(key, state, action, params)


def test_reset_and_step_compile_once():
    env = CountingEnv()
    params = env.default_params
    other = params.replace(slo_s=0.5, physics=params.physics.replace(startup_steps=1))
    obs, state = env.reset(jax.random.key(0), params)
    action = env.action_space(params).sample(jax.random.key(1))
    for i, p in enumerate([params, other, params]):
        env.reset(jax.random.key(i), p)
        obs, state, *_ = env.step(jax.random.key(i), state, action, p)
    assert env.traces == {"reset": 2, "step": 1}  # reset once alone, once inside step
    assert obs.shape == env.observation_space(params).shape


def test_step_contract():
    env = QueueingEnv()
    params = env.default_params
    obs, state = env.reset(jax.random.key(0), params)
    S, F = len(env.services), state.faults.shape[1]
    assert state.metrics.shape == (S, len(METRIC_COLUMNS)) and state.metrics.dtype == jnp.float32
    assert state.replicas.dtype == jnp.int32 and state.ready.shape == (S,)
    assert state.faults.shape == (S, F)
    action = jnp.full((S,), 2, jnp.int32)  # +1 everywhere
    obs, new, reward, terminated, truncated, info = env.step(
        jax.random.key(1), state, action, params
    )
    assert np.array_equal(new.replicas, state.replicas + 1)
    for key in ("slo_violation", "error_ratio", "replicas_total", "latency_p95_s"):
        assert info[key].shape == ()
    assert int(info["scaling_actions"]) == S
    assert reward.shape == () and not bool(terminated) and not bool(truncated)


def test_gymnax_wrappers_work():
    env = LogWrapper(FlattenObservationWrapper(QueueingEnv()))
    params = QueueingEnv().default_params.replace(max_steps_in_episode=3)
    obs, state = env.reset(jax.random.key(0), params)
    action = jnp.ones((4,), jnp.int32)
    for i in range(4):
        obs, state, reward, terminated, truncated, info = env.step(
            jax.random.key(i), state, action, params
        )
    assert obs.ndim == 1
    assert bool(info["returned_episode_valid"])


def test_scanned_rollout_equals_python_loop():
    env = QueueingEnv()
    params = env.default_params.replace(max_steps_in_episode=7)  # crosses auto-resets
    policy = random_policy(env)
    key = jax.random.key(3)
    _, state_a, scanned = rollout(env, params, key, policy, 8, 20)
    _, state_b, looped = python_loop_rollout(env, params, key, policy, 8, 20)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state_a.metrics, state_b.metrics, rtol=1e-5)
    assert scanned["done"].any()


def bounds_summary(obs, state, reward, done, info):
    """Per step: any NaN, and the extremes of what must stay in bounds."""
    m = state.metrics
    finite = jnp.isfinite(obs).all() & jnp.isfinite(m).all() & jnp.isfinite(reward).all()
    return {
        "finite": finite,
        "min_metric": m.min(),
        "max_error": m[..., M["error_ratio"]].max(),
        "throughput_ok": (
            m[..., M["throughput_rps"]] <= m[..., M["request_rate_rps"]] + 1e-3
        ).all(),
        "quantiles_ok": (
            (m[..., M["latency_p50_s"]] <= m[..., M["latency_p95_s"]])
            & (m[..., M["latency_p95_s"]] <= m[..., M["latency_p99_s"]])
        ).all(),
        "replicas_min": state.replicas.min(),
        "replicas_max": state.replicas.max(),
        "ready_min": state.ready.min(),
        "ready_max": state.ready.max(),
    }


def test_long_random_rollout_stays_finite_and_bounded():
    """1,024 environments for 2,000 random steps with frequent faults (the learned
    environment's test in tests/test_cluster_env.py runs the same check)."""
    env = QueueingEnv()
    params = env.default_params.replace(faults=workload.FaultSpec(rate_per_step=0.2))
    _, _, out = rollout(
        env, params, jax.random.key(0), random_policy(env), 1024, 2_000, bounds_summary
    )
    out = jax.device_get(out)
    assert out["finite"].all()
    assert out["min_metric"].min() >= 0.0 and out["max_error"].max() <= 1.0
    assert out["throughput_ok"].all() and out["quantiles_ok"].all()
    assert out["replicas_min"].min() >= env.min_replicas
    assert out["replicas_max"].max() <= env.max_replicas
    assert out["ready_min"].min() >= 0 and out["ready_max"].max() <= env.max_replicas


def _grid_metrics(rates, ready, faults):
    env = QueueingEnv()
    fn = jax.vmap(lambda r, n, f: service_metrics(env.layout, Physics(), r, n, f, jnp.zeros(4)))
    return fn(rates, ready, faults)


def test_physics_more_replicas_never_raise_latency_more_load_never_lowers_it():
    key_rate, key_ready, key_fault, key_service = jax.random.split(jax.random.key(0), 4)
    n = 4096
    rates = jax.random.uniform(key_rate, (n,), minval=1.0, maxval=300.0)
    ready = jax.random.randint(key_ready, (n, 4), 1, 6)
    faults = jax.random.uniform(key_fault, (n, 4, 6)) * (
        jax.random.uniform(key_fault, (n, 4, 6)) < 0.2
    )
    more = ready + jax.nn.one_hot(jax.random.randint(key_service, (n,), 0, 4), 4, dtype=jnp.int32)
    base = _grid_metrics(rates, ready, faults)
    scaled = _grid_metrics(rates, more, faults)
    loaded = _grid_metrics(rates * 1.3, ready, faults)
    for q in ("latency_p50_s", "latency_p95_s", "latency_p99_s", "error_ratio"):
        assert (scaled[..., M[q]] <= base[..., M[q]] + 1e-6).all(), q
        assert (loaded[..., M[q]] >= base[..., M[q]] - 1e-6).all(), q
    # saturation: latency and errors rise steeply past capacity
    assert (loaded[..., M["latency_p95_s"]] > base[..., M["latency_p95_s"]]).any()


def test_new_replicas_become_ready_after_startup_delay():
    env = QueueingEnv()
    physics = Physics(startup_steps=3)
    params = env.default_params.replace(physics=physics, faults=workload.no_faults())
    _, state = env.reset(jax.random.key(0), params)
    up = jnp.array([2, 1, 1, 1], jnp.int32)
    stay = jnp.ones(4, jnp.int32)
    ready = []
    step = jax.jit(env.step_env)
    for i, action in enumerate([up, stay, stay, stay]):
        _, state, *_ = step(jax.random.key(i), state, action, params)
        ready.append(int(state.ready[0]))
    assert int(state.replicas[0]) == 3
    assert ready == [2, 2, 2, 3]  # requested in the first step, ready 3 steps later


def test_pipeline_removes_pending_before_ready():
    ready = jnp.array([2])
    pending = jnp.array([[0, 1, 1, 0]])
    new_ready, new_pending = core.reconcile(ready, pending, jnp.array([2]), jnp.array(3))
    # one pending moved up a slot; desired 2 < 2 ready + 2 pending: both pending go
    assert int(new_ready[0]) == 2 and int(new_pending.sum()) == 0
    new_ready, new_pending = core.reconcile(ready, pending, jnp.array([1]), jnp.array(3))
    assert int(new_ready[0]) == 1 and int(new_pending.sum()) == 0


def test_short_traces_are_rejected():
    env = QueueingEnv()
    with pytest.raises(ConfigError, match="traces hold 50 steps"):
        env.make_params(traces=jnp.ones((2, 50)), max_steps_in_episode=100)


def test_reference_dataset_is_an_ordinary_dataset(tmp_path):
    run_ids = write_reference_dataset(
        tmp_path / "ds", n_runs=2, steps_per_run=60, seed=1, fault_rate_per_step=0.2
    )
    assert len(run_ids) == 2 and len(set(run_ids)) == 2
    metrics = read_table(tmp_path / "ds", "service_metrics").collect()
    assert metrics.height == 2 * 60 * 4
    assert set(metrics["run_id"].unique()) == set(run_ids)
    assert metrics.select(list(METRIC_COLUMNS)).null_count().to_numpy().sum() == 0
    runs = read_table(tmp_path / "ds", "runs").collect()
    assert runs["source"].to_list() == ["reference"] * 2
    assert runs["entry_service"][0] == "frontend"
    assert json.loads(runs["config"][0])["steps"] == 60
    events = read_table(tmp_path / "ds", "events").collect()
    assert set(events["kind"]) == {"fault", "scale"}
    assert read_table(tmp_path / "ds", "node_metrics").collect().height == 2 * 60
    traces = workload.traces_from_dataset(tmp_path / "ds")
    assert traces.shape == (2, 60) and (traces > 0).all()
    probs = workload.fault_probs_from_dataset(tmp_path / "ds")
    assert probs.shape == (6,) and abs(probs.sum() - 1) < 1e-6


# The sharded rollout of both environments is checked in tests/test_cluster_env.py (one
# subprocess with several host devices for both).
