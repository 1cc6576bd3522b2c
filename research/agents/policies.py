"""One shape for every policy, trained or rule-based, in simulation and on the live testbed.

In simulation a `Policy` is a pair of pure functions that run inside `lax.scan` and `vmap`:

    carry = policy.init(key, obs, env_state, env_params)
    action, carry = policy.act(carry, obs, env_state, env_params, key)

where `action` (S,) int32 is the environment's delta index in [0, 2 * max_delta]. Heuristics
produce target replicas, which `target_to_action` turns into the bounded delta.

On the live testbed a policy is a callable `policy(history: polars.DataFrame) -> dict[service,
int]` over the recent `service_metrics` rows; `LiveHPA` adapts the HPA to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collectors.errors import DataError
from collectors.schema import METRIC_COLUMNS
from research.agents import heuristics, networks


class Policy(NamedTuple):
    """A policy in the environments' common shape (see the module docstring)."""

    name: str
    init: Callable[..., Any]
    act: Callable[..., tuple[jax.Array, Any]]


def target_to_action(env, state, target: jax.Array) -> jax.Array:
    """Delta action index (S,) int32 that moves `state.replicas` towards `target` (S,).

    The target is first clipped to the environment's replica bounds, then the change to at most
    `env.max_delta` per step.
    """
    target = jnp.clip(target, env.min_replicas, env.max_replicas)
    delta = jnp.clip(target - state.replicas, -env.max_delta, env.max_delta)
    return (delta + env.max_delta).astype(jnp.int32)


def from_target_fn(env, target_fn: Callable, name: str) -> Policy:
    """A stateless heuristic `target_fn(env_params, env_state, key) -> (S,)` as a `Policy`."""

    def init(key, obs, env_state, env_params):
        return ()

    def act(carry, obs, env_state, env_params, key):
        target = target_fn(env_params, env_state, key)
        return target_to_action(env, env_state, target), carry

    return Policy(name, init, act)


def from_hpa(env, hpa_params: heuristics.HPAParams, name: str = "hpa") -> Policy:
    """The HPA as a `Policy`; its `HPAState` is the carry."""

    def init(key, obs, env_state, env_params):
        return heuristics.hpa_init(hpa_params, env_state.replicas)

    def act(carry, obs, env_state, env_params, key):
        target, carry = heuristics.hpa_step(hpa_params, carry, env_state)
        return target_to_action(env, env_state, target), carry

    return Policy(name, init, act)


def from_actor(
    network: networks.ActorCritic, params: Any, deterministic: bool = True, name: str = "ppo"
) -> Policy:
    """A trained actor-critic as a `Policy`: the most likely action, or a sample."""

    def init(key, obs, env_state, env_params):
        return ()

    def act(carry, obs, env_state, env_params, key):
        logits, _ = network.apply(params, obs[None])
        if deterministic:
            action = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)
        else:
            action = networks.sample(key, logits)[0]
        return action, carry

    return Policy(name, init, act)


def heuristic_suite(
    env, hpa_params: heuristics.HPAParams, tuned_hpa: heuristics.HPAParams | None = None
) -> dict[str, Policy]:
    """Baseline policies by name: hpa, tuned_hpa (if given), static_min/max, threshold, random."""
    suite = {
        "hpa": from_hpa(env, hpa_params, "hpa"),
        "static_min": from_target_fn(env, heuristics.static_policy(env.min_replicas), "static_min"),
        "static_max": from_target_fn(env, heuristics.static_policy(env.max_replicas), "static_max"),
        "threshold": from_target_fn(
            env,
            heuristics.threshold_policy(
                cpu_request_cores=float(hpa_params.cpu_request_cores),
                min_replicas=env.min_replicas,
                max_replicas=env.max_replicas,
            ),
            "threshold",
        ),
        "random": from_target_fn(
            env, heuristics.random_policy(env.min_replicas, env.max_replicas), "random"
        ),
    }
    if tuned_hpa is not None:
        suite["tuned_hpa"] = from_hpa(env, tuned_hpa, "tuned_hpa")
    return suite


class _LiveState(NamedTuple):
    metrics: jax.Array  # (S, M) physical units
    replicas: jax.Array  # (S,) int32 desired
    ready: jax.Array  # (S,) int32


def latest_state(history, services: Sequence[str]) -> _LiveState:
    """The newest step of a `service_metrics` frame as arrays in `services` order.

    Missing metrics stay NaN; a service without a row at the newest step raises DataError.
    """
    import polars as pl

    if history.is_empty():
        raise DataError("live policy got an empty service_metrics history")
    newest = history.filter(pl.col("step") == history["step"].max())
    rows = {row["service"]: row for row in newest.iter_rows(named=True)}
    missing = [s for s in services if s not in rows]
    if missing:
        step = int(history["step"].max())
        raise DataError(f"service_metrics step {step} has no rows for services {missing}")

    def value(row, column):
        v = row.get(column)
        return np.nan if v is None else float(v)

    metrics = np.array([[value(rows[s], c) for c in METRIC_COLUMNS] for s in services])
    desired = np.array([int(rows[s]["replicas_desired"] or 0) for s in services])
    ready = np.array([int(rows[s]["replicas_ready"] or 0) for s in services])
    return _LiveState(
        jnp.asarray(metrics, jnp.float32),
        jnp.asarray(desired, jnp.int32),
        jnp.asarray(ready, jnp.int32),
    )


class LiveHPA:
    """The HPA for `collectors.closed_loop.run_live`: `policy(history) -> {service: target}`.

    Call it once per sample interval; it keeps its `HPAState` between calls, so the sync period
    and the stabilisation window count calls exactly as they count environment steps.
    """

    def __init__(self, hpa_params: heuristics.HPAParams, services: Sequence[str]):
        self.params = hpa_params
        self.services = list(services)
        self.state: heuristics.HPAState | None = None
        self._step = jax.jit(lambda s, e: heuristics.hpa_step(hpa_params, s, e))

    def __call__(self, history) -> dict[str, int]:
        env_state = latest_state(history, self.services)
        if self.state is None:
            self.state = heuristics.hpa_init(self.params, env_state.replicas)
        target, self.state = self._step(self.state, env_state)
        return {s: int(t) for s, t in zip(self.services, np.asarray(target), strict=True)}
