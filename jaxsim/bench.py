"""Throughput benchmark of the environments (`python -m experiments.bench`).

Measures `ClusterEnv` steps per second for several numbers of parallel environments (vmap, jit,
`lax.scan` over steps, through `jaxsim.rollout.rollout`), one environment stepped from a Python
loop with the same jitted step, the reference `QueueingEnv`, the model's FLOPs per step and the
fraction of this machine's float32 matrix-multiply peak (measured in the same run) that the
batched rollout reaches.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsim.cluster_env import ClusterEnv
from jaxsim.core import SERVICES
from jaxsim.queueing_env import QueueingEnv, reference_normaliser
from jaxsim.rollout import random_policy, rollout
from research import model as dyn
from research.synthetic import run_arrays


def keep_reward_mean(obs, state, reward, done, info) -> jax.Array:
    """What the benchmark keeps per step: the mean reward (so outputs stay small)."""
    return reward.mean()


def _timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn() after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matrix-multiply FLOP/s of a jitted (size x size) @ (size x size)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2.0 * size**3 / _timed(lambda: matmul(a, b), repeats)


def rollout_steps_per_s(env, params, n_envs: int, n_steps: int, repeats: int) -> float:
    """Environment steps per second of `rollout` (vmap + jit + lax.scan), compile excluded."""
    policy = random_policy(env)
    keys = iter(jax.random.split(jax.random.key(0), repeats + 1))

    def run():
        return rollout(env, params, next(keys), policy, n_envs, n_steps, keep_reward_mean)[2]

    return n_envs * n_steps / _timed(run, repeats)


def python_loop_steps_per_s(env, params, n_steps: int) -> float:
    """Steps per second of ONE environment stepped from a Python loop (jitted step)."""
    step = jax.jit(env.step)
    _, state = jax.jit(env.reset)(jax.random.key(0), params)
    actions = jax.random.randint(jax.random.key(1), (n_steps, env.layout.n_services), 0, 3)
    keys = jax.random.split(jax.random.key(2), n_steps)
    jax.block_until_ready(step(keys[0], state, actions[0], params))
    start = time.perf_counter()
    for i in range(n_steps):
        _, state, reward, *_ = step(keys[i], state, actions[i], params)
    jax.block_until_ready(reward)
    return n_steps / (time.perf_counter() - start)


def run_benchmark(
    model_cfg: Mapping[str, Any],
    checkpoint: str | None = None,
    n_envs: Sequence[int] = (1024, 4096, 16384),
    n_steps: int = 200,
    loop_steps: int = 2000,
    repeats: int = 2,
    reference_envs: int = 4096,
    n_starts: int = 256,
    episode_steps: int = 200,
    window_steps: int = 4,
    matmul_size: int = 2048,
    progress=None,
) -> dict[str, Any]:
    """All figures of `bench.json`. Without `checkpoint`, a randomly initialised model of
    `model_cfg` (conf/model) with the reference normaliser. `progress(name)` is called before
    each measurement."""
    note = progress or (lambda name: None)
    if checkpoint:
        from research.checkpoint import load_model

        bundle = load_model(checkpoint)
        cfg, model = bundle.cfg, bundle.params
        env = ClusterEnv.from_bundle(bundle, window_steps=window_steps)
    else:
        cfg = dyn.DynamicsConfig(n_services=len(SERVICES), **dict(model_cfg))
        model = dyn.init_params(cfg, jax.random.key(0), reference_normaliser(len(SERVICES)))
        env = ClusterEnv(cfg, window_steps=window_steps)
    runs = run_arrays(2, cfg.window + episode_steps + 100, prefix="bench")
    params = env.make_params(model, runs, n_starts=n_starts, max_steps_in_episode=episode_steps)

    note("matmul peak")
    peak = matmul_peak_flops(matmul_size)
    env_steps = {}
    for n in n_envs:
        note(f"ClusterEnv x {n}")
        env_steps[str(n)] = rollout_steps_per_s(env, params, n, n_steps, repeats)
    note("python loop")
    loop = python_loop_steps_per_s(env, params, loop_steps)
    note("reference env")
    reference = QueueingEnv(window_steps=window_steps)
    ref_params = reference.default_params.replace(max_steps_in_episode=episode_steps)
    ref_steps = rollout_steps_per_s(reference, ref_params, reference_envs, n_steps, repeats)

    flops = dyn.flops_per_cached_step(cfg)
    main_key = "4096" if "4096" in env_steps else max(env_steps, key=int)
    return {
        "env_steps_per_s": env_steps,
        "python_loop_steps_per_s": loop,
        "reference_env_steps_per_s": ref_steps,
        "flops_per_step": flops,
        "matmul_peak_flops": peak,
        "peak_fraction": flops * env_steps[main_key] / peak,
        "peak_fraction_at": int(main_key),
        "model_config": cfg.to_dict(),
        "checkpoint": checkpoint,
        "n_steps": n_steps,
        "device": str(jax.devices()[0].device_kind),
        "n_devices": jax.device_count(),
    }
