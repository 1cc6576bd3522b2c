"""Proximal policy optimisation with the whole training loop in one jitted function.

`train(key, env, env_params, cfg)` collects rollouts from `cfg.num_envs` vmapped environments
with `lax.scan`, computes generalised advantage estimates, and runs clipped-objective updates
over shuffled minibatches, all inside `jax.jit`. `train_seeds` vmaps it over PRNG keys so that
several agents train at once. The environment is any gymnax environment whose instance carries
`services` (S) and `max_delta` (actions per service: 2 * max_delta + 1); the action is (S,) int32.

Time-limit truncation is not treated as termination: the value of the final observation of a
truncated episode bootstraps its return.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from collectors.errors import ConfigError
from research.agents import networks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of PPO; static under jit (hashable)."""

    total_timesteps: int = 1_000_000  # environment steps per seed
    num_envs: int = 64  # environments stepped in parallel per seed
    num_steps: int = 64  # steps per environment per rollout
    update_epochs: int = 4  # passes over each rollout
    num_minibatches: int = 4  # minibatches per pass
    gamma: float = 0.99  # discount
    gae_lambda: float = 0.95  # GAE lambda
    clip_eps: float = 0.2  # ratio clip of the surrogate objective
    ent_coef: float = 0.01  # entropy bonus weight
    vf_coef: float = 0.5  # value loss weight
    max_grad_norm: float = 0.5  # global gradient norm clip
    lr: float = 3e-4  # Adam learning rate
    anneal_lr: bool = True  # linear decay of the learning rate to zero
    hidden_sizes: tuple[int, ...] = (64, 64)  # widths of the actor and critic MLPs


@dataclass(frozen=True)
class Sizes:
    """Sizes derived from a `PPOConfig`."""

    batch_size: int  # steps per update = num_envs * num_steps
    minibatch_size: int
    num_updates: int


def derived_sizes(cfg: PPOConfig) -> Sizes:
    """Batch sizes and the number of updates; raises ConfigError when they do not divide."""
    batch = cfg.num_envs * cfg.num_steps
    if batch % cfg.num_minibatches:
        raise ConfigError(
            f"num_envs * num_steps = {batch} is not divisible by "
            f"num_minibatches = {cfg.num_minibatches}"
        )
    updates = cfg.total_timesteps // batch
    if updates < 1:
        raise ConfigError(f"total_timesteps = {cfg.total_timesteps} is below one batch ({batch})")
    return Sizes(batch, batch // cfg.num_minibatches, updates)


def make_network(env, cfg: PPOConfig) -> networks.ActorCritic:
    """The actor-critic for `env`: one head per service over 2 * max_delta + 1 actions."""
    return networks.ActorCritic(
        n_services=len(env.services),
        n_actions=2 * int(env.max_delta) + 1,
        hidden_sizes=tuple(cfg.hidden_sizes),
    )


class Transition(NamedTuple):
    """One step of all environments in a rollout (leading axes T, B after the scan)."""

    obs: jax.Array  # (B, ...) observation acted on
    action: jax.Array  # (B, S) int32
    log_prob: jax.Array  # (B,)
    value: jax.Array  # (B,)
    reward: jax.Array  # (B,)
    terminated: jax.Array  # (B,) bool
    done: jax.Array  # (B,) bool, terminated or truncated
    final_obs: jax.Array  # (B, ...) observation after the step, before any auto-reset


@struct.dataclass
class Runner:
    """Carry of the training loop."""

    train_state: TrainState
    env_state: Any
    obs: jax.Array  # (B, ...)
    episode_return: jax.Array  # (B,) return of the running episode
    last_return: jax.Array  # (B,) return of the last finished episode
    key: jax.Array


class TrainResult(NamedTuple):
    """Output of `train`: final parameters and one row of metrics per update."""

    params: Any
    metrics: dict[str, jax.Array]  # each (num_updates,), or (seeds, num_updates) when vmapped


def _gae(traj: Transition, next_values: jax.Array, cfg: PPOConfig):
    """Advantages and value targets (T, B) by a reverse scan."""
    not_term = 1.0 - traj.terminated.astype(jnp.float32)
    not_done = 1.0 - traj.done.astype(jnp.float32)
    deltas = traj.reward + cfg.gamma * not_term * next_values - traj.value

    def back(advantage, xs):
        delta, keep = xs
        advantage = delta + cfg.gamma * cfg.gae_lambda * keep * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros_like(deltas[0]), (deltas, not_done), reverse=True)
    return advantages, advantages + traj.value


