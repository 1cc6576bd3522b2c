"""`ClusterEnv`: a gymnax environment whose dynamics are the learned model of `research.model`.

One `step` appends the newest step to the model's key/value cache (`step_cached`, which only
processes what is new) and reads the prediction of the next step. Static settings (layout,
model config, window of the observation, sampling modes) live on the instance; the model's
parameters, the episode starts, the workload traces, the fault process and the reward live in
the frozen `ClusterParams`, so another checkpoint of the same shape does not recompile `step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from collectors.errors import ConfigError
from collectors.schema import FAULT_TYPES, METRIC_COLUMNS
from jaxsim import core, workload
from jaxsim.core import FAULT, METRIC, Layout
from research import model as dyn
from research.data import RunArrays, run_rows

MEMBER_SAMPLING = ("episode", "step")  # one ensemble member per episode, or a fresh one per step
_P50, _P95, _P99 = METRIC["latency_p50_s"], METRIC["latency_p95_s"], METRIC["latency_p99_s"]


@struct.dataclass
class EpisodeStarts:
    """N states of collected runs an episode can start from, with the model's cache of the L
    steps before each (N starts, L window, K members)."""

    window: dyn.StepInput  # rows (N, L, ...) of steps t0 - L .. t0 - 1 (drivers up to t0)
    cache: dyn.Cache  # keys/values (N, K, n_layers, L, H, D), pos (N, K)
    metrics: jax.Array  # (N, S, M) float32 physical metrics of step t0
    replicas: jax.Array  # (N, S) int32 desired at t0
    ready: jax.Array  # (N, S) int32 ready at t0
    faults: jax.Array  # (N, S, F) float32 active at t0
    trace_index: jax.Array  # (N,) int32 the run, a row of `ClusterParams.traces`
    trace_offset: jax.Array  # (N,) int32 t0, the column of that row


@struct.dataclass(kw_only=True)
class ClusterParams(environment.EnvParams):
    """Everything that varies per rollout (R runs, T trace steps)."""

    model: dict  # {"net": member params (K, ...), "norm": Normaliser} as research.model takes
    starts: EpisodeStarts
    traces: jax.Array  # (R, T) float32 entry request rate per step, rps
    faults: workload.FaultSpec = struct.field(default_factory=workload.FaultSpec)
    startup_steps: jax.Array | int = 3  # steps until a new replica is ready
    restart_steps: jax.Array | int = 5  # steps until a killed replica is ready again
    kill_prob_per_step: jax.Array | float = 0.3  # chance of a kill per step at pod_kill 1
    reward_weights: jax.Array = struct.field(
        default_factory=lambda: jnp.array([1.0, 1.0, 0.3, 0.05, 0.0])
    )  # (5,) w_slo, w_error, w_cost, w_churn, w_uncertainty
    slo_s: jax.Array | float = 0.3  # entry p95 latency target, seconds
    scale_low: jax.Array | float = 0.8  # workload scale range per episode
    scale_high: jax.Array | float = 1.25
    max_steps_in_episode: jax.Array | int = 200


@struct.dataclass
class ClusterState:
    """State of one environment (K members, P start-up pipeline slots, W observation window)."""

    metrics: jax.Array  # (S, M) float32 physical, latest step
    z: jax.Array  # (S, M) float32 the same, normalised (what the model is fed)
    replicas: jax.Array  # (S,) int32 desired
    ready: jax.Array  # (S,) int32
    pending: jax.Array  # (S, P) int32
    faults: jax.Array  # (S, F) float32 severity
    fault_steps_left: jax.Array  # (S, F) int32
    cache: dyn.Cache  # keys/values (K, n_layers, L, H, D), pos (K,)
    window: jax.Array  # (W, S, M) float32 normalised observations, newest last
    member: jax.Array  # () int32 ensemble member whose prediction is followed
    disagreement: jax.Array  # () float32 std over members of the entry p95 (normalised)
    entry_rate_rps: jax.Array  # () float32
    trace_index: jax.Array  # () int32
    trace_offset: jax.Array  # () int32
    trace_scale: jax.Array  # () float32
    time: jax.Array  # () int32


class ClusterEnv(environment.Environment[ClusterState, ClusterParams]):
    """The learned environment (gymnax `Environment`), stepping the dynamics model's cache.

    Static settings on the instance: the `Layout` (services S, entry, call graph, replica
    bounds, `max_delta`, `interval_s`), the model's `DynamicsConfig` (window L, K members, ...),
    `window_steps` W, `member_sampling` and `sample_noise`.

    - Observation: float32 (W * S * M + 2 * S,): the last W steps' metrics normalised with the
      model's normaliser (oldest first, services x metrics in `METRIC_COLUMNS` order), then
      desired and ready replicas divided by `max_replicas`; the same layout as `QueueingEnv`.
    - Action: int32 (S,), per service an index in [0, 2 * max_delta]; desired replicas change by
      index - max_delta, clipped to [min_replicas, max_replicas].
    - Reward: float32 (), -(w_slo * 1[entry p95 > slo_s] + w_error * entry error ratio
      + w_cost * total replicas / (S * max_replicas) + w_churn * sum |change| / S
      + w_uncertainty * disagreement), disagreement = std over the K members' means of the
      entry p95 in normalised units (penalises states where the model is unsure).
    - Termination: never; truncation at `params.max_steps_in_episode` (gymnax auto-resets).
    - State: `ClusterState`: metrics (S, M) float32 physical (for heuristics), z (S, M),
      replicas/ready (S,) int32, pending (S, P) int32, faults (S, F) float32,
      fault_steps_left (S, F) int32, the model cache, window (W, S, M), member, disagreement,
      entry_rate_rps, trace_index/offset/scale, time (int32).
    - Info: slo_violation, error_ratio (entry), replicas_total, latency_p95_s (entry),
      scaling_actions and uncertainty, each a scalar.

    Dynamics of one step: the action sets desired replicas; the control plane (not learned:
    a known rule) makes a new replica ready `startup_steps` steps after it is requested and a
    replica killed by `pod_kill` (probability `kill_prob_per_step` x severity per step) ready
    again after `restart_steps`; faults start and end by `params.faults`; the entry rate is the
    episode's trace x scale; the model is fed the current step with those drivers and predicts
    the next metrics. The followed member is drawn per episode (`member_sampling="episode"`) or
    per step (`"step"`); its mean is used, plus its predicted scale x N(0, 1) when
    `sample_noise` (then bounds are re-imposed: error ratio in [0, 1], throughput <= request
    rate, p50 <= p95 <= p99).

    Reset: a random episode start (a state of a collected run, with the cache of the L steps
    before it, computed once per parameter set in `make_params`), a random workload scale, a
    random member; faults active at the start keep running for `duration_low_steps`.
    """

    def __init__(
        self,
        cfg: dyn.DynamicsConfig,
        layout: Layout | None = None,
        window_steps: int = 4,
        member_sampling: str = "episode",
        sample_noise: bool = False,
    ):
        super().__init__()
        self.layout = layout or Layout()
        self.cfg = cfg
        self.window_steps = window_steps
        if member_sampling not in MEMBER_SAMPLING:
            raise ConfigError(f"member_sampling {member_sampling!r} not in {MEMBER_SAMPLING}")
        self.member_sampling = member_sampling
        self.sample_noise = sample_noise
        _check_config(cfg, self.layout)
        if not 1 <= window_steps <= cfg.window:
            raise ConfigError(f"window_steps={window_steps} outside [1, model window {cfg.window}]")

    @classmethod
    def from_bundle(cls, bundle, layout: Layout | None = None, **kwargs: Any) -> ClusterEnv:
        """An environment for a `research.checkpoint.ModelBundle`; raises `ConfigError` when the
        checkpoint's services, entry service or features differ from the layout's."""
        layout = layout or Layout()
        if list(bundle.services) != list(layout.services):
            raise ConfigError(
                f"checkpoint services {list(bundle.services)} do not match the environment's "
                f"{list(layout.services)}"
            )
        if bundle.entry_service != layout.entry_service:
            raise ConfigError(
                f"checkpoint entry service {bundle.entry_service!r} is not the environment's "
                f"{layout.entry_service!r}"
            )
        for key, expected in (("metrics", METRIC_COLUMNS), ("fault_types", FAULT_TYPES)):
            found = bundle.meta.get(key)
            if found is not None and list(found) != list(expected):
                raise ConfigError(f"checkpoint {key} {found} do not match {list(expected)}")
        return cls(bundle.cfg, layout, **kwargs)

    # The contract's static attributes.
    services = property(lambda self: self.layout.services)
    entry_service = property(lambda self: self.layout.entry_service)
    min_replicas = property(lambda self: self.layout.min_replicas)
    max_replicas = property(lambda self: self.layout.max_replicas)
    max_delta = property(lambda self: self.layout.max_delta)
    interval_s = property(lambda self: self.layout.interval_s)

    def make_params(
        self,
        model: dict,
        runs: Sequence[RunArrays],
        n_starts: int = 256,
        seed: int = 0,
        max_steps_in_episode: int = 200,
        **overrides: Any,
    ) -> ClusterParams:
        """Parameters for model parameters {"net", "norm"} and collected `runs`: traces from
        the runs' entry rates, `n_starts` episode starts with their caches, `overrides` for the
        other fields. Raises `ConfigError` when the runs do not fit (services, length)."""
        traces = _traces(runs, self.layout, self.cfg.window, max_steps_in_episode)
        starts = _episode_starts(
            model, self.cfg, runs, traces.shape[1], n_starts, max_steps_in_episode, seed
        )
        return ClusterParams(
            model=model,
            starts=starts,
            traces=jnp.asarray(traces),
            max_steps_in_episode=max_steps_in_episode,
            **overrides,
        )

    @property
    def default_params(self) -> ClusterParams:
        raise ConfigError("ClusterEnv has no default parameters: build them with make_params")

    def reset_env(self, key: jax.Array, params: ClusterParams):
        u = jax.random.uniform(key, (3,))
        starts = params.starts
        n_starts = starts.metrics.shape[0]
        i = jnp.minimum(jnp.floor(u[0] * n_starts), n_starts - 1).astype(jnp.int32)
        scale = params.scale_low + (params.scale_high - params.scale_low) * u[1]
        member = jnp.minimum(jnp.floor(u[2] * self.cfg.ensemble), self.cfg.ensemble - 1)

        metrics = starts.metrics[i]
        z = params.model["norm"].encode(metrics)
        past = starts.window.metrics[i, self.cfg.window - self.window_steps + 1 :]
        window = jnp.concatenate([past, z[None]], axis=0)
        faults = starts.faults[i]
        n_services = self.layout.n_services
        state = ClusterState(
            metrics=metrics,
            z=z,
            replicas=starts.replicas[i],
            ready=starts.ready[i],
            pending=jnp.zeros((n_services, self.layout.pipeline_slots), jnp.int32),
            faults=faults,
            fault_steps_left=jnp.where(faults > 0, params.faults.duration_low_steps, 0).astype(
                jnp.int32
            ),
            cache=jax.tree.map(lambda x: x[i], starts.cache),
            window=window,
            member=member.astype(jnp.int32),
            disagreement=jnp.zeros((), jnp.float32),
            entry_rate_rps=params.traces[starts.trace_index[i], starts.trace_offset[i]],
            trace_index=starts.trace_index[i],
            trace_offset=starts.trace_offset[i],
            trace_scale=scale.astype(jnp.float32),
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state, params), state

    def step_env(self, key: jax.Array, state: ClusterState, action: jax.Array, params):
        draw_key, noise_key = jax.random.split(key)
        u = jax.random.uniform(draw_key, (self.layout.n_services, workload.FAULT_DRAWS + 2))
        replicas = core.apply_action(self.layout, state.replicas, action)
        faults, steps_left = workload.step_faults(
            u[:, : workload.FAULT_DRAWS], state.faults, state.fault_steps_left, params.faults
        )
        ready, pending = core.reconcile(state.ready, state.pending, replicas, params.startup_steps)
        kill = u[:, workload.FAULT_DRAWS] < params.kill_prob_per_step * faults[:, FAULT["pod_kill"]]
        ready, pending = core.kill_replicas(ready, pending, kill, params.restart_steps)

        time = state.time + 1
        rate = workload.entry_rate(
            params.traces, state.trace_index, state.trace_offset, state.trace_scale, time
        )
        member = self._member(state.member, u[0, -1])
        metrics, z, disagreement, cache = self._predict(
            noise_key, state, replicas, ready, rate, faults, member, params
        )

        change = replicas - state.replicas
        state = state.replace(
            metrics=metrics,
            z=z,
            replicas=replicas,
            ready=ready,
            pending=pending,
            faults=faults,
            fault_steps_left=steps_left,
            cache=cache,
            window=core.push_window(state.window, z),
            member=member,
            disagreement=disagreement,
            entry_rate_rps=rate,
            time=time,
        )
        terms = core.reward_terms(self.layout, metrics, replicas, change, params.slo_s)
        weights = params.reward_weights
        reward = core.weighted_reward(terms, weights[:4]) - weights[4] * disagreement
        info = {**core.info_from_terms(terms), "uncertainty": disagreement}
        return self.get_obs(state, params), state, reward, self.is_terminated(state, params), info

    def _member(self, member: jax.Array, u: jax.Array) -> jax.Array:
        if self.member_sampling == "episode":
            return member
        k = self.cfg.ensemble
        return jnp.minimum(jnp.floor(u * k), k - 1).astype(jnp.int32)

    def _predict(self, key, state, replicas, ready, rate, faults, member, params):
        """Feed the current step with the next step's drivers to the model; returns the next
        metrics (S, M) physical and normalised, the members' disagreement and the new cache."""
        step = dyn.StepInput(
            metrics=state.z,
            mask=jnp.ones(state.z.shape, jnp.float32),
            replicas=jnp.stack([state.replicas, state.ready], axis=-1).astype(jnp.float32),
            action=replicas.astype(jnp.float32),
            entry_rate=rate,
            faults=faults,
        )
        mean, scale, cache = cached_step(params.model, self.cfg, state.cache, step)  # (K, S, M)
        disagreement = mean[:, self.layout.entry_index, _P95].std()
        z = mean[member]
        norm = params.model["norm"]
        if not self.sample_noise:
            return norm.decode(z), z, disagreement, cache
        z = z + scale[member] * jax.random.normal(key, z.shape)
        metrics = enforce_bounds(norm.decode(z))
        return metrics, norm.encode(metrics), disagreement, cache

    def get_obs(self, state: ClusterState, params=None, key=None) -> jax.Array:
        return core.observation(self.layout, state.window, state.replicas, state.ready)

    def is_terminated(self, state: ClusterState, params: ClusterParams) -> jax.Array:
        return jnp.zeros((), jnp.bool_)

    @property
    def num_actions(self) -> int:
        return 2 * self.layout.max_delta + 1

    def action_space(self, params: ClusterParams | None = None) -> core.MultiDiscrete:
        return core.action_space(self.layout)

    def observation_space(self, params: ClusterParams | None = None) -> spaces.Box:
        size = core.observation_size(self.layout, self.window_steps)
        return spaces.Box(-jnp.inf, jnp.inf, (size,), jnp.float32)


