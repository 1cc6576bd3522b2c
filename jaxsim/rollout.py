"""Batched rollouts of a gymnax environment: `lax.scan` over steps, `vmap` over environments,
optionally sharded over devices along the batch axis; and the same rollout stepped from a Python
loop, which gives the same result (used to check the scanned one and as a speed baseline).

A policy is a pure function `policy(key, obs, state) -> action` for ONE environment; it is
vmapped here. A collector `collect(obs, state, reward, done, info) -> pytree` receives batched
values (leading axis B) after each step and returns what the rollout keeps per step, so long
rollouts can keep summaries instead of full trajectories.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from gymnax.environments import environment
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_BASE_STEP = environment.Environment.step
Policy = Callable[[jax.Array, jax.Array, Any], jax.Array]
Collect = Callable[..., Any]


def random_policy(env) -> Policy:
    """A policy that samples uniformly from the environment's action space."""
    space = env.action_space(None)

    def policy(key: jax.Array, obs: jax.Array, state: Any) -> jax.Array:
        return space.sample(key)

    return policy


def collect_rewards(obs, state, reward, done, info) -> dict[str, jax.Array]:
    """Keep rewards, done flags and the contract's info entries, each (B,) per step."""
    keep = ("slo_violation", "error_ratio", "replicas_total", "latency_p95_s", "scaling_actions")
    return {"reward": reward, "done": done, **{k: info[k] for k in keep}}


def collect_metrics(obs, state, reward, done, info) -> dict[str, jax.Array]:
    """Keep the physical state of every environment: metrics (B, S, M), replicas, ready (B, S),
    faults (B, S, F), reward and done (B,)."""
    return {
        "metrics": state.metrics,
        "replicas": state.replicas,
        "ready": state.ready,
        "faults": state.faults,
        "reward": reward,
        "done": done,
    }


def _constrain(tree: Any, mesh: Mesh | None) -> Any:
    """Shard every leaf's leading (batch) axis over the mesh's `envs` axis."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec("envs"))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def batched_reset(env, params, key: jax.Array, n_envs: int, mesh: Mesh | None = None):
    """Reset `n_envs` environments with keys split from `key`: (obs (B, ...), state)."""
    keys = _constrain(jax.random.split(key, n_envs), mesh)
    return jax.vmap(env.reset, in_axes=(0, None))(keys, params)


def vector_step(env, keys: jax.Array, state, action: jax.Array, params):
    """`jax.vmap(env.step)` over a batch (keys (B,), state and action with axis B), giving the
    same results, but computing the auto-reset only when some environment of the batch is done.

    gymnax's `step` computes a reset at every step and selects it where an episode ended; under
    vmap that doubles the cost of an environment whose reset is not trivial (a model cache).
    Here the reset of the whole batch sits under a `lax.cond` on "any done". Wrapped
    environments (whose `step` adds logic) fall back to vmapping their own `step`.
    """
    if not isinstance(env, environment.Environment) or type(env).step is not _BASE_STEP:
        return jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, state, action, params)

    def transition(key, state, action):
        step_key, reset_key = jax.random.split(key)
        obs, state, reward, terminated, info = env.step_env(step_key, state, action, params)
        return obs, state, reward, terminated, env.is_truncated(state, params), info, reset_key

    obs_st, state_st, reward, terminated, truncated, info, reset_keys = jax.vmap(transition)(
        keys, state, action
    )
    done = terminated | truncated

    def with_reset(_):
        obs_re, state_re = jax.vmap(env.reset_env, in_axes=(0, None))(reset_keys, params)
        pick = partial(_select_where, done)
        return jax.tree.map(pick, obs_re, obs_st), jax.tree.map(pick, state_re, state_st)

    obs, state = jax.lax.cond(done.any(), with_reset, lambda _: (obs_st, state_st), None)
    info = {**info, "terminated": terminated, "truncated": truncated, "final_observation": obs_st}
    return obs, state, reward, terminated, truncated, info


def _select_where(done: jax.Array, reset: jax.Array, stepped: jax.Array) -> jax.Array:
    return jnp.where(done.reshape(done.shape + (1,) * (stepped.ndim - 1)), reset, stepped)


def batched_step(env, params, policy: Policy, key: jax.Array, obs, state, mesh=None):
    """One step of every environment: the policy acts, then the environments step.

    Returns (obs, state, reward, done, info), batched.
    """
    policy_key, env_key = jax.random.split(key)
    n_envs = obs.shape[0]
    policy_keys = _constrain(jax.random.split(policy_key, n_envs), mesh)
    env_keys = _constrain(jax.random.split(env_key, n_envs), mesh)
    actions = jax.vmap(policy)(policy_keys, obs, state)
    obs, state, reward, terminated, truncated, info = vector_step(
        env, env_keys, state, actions, params
    )
    obs, state = _constrain((obs, state), mesh)
    return obs, state, reward, terminated | truncated, info


def rollout(
    env,
    params,
    key: jax.Array,
    policy: Policy,
    n_envs: int,
    n_steps: int,
    collect: Collect = collect_rewards,
    mesh: Mesh | None = None,
):
    """Reset `n_envs` environments and run `n_steps` steps under `lax.scan` (jitted).

    Returns (final obs, final state, collected) where each leaf of `collected` has a leading
    time axis T = n_steps. With `mesh` (one axis named `envs`) the batch is sharded over it and
    the parameters are replicated on its devices; the result equals the unsharded rollout's.
    """
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        params, key = jax.device_put((params, key), replicated)
    return _rollout(env, params, key, policy, n_envs, n_steps, collect, mesh)


@partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _rollout(env, params, key, policy, n_envs, n_steps, collect, mesh):
    reset_key, steps_key = jax.random.split(key)
    obs, state = batched_reset(env, params, reset_key, n_envs, mesh)

    def body(carry, step_key):
        obs, state = carry
        obs, state, reward, done, info = batched_step(
            env, params, policy, step_key, obs, state, mesh
        )
        return (obs, state), collect(obs, state, reward, done, info)

    (obs, state), collected = jax.lax.scan(body, (obs, state), jax.random.split(steps_key, n_steps))
    return obs, state, collected


def python_loop_rollout(
    env,
    params,
    key: jax.Array,
    policy: Policy,
    n_envs: int,
    n_steps: int,
    collect: Collect = collect_rewards,
):
    """The same rollout as `rollout`, stepped from a Python loop with a jitted step."""
    reset_key, steps_key = jax.random.split(key)
    obs, state = jax.jit(batched_reset, static_argnums=(0, 3))(env, params, reset_key, n_envs)
    step = _jitted_step(env, policy, collect)
    outputs = []
    for step_key in jax.random.split(steps_key, n_steps):
        obs, state, kept = step(params, step_key, obs, state)
        outputs.append(kept)
    return obs, state, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def _jitted_step(env, policy: Policy, collect: Collect):
    @jax.jit
    def step(params, step_key, obs, state):
        obs, state, reward, done, info = batched_step(env, params, policy, step_key, obs, state)
        return obs, state, collect(obs, state, reward, done, info)

    return step


def device_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh named `envs` over `devices` (all local devices by default)."""
    import numpy as np

    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.array(devices), ("envs",))