def _loss(params, apply_fn, batch, cfg: PPOConfig):
    traj, advantages, targets = batch
    logits, values = apply_fn(params, traj.obs)
    new_log_prob = networks.log_prob(logits, traj.action)

    ratio = jnp.exp(new_log_prob - traj.log_prob)
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    surrogate = jnp.minimum(
        ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
    )
    policy_loss = -surrogate.mean()

    clipped_values = traj.value + jnp.clip(values - traj.value, -cfg.clip_eps, cfg.clip_eps)
    value_loss = 0.5 * jnp.maximum((values - targets) ** 2, (clipped_values - targets) ** 2).mean()
    ent = networks.entropy(logits).mean()

    total = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * ent
    approx_kl = ((ratio - 1.0) - jnp.log(ratio)).mean()
    return total, {"policy": policy_loss, "value": value_loss, "entropy": ent, "kl": approx_kl}


def train(key: jax.Array, env, env_params, cfg: PPOConfig) -> TrainResult:
    """Trains one agent; pure and jittable with `env` and `cfg` static.

    Metrics per update: `train/episode_return` (mean over environments of the last finished
    episode's return), `train/reward`, `loss/policy`, `loss/value`, `loss/entropy`, `loss/kl`.
    """
    sizes = derived_sizes(cfg)
    network = make_network(env, cfg)
    init_key, reset_key, loop_key = jax.random.split(key, 3)

    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(reset_key, cfg.num_envs), env_params
    )
    params = network.init(init_key, obs)

    def lr_schedule(count):
        steps_per_update = cfg.update_epochs * cfg.num_minibatches
        frac = 1.0 - (count // steps_per_update) / sizes.num_updates
        return cfg.lr * frac if cfg.anneal_lr else cfg.lr

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr_schedule, eps=1e-5)
    )
    train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    zeros = jnp.zeros((cfg.num_envs,), jnp.float32)
    runner = Runner(train_state, env_state, obs, zeros, zeros, loop_key)

    def env_step(runner: Runner, _):
        key, act_key, step_key = jax.random.split(runner.key, 3)
        logits, value = network.apply(runner.train_state.params, runner.obs)
        action = networks.sample(act_key, logits)
        step_keys = jax.random.split(step_key, cfg.num_envs)
        obs, env_state, reward, terminated, truncated, info = jax.vmap(
            env.step, in_axes=(0, 0, 0, None)
        )(step_keys, runner.env_state, action, env_params)
        done = terminated | truncated

        episode_return = runner.episode_return + reward
        transition = Transition(
            obs=runner.obs,
            action=action,
            log_prob=networks.log_prob(logits, action),
            value=value,
            reward=reward,
            terminated=terminated,
            done=done,
            final_obs=info["final_observation"],
        )
        runner = runner.replace(
            env_state=env_state,
            obs=obs,
            episode_return=jnp.where(done, 0.0, episode_return),
            last_return=jnp.where(done, episode_return, runner.last_return),
            key=key,
        )
        return runner, transition

    def update_minibatch(train_state: TrainState, batch):
        grad_fn = jax.value_and_grad(_loss, has_aux=True)
        (_, parts), grads = grad_fn(train_state.params, network.apply, batch, cfg)
        return train_state.apply_gradients(grads=grads), parts

    def update_epoch(carry, _):
        train_state, data, key = carry
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, sizes.batch_size)

        def to_minibatches(x):
            x = x.reshape((sizes.batch_size, *x.shape[2:]))[perm]
            return x.reshape((cfg.num_minibatches, sizes.minibatch_size, *x.shape[1:]))

        minibatches = jax.tree.map(to_minibatches, data)
        train_state, parts = jax.lax.scan(update_minibatch, train_state, minibatches)
        return (train_state, data, key), parts

    def update(runner: Runner, _):
        runner, traj = jax.lax.scan(env_step, runner, None, cfg.num_steps)
        flat_final = traj.final_obs.reshape((sizes.batch_size, *traj.final_obs.shape[2:]))
        _, next_values = network.apply(runner.train_state.params, flat_final)
        next_values = next_values.reshape(traj.reward.shape)
        advantages, targets = _gae(traj, next_values, cfg)

        key, epoch_key = jax.random.split(runner.key)
        (train_state, _, _), parts = jax.lax.scan(
            update_epoch,
            (runner.train_state, (traj, advantages, targets), epoch_key),
            None,
            cfg.update_epochs,
        )
        runner = runner.replace(train_state=train_state, key=key)
        metrics = {f"loss/{k}": v.mean() for k, v in parts.items()}
        metrics["train/episode_return"] = runner.last_return.mean()
        metrics["train/reward"] = traj.reward.mean()
        return runner, metrics

    runner, metrics = jax.lax.scan(update, runner, None, sizes.num_updates)
    return TrainResult(runner.train_state.params, metrics)