def cached_step(
    model: dict, cfg: dyn.DynamicsConfig, cache: dyn.Cache, step: dyn.StepInput
) -> tuple[jax.Array, jax.Array, dyn.Cache]:
    """`research.model.step_cached` for ONE environment, laid out for vmapping over many.

    cache: keys/values (K, n_layers, L, H, D), pos (K,); step: one `StepInput` without batch
    axis. Returns mean, scale (K, S, M) normalised and the new cache; equal to `step_cached`
    (tests/test_cluster_env.py checks it). The difference is memory traffic only: no batch axis
    of one to move around, no transposes of the cache, attention as broadcast-multiply and
    reductions over the cache in place instead of tiny batched matrix products.
    """
    fn = jax.vmap(_member_step, in_axes=(0, None, None, 0, 0, 0, None))
    mean, scale, keys, values, pos = fn(model["net"], model["norm"], cfg, *cache, step)
    return mean, scale, dyn.Cache(keys, values, pos)


def _member_step(p, norm, cfg, keys, values, pos, step):
    module = dyn.Member(cfg)
    tok = dyn.tokens(norm, cfg, step)[None, None]  # (1, 1, token_dim)
    e, k, v = module.apply({"params": p}, tok, pos[None, None], method=dyn.Member.keys_values)
    # Ring buffer: the new step overwrites slot pos % L (a scatter once vmapped, in place in a
    # scan's carry), the rest of the cache is only read.
    start = (0, pos % cfg.window, 0, 0)
    keys = jax.lax.dynamic_update_slice(keys, k[0], start)  # (n_layers, L, H, D)
    values = jax.lax.dynamic_update_slice(values, v[0], start)
    raw = module.apply({"params": p}, e[0, 0], pos, keys, values, method=_readout)
    mean, scale = dyn.bounded_output(norm, cfg, step.metrics, step.entry_rate, raw)
    return mean, scale, keys, values, pos + 1


