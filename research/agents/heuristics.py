"""Rule-based autoscalers as pure JAX functions: the Kubernetes HPA and simple baselines.

Every heuristic returns target replicas per service, (S,) int32; `research.agents.policies`
turns a target into the environment's bounded delta action. Stateless heuristics follow the
shared shape `policy(env_params, env_state, key) -> target`. The HPA keeps a small state of its
own (`HPAState`) so that it runs inside `lax.scan` and `vmap` like the environments.

The HPA follows the behaviour the Kubernetes documentation describes for
`autoscaling/v2` (horizontal-pod-autoscale and its "configurable scaling behavior" section):

- every sync period (15 s by default) it reads the mean CPU utilisation of the ready pods,
  utilisation = used cores / (ready pods x requested cores per pod);
- the desired count is ceil(ready pods x utilisation / target utilisation), unless the ratio
  utilisation / target lies within the tolerance (0.1) of 1, in which case nothing changes;
- when the metric is unavailable it neither records a recommendation nor scales;
- scaling down is stabilised: the controller uses the largest recommendation made within the
  last 300 s, so a short dip does not remove pods;
- scaling up is rate limited by two default policies, 100 % and 4 pods per 15 s, of which the
  larger wins; scaling down may remove up to 100 % per 15 s, i.e. is not rate limited;
- the result always lies within the minimum and maximum replica counts.

Simplification: the real controller treats pods without metrics or not yet ready specially when
it scales up (it assumes they use nothing); here utilisation is averaged over ready pods only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from collectors.schema import METRIC_COLUMNS

CPU_INDEX = METRIC_COLUMNS.index("cpu_cores")
K8S_SYNC_PERIOD_S = 15.0
K8S_DOWNSCALE_WINDOW_S = 300.0


@struct.dataclass
class HPAParams:
    """Settings of the HPA. Array fields may be vmapped (e.g. to search the target).

    `sync_period_steps` and `window_syncs` are static: they fix the size of the state.
    """

    target_utilisation: jax.Array | float = 0.5  # fraction of the CPU request, e.g. 0.5 = 50 %
    tolerance: jax.Array | float = 0.1  # no change while |utilisation / target - 1| <= this
    cpu_request_cores: jax.Array | float = 0.25  # CPU request of one pod, in cores
    min_replicas: jax.Array | int = 1
    max_replicas: jax.Array | int = 6
    scale_up_pods: jax.Array | int = 4  # pods that may be added per sync period
    scale_up_percent: jax.Array | float = 100.0  # percent of current that may be added per period
    sync_period_steps: int = struct.field(pytree_node=False, default=8)
    window_syncs: int = struct.field(pytree_node=False, default=20)


@struct.dataclass
class HPAState:
    """What the HPA remembers between calls."""

    recommendations: jax.Array  # (W, S) int32 recommendations of the last W syncs, 0 = none
    cursor: jax.Array  # () int32 slot of the next recommendation
    steps_since_sync: jax.Array  # () int32 steps since the last sync
    target: jax.Array  # (S,) int32 replicas decided at the last sync


def hpa_params_for(
    interval_s: float,
    sync_period_s: float = K8S_SYNC_PERIOD_S,
    downscale_window_s: float = K8S_DOWNSCALE_WINDOW_S,
    **overrides,
) -> HPAParams:
    """HPA settings for an environment whose step lasts `interval_s` seconds.

    The sync period becomes a whole number of steps (at least one); the stabilisation window
    becomes a number of syncs, since the controller records one recommendation per sync.
    """
    sync_steps = max(1, round(sync_period_s / interval_s))
    window = max(1, math.ceil(downscale_window_s / (sync_steps * interval_s) - 1e-9))
    return HPAParams(sync_period_steps=sync_steps, window_syncs=window, **overrides)


def cpu_utilisation(
    cpu_cores: jax.Array, ready: jax.Array, cpu_request_cores: jax.Array | float
) -> jax.Array:
    """Mean utilisation of the ready pods, (S,); NaN where no pod is ready or no metric."""
    capacity_cores = ready.astype(jnp.float32) * cpu_request_cores
    return jnp.where(ready > 0, cpu_cores / jnp.maximum(capacity_cores, 1e-9), jnp.nan)


def desired_from_metric(
    utilisation: jax.Array,
    ready: jax.Array,
    current: jax.Array,
    target_utilisation: jax.Array | float,
    tolerance: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """The HPA's raw recommendation and whether the metric was available, both (S,).

    desired = ceil(ready x utilisation / target), or `current` inside the tolerance band or
    when the metric is missing.
    """
    ratio = utilisation / target_utilisation
    valid = jnp.isfinite(ratio)
    ratio = jnp.where(valid, ratio, 1.0)
    raw = jnp.ceil(ready.astype(jnp.float32) * ratio - 1e-6).astype(jnp.int32)
    within = jnp.abs(ratio - 1.0) <= tolerance
    return jnp.where(within | ~valid, current, raw), valid


def stabilise(
    recommendation: jax.Array, current: jax.Array, window_recommendations: jax.Array
) -> jax.Array:
    """Scale-down stabilisation: never below the largest recommendation in the window, (S,).

    `window_recommendations` (W, S) holds the recommendations of the window (0 = empty slot);
    the current one is counted whether or not it is among them. Scale-up has a window of zero,
    so an upward recommendation passes straight through.
    """
    window_max = jnp.maximum(window_recommendations.max(axis=0), recommendation)
    up = jnp.maximum(current, recommendation)
    return jnp.minimum(up, window_max)


def limit_rate(stabilised: jax.Array, current: jax.Array, params: HPAParams) -> jax.Array:
    """Applies the scale-up policies (the larger of percent and pods wins) and min/max, (S,)."""
    by_percent = jnp.ceil(current * (1.0 + params.scale_up_percent / 100.0) - 1e-6)
    by_pods = current + params.scale_up_pods
    up_limit = jnp.maximum(by_percent.astype(jnp.int32), by_pods)
    up_limit = jnp.minimum(up_limit, params.max_replicas)
    limited = jnp.minimum(stabilised, up_limit)
    return jnp.clip(limited, params.min_replicas, params.max_replicas).astype(jnp.int32)


def hpa_init(params: HPAParams, replicas: jax.Array) -> HPAState:
    """A fresh HPA state for services currently at `replicas` (S,); the first call syncs."""
    n_services = replicas.shape[-1]
    return HPAState(
        recommendations=jnp.zeros((params.window_syncs, n_services), jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        steps_since_sync=jnp.full((), params.sync_period_steps, jnp.int32),
        target=replicas.astype(jnp.int32),
    )


def hpa_sync(
    params: HPAParams,
    state: HPAState,
    cpu_cores: jax.Array,
    ready: jax.Array,
    current: jax.Array,
) -> tuple[jax.Array, HPAState]:
    """One HPA reconciliation: target replicas (S,) and the state with the recommendation."""
    utilisation = cpu_utilisation(cpu_cores, ready, params.cpu_request_cores)
    recommendation, valid = desired_from_metric(
        utilisation, ready, current, params.target_utilisation, params.tolerance
    )
    # The newest recommendation replaces the oldest, W syncs ago: the window then spans the
    # current sync and the W - 1 before it, all strictly within the stabilisation window.
    slot = jnp.where(valid, recommendation, 0)
    recommendations = state.recommendations.at[state.cursor].set(slot)
    stabilised = stabilise(recommendation, current, recommendations)
    target = jnp.where(valid, limit_rate(stabilised, current, params), current)

    new_state = HPAState(
        recommendations=recommendations,
        cursor=(state.cursor + 1) % params.window_syncs,
        steps_since_sync=jnp.zeros((), jnp.int32),
        target=target.astype(jnp.int32),
    )
    return new_state.target, new_state


def hpa_step(params: HPAParams, state: HPAState, env_state) -> tuple[jax.Array, HPAState]:
    """Called once per environment step: syncs every `sync_period_steps`, else holds its target.

    Reads `env_state.metrics` (S, M) in physical units, `env_state.ready` (S,) and
    `env_state.replicas` (S,) desired. Returns target replicas (S,) int32 and the new state.
    """
    cpu_cores = env_state.metrics[..., CPU_INDEX]
    due = state.steps_since_sync + 1 >= params.sync_period_steps

    def sync(hpa_state):
        return hpa_sync(params, hpa_state, cpu_cores, env_state.ready, env_state.replicas)

    def hold(hpa_state):
        held = hpa_state.replace(steps_since_sync=hpa_state.steps_since_sync + 1)
        return held.target, held

    return jax.lax.cond(due, sync, hold, state)


def static_policy(replicas: int):
    """A policy that always asks for `replicas` per service (static minimum or maximum)."""

    def policy(env_params, env_state, key) -> jax.Array:
        del env_params, key
        return jnp.full_like(env_state.replicas, replicas, dtype=jnp.int32)

    return policy


def threshold_policy(
    high_utilisation: float = 0.8,
    low_utilisation: float = 0.3,
    cpu_request_cores: float = 0.25,
    min_replicas: int = 1,
    max_replicas: int = 6,
):
    """One replica more above `high_utilisation`, one fewer below `low_utilisation`."""

    def policy(env_params, env_state, key) -> jax.Array:
        del env_params, key
        current = env_state.replicas
        cpu_cores = env_state.metrics[..., CPU_INDEX]
        utilisation = cpu_utilisation(cpu_cores, env_state.ready, cpu_request_cores)
        step = jnp.where(utilisation > high_utilisation, 1, 0)
        step = jnp.where(utilisation < low_utilisation, -1, step)
        return jnp.clip(current + step, min_replicas, max_replicas).astype(jnp.int32)

    return policy


def random_policy(min_replicas: int = 1, max_replicas: int = 6):
    """Uniformly random target replicas per service."""

    def policy(env_params, env_state, key) -> jax.Array:
        del env_params
        shape = env_state.replicas.shape
        return jax.random.randint(key, shape, min_replicas, max_replicas + 1, jnp.int32)

    return policy