def _seeds_fn(env, cfg: PPOConfig):
    """`train` vmapped over keys and jitted; the environment parameters are an argument, so
    another parameter set of the same shapes (e.g. a new checkpoint) does not recompile."""
    return jax.jit(jax.vmap(lambda k, p: train(k, env, p, cfg), in_axes=(0, None)))


def train_seeds(keys: jax.Array, env, env_params, cfg: PPOConfig) -> TrainResult:
    """Trains one agent per key (N keys) at once, vmapped and jitted; leaves lead with N."""
    return _seeds_fn(env, cfg)(keys, env_params)


def train_and_select(
    env, env_params, cfg: PPOConfig, n_seeds: int = 2, seed: int = 0, logger=None
) -> tuple[Any, dict[str, Any]]:
    """Trains `n_seeds` agents at once and keeps the best (`select_seed`).

    Logs the kept seed's per-update metrics and the run's figures to `logger` (a
    `research.logger.MetricsLogger`, optional). Returns the kept parameters and a JSON-able
    summary: best_seed, final_return per seed, env_steps (all seeds), compile_s, train_s,
    steps_per_s (without compilation) and steps_per_s_total (with it).
    """
    sizes = derived_sizes(cfg)
    keys = jax.random.split(jax.random.key(seed), n_seeds)
    started = time.perf_counter()
    compiled = _seeds_fn(env, cfg).lower(keys, env_params).compile()
    compiled_at = time.perf_counter()
    result = compiled(keys, env_params)
    jax.block_until_ready(result.params)
    finished = time.perf_counter()

    best, params = select_seed(result)
    env_steps = n_seeds * sizes.num_updates * sizes.batch_size
    returns = np.asarray(result.metrics["train/episode_return"])
    summary = {
        "best_seed": best,
        "n_seeds": n_seeds,
        "final_return": returns[:, -5:].mean(axis=1).tolist(),
        "env_steps": env_steps,
        "compile_s": compiled_at - started,
        "train_s": finished - compiled_at,
        "steps_per_s": env_steps / (finished - compiled_at),
        "steps_per_s_total": env_steps / (finished - started),
    }
    log.info(
        "PPO: %d seeds x %d steps in %.1f s (+ %.1f s compile), %.0f steps/s; best seed %d",
        n_seeds,
        sizes.num_updates * sizes.batch_size,
        summary["train_s"],
        summary["compile_s"],
        summary["steps_per_s"],
        best,
    )
    if logger is not None:
        log_metrics(logger, result.metrics, cfg, seed=best)
        logger.summary({f"train/{k}": v for k, v in summary.items() if k != "final_return"})
    return params, summary


def select_seed(result: TrainResult, last_updates: int = 5) -> tuple[int, Any]:
    """Index and parameters of the seed with the best mean return over its last updates."""
    returns = np.asarray(result.metrics["train/episode_return"])[:, -last_updates:]
    best = int(np.argmax(returns.mean(axis=1)))
    return best, jax.tree.map(lambda x: x[best], result.params)


def log_metrics(logger, metrics: dict[str, Any], cfg: PPOConfig, seed: int | None = None):
    """Writes per-update metrics (one seed's row) to a `MetricsLogger`, step = env steps."""
    rows = {k: np.asarray(v) for k, v in metrics.items()}
    if seed is not None:
        rows = {k: v[seed] for k, v in rows.items()}
    steps_per_update = cfg.num_envs * cfg.num_steps
    n = len(next(iter(rows.values())))
    for i in range(n):
        logger.log({k: v[i] for k, v in rows.items()}, step=(i + 1) * steps_per_update)


def save_agent(path: str | Path, params: Any, meta: dict[str, Any]) -> Path:
    """Saves agent parameters with orbax and `meta` (JSON-able, e.g. the config) beside them."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", jax.device_get(params), force=True)
    checkpointer.wait_until_finished()
    (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def load_agent(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Parameters and meta written by `save_agent`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "meta.json").exists():
        raise ConfigError(f"no agent checkpoint at {path} (meta.json missing)")
    params = ocp.StandardCheckpointer().restore(path / "params")
    return params, json.loads((path / "meta.json").read_text())


def config_to_dict(cfg: PPOConfig) -> dict[str, Any]:
    """The config as a plain dict, for checkpoint meta and loggers."""
    return asdict(cfg)


def config_from_dict(values: dict[str, Any]) -> PPOConfig:
    """A `PPOConfig` from a dict (e.g. a Hydra node); unknown keys raise ConfigError."""
    known = set(PPOConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown PPO config fields {sorted(unknown)}; known: {sorted(known)}")
    values = dict(values)
    if "hidden_sizes" in values:
        values["hidden_sizes"] = tuple(values["hidden_sizes"])
    return PPOConfig(**values)