def _readout(module: dyn.Member, x, pos, keys, values):
    """`Member.readout` for one query x (d,) at step pos over keys/values (n_layers, L, H, D)."""
    cfg = module.cfg
    scale = 1.0 / math.sqrt(cfg.head_dim)
    for layer in range(cfg.n_layers):
        q = module.q[layer](module.q_norm[layer](x))  # (H, D)
        q = dyn.rotate(cfg, q[None], pos[None])[0]
        logits = (q[None] * keys[layer]).sum(-1) * scale  # (L, H)
        attn = jax.nn.softmax(logits, axis=0)
        x = x + module.o[layer]((attn[..., None] * values[layer]).sum(0))
        hidden = jax.nn.relu(module.mlp_in[layer](module.mlp_norm[layer](x)))
        x = x + module.mlp_out[layer](hidden)
    return module.head(module.out_norm(x))


def enforce_bounds(metrics: jax.Array) -> jax.Array:
    """Physical bounds on metrics (..., S, M): error ratio in [0, 1], throughput <= request
    rate, p50 <= p95 <= p99, everything >= 0."""
    metrics = jnp.maximum(metrics, 0.0)
    rate = metrics[..., METRIC["request_rate_rps"]]
    metrics = metrics.at[..., METRIC["throughput_rps"]].min(rate)
    metrics = metrics.at[..., METRIC["error_ratio"]].min(1.0)
    p95 = jnp.maximum(metrics[..., _P95], metrics[..., _P50])
    p99 = jnp.maximum(metrics[..., _P99], p95)
    return metrics.at[..., _P95].set(p95).at[..., _P99].set(p99)


