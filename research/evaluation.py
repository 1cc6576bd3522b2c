"""Evaluation of any policy in any environment of the common interface, on shared traces.

`evaluate(env, env_params, policy, n_episodes, key)` runs `n_episodes` episodes vmapped, each
for the episode length, without auto-reset. The environment's randomness (workload offset and
scale, fault schedule, noise) comes only from `key`'s environment branch and the policy's from
its own branch, so every policy evaluated with the same key meets the same workload and faults.
The result is deterministic under the key.

Figures (per episode, then averaged over episodes):
- `return`: sum of rewards;
- `slo_violation_rate`: fraction of steps whose entry p95 latency is over the SLO;
- `error_ratio`: mean entry error ratio;
- `mean_replicas`: mean total desired replicas per step (the replica cost);
- `scaling_actions`: sum of |replica change| over the episode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.agents import heuristics
from research.agents.policies import Policy, from_hpa, heuristic_suite

INFO_KEYS = ("slo_violation", "error_ratio", "replicas_total", "latency_p95_s", "scaling_actions")


def episode_steps(env, env_params) -> int:
    """The number of steps of one episode, as a Python int (needed for a static scan)."""
    return int(env_params.max_steps_in_episode)


def rollout_episode(env, env_params, policy: Policy, env_key, policy_key, n_steps: int):
    """One episode without auto-reset; returns per-step values, each with a leading T axis.

    Keys: `env_key` drives reset and every step, `policy_key` the policy only.
    """
    reset_key, steps_key = jax.random.split(env_key)
    init_key, act_key = jax.random.split(policy_key)
    obs, state = env.reset(reset_key, env_params)
    carry = policy.init(init_key, obs, state, env_params)

    def body(loop, keys):
        obs, state, carry = loop
        step_key, key = keys
        action, carry = policy.act(carry, obs, state, env_params, key)
        obs, state, reward, _, info = env.step_env(step_key, state, action, env_params)
        out = {"reward": reward, "replicas": state.replicas, **{k: info[k] for k in INFO_KEYS}}
        return (obs, state, carry), out

    keys = (jax.random.split(steps_key, n_steps), jax.random.split(act_key, n_steps))
    _, out = jax.lax.scan(body, (obs, state, carry), keys)
    return out


def rollout_episodes(env, env_params, policy: Policy, key, n_episodes: int, n_steps: int):
    """`n_episodes` episodes vmapped; per-step values with leading axes (B, T)."""
    env_key, policy_key = jax.random.split(key)
    env_keys = jax.random.split(env_key, n_episodes)
    policy_keys = jax.random.split(policy_key, n_episodes)
    return jax.vmap(lambda e, p: rollout_episode(env, env_params, policy, e, p, n_steps))(
        env_keys, policy_keys
    )


def summarise(steps: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The figures of the module docstring from per-step values (B, T)."""
    return {
        "return": steps["reward"].sum(axis=1).mean(),
        "return_std": steps["reward"].sum(axis=1).std(),
        "slo_violation_rate": steps["slo_violation"].mean(),
        "error_ratio": steps["error_ratio"].mean(),
        "mean_replicas": steps["replicas_total"].mean(),
        "scaling_actions": steps["scaling_actions"].sum(axis=1).mean(),
    }


def evaluate(
    env,
    env_params,
    policy: Policy,
    n_episodes: int,
    key: jax.Array,
    n_steps: int | None = None,
    trace_episode: int = 0,
) -> dict[str, Any]:
    """Figures of `policy` over `n_episodes` episodes (module docstring) as Python floats.

    Also returns `trace`: the per-step replicas (T, S), total replicas, entry p95 latency and
    reward of episode `trace_episode`, as lists, for plots.
    """
    n_steps = episode_steps(env, env_params) if n_steps is None else n_steps

    @jax.jit
    def run(params, key):
        steps = rollout_episodes(env, params, policy, key, n_episodes, n_steps)
        return summarise(steps), jax.tree.map(lambda x: x[trace_episode], steps)

    summary, trace = run(env_params, key)
    result: dict[str, Any] = {k: float(v) for k, v in summary.items()}
    result["episodes"] = n_episodes
    result["steps"] = n_steps
    result["trace"] = {
        "replicas": np.asarray(trace["replicas"]).tolist(),
        "replicas_total": np.asarray(trace["replicas_total"]).tolist(),
        "latency_p95_s": np.asarray(trace["latency_p95_s"]).tolist(),
        "reward": np.asarray(trace["reward"]).tolist(),
    }
    return result


