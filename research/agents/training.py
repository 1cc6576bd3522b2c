"""Train, keep and reload a PPO agent from plain settings: what `experiments.train_agent` and
the pipeline run.

An agent folder holds the kept seed's parameters (orbax), and `meta.json` with the PPO config,
the environment settings, the checkpoint it trained on and the training figures, so the folder
alone rebuilds the actor (`load_actor`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from research import evaluation
from research.agents import envs, policies, ppo

N_SEEDS_KEY = "n_seeds"  # in the agent settings beside the PPOConfig fields


def split_agent_settings(agent: Mapping[str, Any]) -> tuple[ppo.PPOConfig, int]:
    """The `PPOConfig` and the number of seeds from the `agent` config group."""
    values = dict(agent)
    n_seeds = int(values.pop(N_SEEDS_KEY, 1))
    return ppo.config_from_dict(values), n_seeds


def train_agent(
    agent: Mapping[str, Any],
    env_settings: Mapping[str, Any],
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    eval_episodes: int = 32,
    logger=None,
) -> dict[str, Any]:
    """Trains `agent["n_seeds"]` PPO agents at once in the environment of `env_settings`,
    keeps the best, evaluates it there (`eval_episodes` episodes, deterministic actions) and
    saves it to `<out_dir>/agent`. Returns a JSON-able summary with `agent_dir`."""
    cfg, n_seeds = split_agent_settings(agent)
    env, env_params = envs.make_env(env_settings, checkpoint, seed=seed)
    params, summary = ppo.train_and_select(env, env_params, cfg, n_seeds, seed, logger)

    actor = policies.from_actor(ppo.make_network(env, cfg), params)
    figures = evaluation.evaluate(env, env_params, actor, eval_episodes, jax.random.key(seed + 1))
    figures.pop("trace")
    if logger is not None:
        logger.log({f"eval/{k}": v for k, v in figures.items()}, step=summary["env_steps"])
    meta = {
        "ppo": ppo.config_to_dict(cfg),
        "env": dict(env_settings),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "seed": seed,
        "training": summary,
        "eval": figures,
    }
    agent_dir = ppo.save_agent(Path(out_dir) / "agent", params, meta)
    return {"agent_dir": str(agent_dir), **summary, "eval": figures}


def load_actor(agent_dir: str | Path, env, name: str = "ppo") -> policies.Policy:
    """The deterministic actor of a saved agent as a `Policy` for `env`."""
    params, meta = ppo.load_agent(agent_dir)
    cfg = ppo.config_from_dict(meta["ppo"])
    return policies.from_actor(ppo.make_network(env, cfg), params, name=name)
