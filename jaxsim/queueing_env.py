"""The reference queueing environment: the testbed application with known equations, in JAX.

It mirrors the testbed (same services, call graph, replica bounds, metric names, sample
interval) and `ClusterEnv`'s interface, so agents and heuristics can be checked against a ground
truth and its rollouts can be written as an ordinary dataset (`jaxsim.reference_data`).

Physics of one step (per service s, interval `interval_s`):

- arrivals: the entry gets the workload trace's rate; a callee gets its caller's arrivals times
  the edge's call multiplicity (calls are made for every request that reaches a service, also
  for those it later sheds, so arrivals depend on the workload only);
- capacity = ready replicas x `service_rate_rps` x (1 - `stress_capacity_loss` x cpu_stress);
  utilisation x = arrivals / capacity;
- own mean delay = `base_latency_s` x q(x), q = 1 / (1 - x) below the knee (0.95), then growing
  linearly with the overload and capped; quantiles from an exponential tail on top of half the
  base time, plus the `latency` and `network_delay` faults; a service's quantiles add its
  callees' quantiles (weighted by min(multiplicity, 1));
- errors: the overload fraction 1 - 1/x is shed, the `error` fault fails a further fraction, and
  callee errors propagate to callers; throughput = arrivals x (1 - error ratio);
- cpu cores from served load, idle cost and `cpu_stress`; memory from replicas plus the
  `memory_leak` fault's growth (cleared when the fault ends); network bytes from rates;
- control plane: a new replica is ready `startup_steps` steps after the decision; `pod_kill`
  kills a ready replica with probability `kill_prob_per_step` x severity per step, which
  restarts after `startup_steps + restart_backoff_steps`;
- observation noise: multiplicative, exp of a uniform of std `noise_std`, one factor per
  service for the rates and one for the latencies (so bounds and quantile order survive),
  deterministic under the step key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from collectors.errors import ConfigError
from jaxsim import core, workload
from jaxsim.core import FAULT, METRIC, N_FAULTS, N_METRICS, Layout
from research.normalise import Normaliser

# Typical magnitude per metric (METRIC_COLUMNS order): the units of the default observation
# encoding z = log1p(x / unit).
_TYPICAL = (50.0, 50.0, 0.01, 0.02, 0.06, 0.1, 0.5, 2e8, 4e4, 2e5)


def reference_normaliser(n_services: int = 4) -> Normaliser:
    """The default observation encoding of the reference environment: z = log1p(x / typical)."""
    unit = jnp.broadcast_to(jnp.asarray(_TYPICAL, jnp.float32), (n_services, N_METRICS))
    identity = Normaliser.identity(n_services)
    return identity.replace(unit=unit, delta_unit=jnp.full((n_services, 2), 0.02, jnp.float32))


@struct.dataclass
class Physics:
    """Parameters of the queueing equations; S = 4 services, E = 3 call graph edges."""

    service_rate_rps: jax.Array = struct.field(
        default_factory=lambda: jnp.array([30.0, 45.0, 25.0, 35.0])
    )  # (S,) requests per second one replica serves
    base_latency_s: jax.Array = struct.field(
        default_factory=lambda: jnp.array([0.010, 0.015, 0.020, 0.030])
    )  # (S,) mean service time at zero load
    call_multiplicity: jax.Array = struct.field(
        default_factory=lambda: jnp.array([1.0, 0.3, 1.0])
    )  # (E,) calls per request along each call graph edge
    startup_steps: jax.Array | int = 3  # steps until a new replica is ready
    restart_backoff_steps: jax.Array | int = 2  # extra steps before a killed replica is back
    kill_prob_per_step: jax.Array | float = 0.3  # chance of a kill per step at pod_kill severity 1
    overload_slope: jax.Array | float = 60.0  # growth of the delay factor past the knee
    max_delay_factor: jax.Array | float = 200.0  # cap of the delay factor (a timeout)
    stress_capacity_loss: jax.Array | float = 0.6  # capacity lost at cpu_stress severity 1
    stress_cores: jax.Array | float = 0.5  # cores burnt per replica at cpu_stress severity 1
    fault_latency_s: jax.Array | float = 0.3  # added delay at `latency` severity 1
    network_delay_s: jax.Array | float = 0.1  # added delay at `network_delay` severity 1
    fault_error_ratio: jax.Array | float = 0.5  # failed fraction at `error` severity 1
    busy_cores: jax.Array | float = 0.8  # cores of one fully busy replica
    idle_cores: jax.Array | float = 0.02  # cores of one idle replica
    memory_per_replica_bytes: jax.Array | float = 6.0e7
    leak_bytes_per_step: jax.Array | float = 1.0e7  # per replica at `memory_leak` severity 1
    request_bytes: jax.Array | float = 800.0
    response_bytes: jax.Array | float = 4000.0
    noise_std: jax.Array | float = 0.03  # log-normal observation noise


@struct.dataclass
class QueueingParams(environment.EnvParams):
    """Everything that varies per rollout; a frozen pytree passed to `step` and `reset`."""

    traces: jax.Array = struct.field(
        default_factory=lambda: jnp.asarray(workload.synthetic_traces(0, 8, 2048))
    )  # (N, T) entry request rate per step, rps
    physics: Physics = struct.field(default_factory=Physics)
    faults: workload.FaultSpec = struct.field(default_factory=workload.FaultSpec)
    reward_weights: jax.Array = struct.field(
        default_factory=lambda: jnp.array([1.0, 1.0, 0.3, 0.05])
    )  # (4,) w_slo, w_error, w_cost, w_churn
    slo_s: jax.Array | float = 0.3  # entry p95 latency target, seconds
    scale_low: jax.Array | float = 0.6  # workload scale range per episode
    scale_high: jax.Array | float = 1.4
    initial_replicas: jax.Array = struct.field(
        default_factory=lambda: jnp.full((4,), 2, jnp.int32)
    )  # (S,) desired = ready replicas at reset
    normaliser: Normaliser = struct.field(
        default_factory=reference_normaliser
    )  # observation encoding; set it to a model's normaliser to compare with ClusterEnv
    max_steps_in_episode: jax.Array | int = 200


@struct.dataclass
class QueueingState:
    """State of one environment."""

    metrics: jax.Array  # (S, M) float32, physical units, latest sample
    replicas: jax.Array  # (S,) int32, desired
    ready: jax.Array  # (S,) int32
    pending: jax.Array  # (S, P) int32, slot j ready after j + 1 more steps
    faults: jax.Array  # (S, F) float32 severity, 0 = inactive
    fault_steps_left: jax.Array  # (S, F) int32
    leak_bytes: jax.Array  # (S,) float32, memory grown by an active leak
    window: jax.Array  # (W, S, M) float32, encoded observations, newest last
    entry_rate_rps: jax.Array  # () float32
    trace_index: jax.Array  # () int32
    trace_offset: jax.Array  # () int32
    trace_scale: jax.Array  # () float32
    time: jax.Array  # () int32


def visit_ratios(layout: Layout, multiplicity: jax.Array) -> jax.Array:
    """Requests reaching each service per entry request, (S,)."""
    visits = [jnp.zeros(())] * layout.n_services
    visits[layout.entry_index] = jnp.ones(())
    for e, (caller, callee) in sorted(enumerate(layout.edges), key=lambda item: item[1][0]):
        visits[callee] = visits[callee] + visits[caller] * multiplicity[e]
    return jnp.stack(visits)


def _delay_factor(x: jax.Array, physics: Physics) -> jax.Array:
    knee = 0.95
    below = 1.0 / (1.0 - jnp.minimum(x, knee))
    over = physics.overload_slope * jnp.maximum(x - knee, 0.0)
    return jnp.minimum(below + over, physics.max_delay_factor)


def _through_graph(layout: Layout, own: jax.Array, combine) -> jax.Array:
    """Fold callee values into callers, callees first. own (S, ...); combine(acc, child, e)."""
    values = [own[s] for s in range(layout.n_services)]
    for e, (caller, callee) in sorted(enumerate(layout.edges), key=lambda item: -item[1][0]):
        values[caller] = combine(values[caller], values[callee], e)
    return jnp.stack(values)


def service_metrics(
    layout: Layout,
    physics: Physics,
    entry_rate_rps: jax.Array,
    ready: jax.Array,
    faults: jax.Array,
    leak_bytes: jax.Array,
) -> jax.Array:
    """Noise-free metrics (S, M) in physical units for one step (see the module docstring)."""
    stress = faults[:, FAULT["cpu_stress"]]
    arrivals = entry_rate_rps * visit_ratios(layout, physics.call_multiplicity)
    ready_f = ready.astype(jnp.float32)
    capacity = jnp.maximum(
        ready_f * physics.service_rate_rps * (1.0 - physics.stress_capacity_loss * stress), 1e-3
    )
    x = arrivals / capacity
    served = jnp.minimum(arrivals, capacity)

    weight = jnp.minimum(physics.call_multiplicity, 1.0)
    tail = jnp.array([np.log(2.0), np.log(20.0), np.log(100.0)])  # p50, p95, p99
    fault_delay = (
        physics.fault_latency_s * faults[:, FAULT["latency"]]
        + physics.network_delay_s * faults[:, FAULT["network_delay"]]
    )
    own_latency = (
        physics.base_latency_s[:, None] * (0.5 + _delay_factor(x, physics)[:, None] * tail)
        + fault_delay[:, None]
    )  # (S, 3)
    latency = _through_graph(layout, own_latency, lambda acc, c, e: acc + weight[e] * c)

    shed = jnp.maximum(1.0 - 1.0 / jnp.maximum(x, 1e-6), 0.0)
    fault_err = jnp.minimum(physics.fault_error_ratio * faults[:, FAULT["error"]], 1.0)
    own_error = shed + (1.0 - shed) * fault_err
    error = _through_graph(
        layout, own_error, lambda acc, c, e: 1.0 - (1.0 - acc) * (1.0 - weight[e] * c)
    )
    throughput = arrivals * (1.0 - error)

    cpu = served / physics.service_rate_rps * physics.busy_cores + ready_f * (
        physics.idle_cores + physics.stress_cores * stress
    )
    memory = ready_f * physics.memory_per_replica_bytes + leak_bytes
    columns = {
        "request_rate_rps": arrivals,
        "throughput_rps": throughput,
        "error_ratio": error,
        "latency_p50_s": latency[:, 0],
        "latency_p95_s": latency[:, 1],
        "latency_p99_s": latency[:, 2],
        "cpu_cores": cpu,
        "memory_bytes": memory,
        "net_rx_bytes_per_s": arrivals * physics.request_bytes,
        "net_tx_bytes_per_s": throughput * physics.response_bytes,
    }
    return jnp.stack([columns[name] for name in METRIC], axis=1).astype(jnp.float32)


_RATE_METRICS = ("request_rate_rps", "throughput_rps", "net_rx_bytes_per_s", "net_tx_bytes_per_s")
_LATENCY_METRICS = ("latency_p50_s", "latency_p95_s", "latency_p99_s")


# Metrics sharing one noise factor per service: rates (so throughput <= request rate holds),
# latencies (so p50 <= p95 <= p99 holds), cpu, memory; the error ratio has its own.
_NOISE_GROUPS = (
    _RATE_METRICS,
    _LATENCY_METRICS,
    ("cpu_cores",),
    ("memory_bytes",),
    ("error_ratio",),
)
NOISE_DRAWS = len(_NOISE_GROUPS)  # uniform draws per service and step that `add_noise` uses
_NOISE_GROUP_OF = np.array(
    [next(g for g, names in enumerate(_NOISE_GROUPS) if m in names) for m in METRIC]
)


def add_noise(uniforms: jax.Array, metrics: jax.Array, noise_std) -> jax.Array:
    """Multiplicative noise exp(noise_std * e), e uniform with unit variance, from `uniforms`
    (S, NOISE_DRAWS) in [0, 1), one factor per service and group of metrics (`_NOISE_GROUPS`);
    the error ratio stays in [0, 1]."""
    draws = jnp.exp(noise_std * np.sqrt(3.0) * (2.0 * uniforms - 1.0))
    noisy = metrics * draws[:, _NOISE_GROUP_OF]
    error = jnp.clip(noisy[:, METRIC["error_ratio"]], 0.0, 1.0)
    return noisy.at[:, METRIC["error_ratio"]].set(error)


class QueueingEnv(environment.Environment[QueueingState, QueueingParams]):
    """The reference environment with known queueing dynamics (gymnax `Environment`).

    Static settings on the instance: the `Layout` (services S, entry service, call graph,
    replica bounds, `max_delta`, `interval_s`) and `window_steps` W.

    - Observation: float32 (W * S * M + 2 * S,): the last W samples of the metrics, each
      encoded by `params.normaliser` (oldest first, services x metrics in
      `METRIC_COLUMNS` order), then desired and ready replicas divided by `max_replicas`.
    - Action: int32 (S,), per service an index in [0, 2 * max_delta]; the desired replicas
      change by index - max_delta, clipped to [min_replicas, max_replicas].
    - Reward: float32 (), -(w_slo * 1[entry p95 > slo_s] + w_error * entry error ratio
      + w_cost * total replicas / (S * max_replicas) + w_churn * sum |change| / S).
    - Termination: never (no natural terminal state); truncation when `time` reaches
      `params.max_steps_in_episode`, after which gymnax's `step` resets automatically.
    - State: `QueueingState`: metrics (S, M) float32 physical, replicas/ready (S,) int32,
      pending (S, P) int32, faults (S, F) float32, fault_steps_left (S, F) int32, leak_bytes
      (S,) float32, window (W, S, M) float32, entry_rate_rps, trace_index/offset/scale, time.
    - Info: slo_violation, error_ratio (entry), replicas_total, latency_p95_s (entry),
      scaling_actions (sum of |replica change|), each a scalar.
    """

    def __init__(self, layout: Layout | None = None, window_steps: int = 4):
        super().__init__()
        self.layout = layout or Layout()
        if self.layout.n_services != 4 or len(self.layout.edges) != 3:
            raise ConfigError(
                "QueueingEnv's default physics is for 4 services and 3 edges; pass a Physics "
                "of matching shapes for another layout"
            )
        self.window_steps = window_steps

    # The contract's static attributes.
    services = property(lambda self: self.layout.services)
    entry_service = property(lambda self: self.layout.entry_service)
    min_replicas = property(lambda self: self.layout.min_replicas)
    max_replicas = property(lambda self: self.layout.max_replicas)
    max_delta = property(lambda self: self.layout.max_delta)
    interval_s = property(lambda self: self.layout.interval_s)

    @property
    def default_params(self) -> QueueingParams:
        return QueueingParams()

    def make_params(self, **overrides: Any) -> QueueingParams:
        """Default parameters with `overrides`, checked against the static settings."""
        params = QueueingParams(**overrides)
        self.check_params(params)
        return params

    def check_params(self, params: QueueingParams) -> None:
        """Raise `ConfigError` when `params` do not fit this environment."""
        workload.check_traces(params.traces, int(params.max_steps_in_episode), "QueueingEnv")
        delay = int(params.physics.startup_steps) + int(params.physics.restart_backoff_steps)
        if delay > self.layout.pipeline_slots:
            raise ConfigError(
                f"startup_steps + restart_backoff_steps = {delay} exceeds the layout's "
                f"pipeline_slots = {self.layout.pipeline_slots}"
            )
        if tuple(params.initial_replicas.shape) != (self.layout.n_services,):
            raise ConfigError(f"initial_replicas must have shape ({self.layout.n_services},)")

    def reset_env(self, key: jax.Array, params: QueueingParams):
        n_services = self.layout.n_services
        uniforms = jax.random.uniform(key, (n_services * NOISE_DRAWS + 3,))
        index, offset, scale = workload.sample_episode(
            uniforms[-3:],
            params.traces.shape[0],
            params.traces.shape[1],
            params.max_steps_in_episode,
            params.scale_low,
            params.scale_high,
        )
        replicas = jnp.clip(
            params.initial_replicas, self.layout.min_replicas, self.layout.max_replicas
        ).astype(jnp.int32)
        faults = jnp.zeros((n_services, N_FAULTS), jnp.float32)
        leak = jnp.zeros((n_services,), jnp.float32)
        rate = workload.entry_rate(params.traces, index, offset, scale, 0)
        clean = service_metrics(self.layout, params.physics, rate, replicas, faults, leak)
        noise = uniforms[:-3].reshape(n_services, NOISE_DRAWS)
        metrics = add_noise(noise, clean, params.physics.noise_std)
        window = jnp.broadcast_to(
            params.normaliser.encode(metrics), (self.window_steps, *metrics.shape)
        )
        state = QueueingState(
            metrics=metrics,
            replicas=replicas,
            ready=replicas,
            pending=jnp.zeros((n_services, self.layout.pipeline_slots), jnp.int32),
            faults=faults,
            fault_steps_left=jnp.zeros((n_services, N_FAULTS), jnp.int32),
            leak_bytes=leak,
            window=window,
            entry_rate_rps=rate,
            trace_index=index,
            trace_offset=offset,
            trace_scale=scale,
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state, params), state

    def step_env(self, key: jax.Array, state: QueueingState, action: jax.Array, params):
        physics = params.physics
        n_draws = workload.FAULT_DRAWS
        uniforms = jax.random.uniform(key, (self.layout.n_services, n_draws + 1 + NOISE_DRAWS))
        replicas = core.apply_action(self.layout, state.replicas, action)
        change = replicas - state.replicas

        faults, steps_left = workload.step_faults(
            uniforms[:, :n_draws],
            state.faults,
            state.fault_steps_left,
            params.faults,
        )
        ready, pending = core.reconcile(state.ready, state.pending, replicas, physics.startup_steps)
        kill = uniforms[:, n_draws] < physics.kill_prob_per_step * faults[:, FAULT["pod_kill"]]
        restart = physics.startup_steps + physics.restart_backoff_steps
        ready, pending = core.kill_replicas(ready, pending, kill, restart)
        leak = faults[:, FAULT["memory_leak"]]
        leak_bytes = jnp.where(
            leak > 0, state.leak_bytes + leak * physics.leak_bytes_per_step * ready, 0.0
        )

        time = state.time + 1
        rate = workload.entry_rate(
            params.traces, state.trace_index, state.trace_offset, state.trace_scale, time
        )
        clean = service_metrics(self.layout, physics, rate, ready, faults, leak_bytes)
        metrics = add_noise(uniforms[:, n_draws + 1 :], clean, physics.noise_std)

        state = state.replace(
            metrics=metrics,
            replicas=replicas,
            ready=ready,
            pending=pending,
            faults=faults,
            fault_steps_left=steps_left,
            leak_bytes=leak_bytes.astype(jnp.float32),
            window=core.push_window(state.window, params.normaliser.encode(metrics)),
            entry_rate_rps=rate,
            time=time,
        )
        terms = core.reward_terms(self.layout, metrics, replicas, change, params.slo_s)
        reward = core.weighted_reward(terms, params.reward_weights)
        terminated = self.is_terminated(state, params)
        return self.get_obs(state, params), state, reward, terminated, core.info_from_terms(terms)

    def get_obs(self, state: QueueingState, params=None, key=None) -> jax.Array:
        return core.observation(self.layout, state.window, state.replicas, state.ready)

    def is_terminated(self, state: QueueingState, params: QueueingParams) -> jax.Array:
        return jnp.zeros((), jnp.bool_)

    @property
    def num_actions(self) -> int:
        return 2 * self.layout.max_delta + 1

    def action_space(self, params: QueueingParams | None = None) -> core.MultiDiscrete:
        return core.action_space(self.layout)

    def observation_space(self, params: QueueingParams | None = None) -> spaces.Box:
        size = core.observation_size(self.layout, self.window_steps)
        return spaces.Box(-jnp.inf, jnp.inf, (size,), jnp.float32)