def evaluate_suite(
    env, env_params, policies: dict[str, Policy], n_episodes: int, key: jax.Array, **kw
) -> dict[str, dict[str, Any]]:
    """`evaluate` for each named policy with the same key, hence the same traces."""
    return {
        name: evaluate(env, env_params, p, n_episodes, key, **kw) for name, p in policies.items()
    }


def tune_hpa(
    env,
    env_params,
    base: heuristics.HPAParams,
    key: jax.Array,
    targets: tuple[float, ...] = tuple(np.round(np.arange(0.2, 0.951, 0.05), 3)),
    n_episodes: int = 16,
    refine: bool = True,
) -> tuple[heuristics.HPAParams, dict[str, Any]]:
    """The HPA whose target utilisation maximises the mean return in `env`, by grid search.

    All candidate targets are evaluated at once (vmapped) on the same episodes; with `refine`,
    a second, five times finer grid around the best value follows. Returns the tuned parameters
    and a table {target: mean return, slo_violation_rate, mean_replicas} of every candidate.
    """
    n_steps = episode_steps(env, env_params)

    @jax.jit
    def scores(candidates):
        def one(target):
            policy = from_hpa(env, base.replace(target_utilisation=target), "tuned_hpa")
            return summarise(rollout_episodes(env, env_params, policy, key, n_episodes, n_steps))

        return jax.vmap(one)(candidates)

    table: dict[float, dict[str, float]] = {}

    def search(candidates: np.ndarray) -> float:
        result = scores(jnp.asarray(candidates, jnp.float32))
        for i, t in enumerate(candidates):
            table[round(float(t), 4)] = {k: float(v[i]) for k, v in result.items()}
        return float(candidates[int(np.argmax(np.asarray(result["return"])))])

    grid = np.asarray(targets, np.float32)
    best = search(grid)
    if refine and len(grid) > 1:
        step = float(np.min(np.diff(np.sort(grid))))
        fine = np.clip(best + step * np.linspace(-0.8, 0.8, len(grid)), 0.05, None)
        best = search(fine.astype(np.float32))
    best = max(table, key=lambda t: table[t]["return"])
    return base.replace(target_utilisation=best), {"best_target": best, "candidates": table}


def default_hpa(
    env, cpu_request_cores: float, target_utilisation: float = 0.5, **overrides
) -> heuristics.HPAParams:
    """The Kubernetes defaults (15 s sync, 300 s scale-down window, tolerance 0.1) mapped to
    `env`'s step, with its replica bounds and the given CPU request and target."""
    return heuristics.hpa_params_for(
        env.interval_s,
        target_utilisation=target_utilisation,
        cpu_request_cores=cpu_request_cores,
        min_replicas=env.min_replicas,
        max_replicas=env.max_replicas,
        **overrides,
    )


def compare_policies(
    envs: dict[str, tuple[Any, Any]],
    hpa: heuristics.HPAParams,
    key: jax.Array,
    n_episodes: int,
    actor: Policy | None = None,
    tune_in: str | None = None,
    hpa_targets: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
) -> dict[str, Any]:
    """Every policy in every environment of `envs` ({name: (env, params)}), on the same traces.

    The tuned HPA's target utilisation is searched in `envs[tune_in]` (the learned environment
    when there is one: tuning must not see the truth it is judged in). Policies: ppo (`actor`,
    when given), hpa, tuned_hpa, static_min, static_max, threshold, random.
    Returns {"evaluation": {env: {policy: figures}}, "tuned_hpa": {tuned_in, best_target,
    candidates}}.
    """
    tune_in = tune_in or next(iter(envs))
    tune_env, tune_params = envs[tune_in]
    tuned, table = tune_hpa(tune_env, tune_params, hpa, key, tuple(hpa_targets), n_episodes)
    evaluations = {}
    for name, (env, params) in envs.items():
        suite = heuristic_suite(env, hpa, tuned)
        if actor is not None:
            suite = {"ppo": actor, **suite}
        evaluations[name] = evaluate_suite(env, params, suite, n_episodes, key)
    candidates = {str(k): v for k, v in table["candidates"].items()}
    return {
        "evaluation": evaluations,
        "tuned_hpa": {
            "tuned_in": tune_in,
            "best_target": table["best_target"],
            "candidates": candidates,
        },
    }