def _check_config(cfg: dyn.DynamicsConfig, layout: Layout) -> None:
    checks = (
        ("n_services", cfg.n_services, layout.n_services),
        ("n_metrics", cfg.n_metrics, len(METRIC_COLUMNS)),
        ("n_faults", cfg.n_faults, len(FAULT_TYPES)),
        ("entry_index", cfg.entry_index, layout.entry_index),
    )
    for name, found, expected in checks:
        if found != expected:
            raise ConfigError(
                f"model config {name}={found} does not match the environment's {expected} "
                f"(services {list(layout.services)}, metrics {len(METRIC_COLUMNS)}, "
                f"fault types {len(FAULT_TYPES)})"
            )


def _traces(runs: Sequence[RunArrays], layout: Layout, window: int, horizon: int) -> np.ndarray:
    """Entry rates of the runs (R, T), cut to the shortest run; checks services and length."""
    if not runs:
        raise ConfigError("ClusterEnv needs at least one collected run for its workload")
    for run in runs:
        if list(run.services) != list(layout.services):
            raise ConfigError(
                f"run {run.run_id}: services {list(run.services)} do not match the "
                f"environment's {list(layout.services)}"
            )
    length = min(run.n_steps for run in runs)
    traces = np.stack([run.entry_rate[:length] for run in runs]).astype(np.float32)
    workload.check_traces(traces, window + horizon, "ClusterEnv workload")
    return traces


