"""The two environments agents train and are evaluated in, built from one settings mapping.

Settings (the `env` config group, conf/env/*.yaml):

    name: reference | learned
    episode_steps: steps of an episode
    window_steps: past steps in the observation
    slo_s: entry p95 latency target, seconds
    reward_weights: w_slo, w_error, w_cost, w_churn (and w_uncertainty for the learned env)
    n_starts: episode starts drawn from the collected runs (learned env)
    sim_runs, sim_steps: reference runs simulated as the learned env's workload when no
        dataset is given (a model of random weights, used to measure speed)

The learned environment is `ClusterEnv` over a dynamics checkpoint; its workload traces and
episode starts come from a dataset (the checkpoint's own unless given). Without a checkpoint,
it runs the default model size with random weights, which is only good for measuring speed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collectors.errors import ConfigError

log = logging.getLogger(__name__)

ENV_NAMES = ("reference", "learned")


def reference_env(settings: Mapping[str, Any]):
    """`QueueingEnv` and its parameters for `settings` (see the module docstring)."""
    from jaxsim.queueing_env import QueueingEnv

    env = QueueingEnv(window_steps=int(settings.get("window_steps", 4)))
    overrides: dict[str, Any] = {"max_steps_in_episode": int(settings.get("episode_steps", 200))}
    if "slo_s" in settings:
        overrides["slo_s"] = float(settings["slo_s"])
    if settings.get("reward_weights") is not None:
        overrides["reward_weights"] = jnp.asarray(list(settings["reward_weights"])[:4], jnp.float32)
    return env, env.make_params(**overrides)


def learned_env(
    settings: Mapping[str, Any],
    checkpoint: str | Path | None = None,
    dataset: str | Path | None = None,
    seed: int = 0,
):
    """`ClusterEnv` and its parameters for a dynamics checkpoint (see the module docstring)."""
    from jaxsim.cluster_env import ClusterEnv
    from research.data import load_runs

    episode_steps = int(settings.get("episode_steps", 200))
    if checkpoint is not None:
        from research.checkpoint import load_model

        bundle = load_model(checkpoint)
        env = ClusterEnv.from_bundle(bundle, window_steps=int(settings.get("window_steps", 4)))
        model = bundle.params
        dataset = dataset or bundle.meta.get("dataset")
        if dataset is None:
            raise ConfigError(f"checkpoint {checkpoint} names no dataset; pass env.dataset")
        missing_ok = tuple(bundle.meta.get("data_config", {}).get("missing_ok", ()))
        runs = load_runs(dataset, services=bundle.services, missing_ok=missing_ok)
    else:
        env, model, runs = _random_model_env(settings, seed)
    weights = list(settings.get("reward_weights", [1.0, 1.0, 0.3, 0.05, 0.0]))
    weights = (weights + [0.0] * 5)[:5]
    params = env.make_params(
        model,
        runs,
        n_starts=int(settings.get("n_starts", 256)),
        seed=seed,
        max_steps_in_episode=episode_steps,
        slo_s=float(settings.get("slo_s", 0.3)),
        reward_weights=jnp.asarray(weights, jnp.float32),
    )
    return env, params


def _random_model_env(settings: Mapping[str, Any], seed: int):
    """The default-size model with random weights over simulated reference runs."""
    from jaxsim.cluster_env import ClusterEnv
    from jaxsim.reference_data import reference_runs
    from research import model as dyn
    from research.normalise import fit_normaliser

    log.warning("learned env without a checkpoint: a model of random weights (speed only)")
    episode_steps = int(settings.get("episode_steps", 200))
    cfg = dyn.DynamicsConfig(n_services=4, entry_index=0)
    steps = max(int(settings.get("sim_steps", 0)), cfg.window + episode_steps + 32)
    runs = reference_runs(int(settings.get("sim_runs", 4)), steps, seed)
    norm = fit_normaliser(
        np.concatenate([r.metrics for r in runs]), np.concatenate([r.mask for r in runs])
    )
    model = dyn.init_params(cfg, jax.random.key(seed), norm)
    return ClusterEnv(cfg, window_steps=int(settings.get("window_steps", 4))), model, runs


def make_env(
    settings: Mapping[str, Any],
    checkpoint: str | Path | None = None,
    dataset: str | Path | None = None,
    seed: int = 0,
):
    """The environment named by `settings["name"]` (reference | learned) and its parameters."""
    name = settings.get("name", "reference")
    if name == "reference":
        return reference_env(settings)
    if name == "learned":
        return learned_env(settings, checkpoint, dataset, seed)
    raise ConfigError(f"env.name {name!r} not in {ENV_NAMES}")