def _episode_starts(model, cfg, runs, trace_steps, n_starts, horizon, seed) -> EpisodeStarts:
    """Random starts t0 in [L, T - horizon) of random runs, with the model cache of the L steps
    before each."""
    rng = np.random.default_rng(seed)
    run_index = rng.integers(0, len(runs), n_starts)
    t0 = rng.integers(cfg.window, trace_steps - horizon, n_starts)
    rows = [run_rows(run, model["norm"], horizon=0) for run in runs]
    window = dyn.StepInput(
        *(
            np.stack([field[r][t - cfg.window : t] for r, t in zip(run_index, t0, strict=True)])
            for field in zip(*rows, strict=True)
        )
    )
    window = jax.tree.map(jnp.asarray, window)
    cache = jax.jit(dyn.init_cache, static_argnums=1)(model, cfg, window)
    cache = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), cache)  # (N, K, ...)

    def at_t0(get):
        return np.stack([get(runs[r])[t] for r, t in zip(run_index, t0, strict=True)])

    return EpisodeStarts(
        window=window,
        cache=cache,
        metrics=jnp.asarray(at_t0(lambda run: run.metrics), jnp.float32),
        replicas=jnp.asarray(at_t0(lambda run: run.replicas[..., 0]).round(), jnp.int32),
        ready=jnp.asarray(at_t0(lambda run: run.replicas[..., 1]).round(), jnp.int32),
        faults=jnp.asarray(at_t0(lambda run: run.faults), jnp.float32),
        trace_index=jnp.asarray(run_index, jnp.int32),
        trace_offset=jnp.asarray(t0, jnp.int32),
    )
