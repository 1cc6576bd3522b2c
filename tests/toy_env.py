"""A tiny scaling environment with a known optimum, for the agent and evaluation tests.

Each of S services sees a demand (in replicas) that follows a sine wave with a random phase
per episode, changing by at most one replica per step. The best policy keeps replicas equal to
demand; its return is close to zero, a random policy's is far below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

from collectors.schema import METRIC_COLUMNS

CPU = METRIC_COLUMNS.index("cpu_cores")
LATENCY_P95 = METRIC_COLUMNS.index("latency_p95_s")
CPU_REQUEST_CORES = 0.25


@struct.dataclass
class ToyState(environment.EnvState):
    phase: jax.Array  # (S,) float32
    replicas: jax.Array  # (S,) int32
    ready: jax.Array  # (S,) int32
    metrics: jax.Array  # (S, M) float32, physical units
    faults: jax.Array  # (S, F) float32, always zero here
    time: int


@struct.dataclass
class ToyParams(environment.EnvParams):
    max_steps_in_episode: int = 32
    period_steps: float = 16.0
    slo_s: float = 0.5


class ToyScalingEnv(environment.Environment):
    """Observation (3 S,) float32: replicas, demand now and next, each / max. Action (S,) int32."""

    services = ("a", "b")
    entry_service = "a"
    min_replicas = 1
    max_replicas = 6
    max_delta = 1
    interval_s = 2.0
    episode_steps = 32

    @property
    def default_params(self) -> ToyParams:
        return ToyParams()

    def demand(self, phase, time, params):
        wave = jnp.sin(2 * jnp.pi * (time + phase) / params.period_steps)
        return jnp.round(3.5 + 2.5 * wave).astype(jnp.int32)

    def _metrics(self, demand, replicas):
        # cpu at 50 % of the request per demanded replica: an HPA at target 0.5 tracks demand.
        cpu = demand.astype(jnp.float32) * 0.5 * CPU_REQUEST_CORES
        latency = 0.1 + 0.5 * jnp.maximum(demand - replicas, 0).astype(jnp.float32)
        metrics = jnp.zeros((len(self.services), len(METRIC_COLUMNS)), jnp.float32)
        return metrics.at[:, CPU].set(cpu).at[:, LATENCY_P95].set(latency)

    def get_obs(self, state, params=None, key=None):
        now = self.demand(state.phase, state.time, params)
        nxt = self.demand(state.phase, state.time + 1, params)
        parts = (state.replicas, now, nxt)
        return jnp.concatenate([p.astype(jnp.float32) / self.max_replicas for p in parts])

    def reset_env(self, key, params):
        phase_key, replica_key = jax.random.split(key)
        n = len(self.services)
        phase = jax.random.uniform(phase_key, (n,), maxval=params.period_steps)
        replicas = jax.random.randint(replica_key, (n,), 1, self.max_replicas + 1, jnp.int32)
        demand = self.demand(phase, 0, params)
        state = ToyState(
            time=0,
            phase=phase,
            replicas=replicas,
            ready=replicas,
            metrics=self._metrics(demand, replicas),
            faults=jnp.zeros((n, 6), jnp.float32),
        )
        return self.get_obs(state, params), state

    def step_env(self, key, state, action, params):
        delta = action.astype(jnp.int32) - self.max_delta
        replicas = jnp.clip(state.replicas + delta, self.min_replicas, self.max_replicas)
        time = state.time + 1
        demand = self.demand(state.phase, time, params)
        metrics = self._metrics(demand, replicas)
        gap = jnp.abs(replicas - demand).astype(jnp.float32)
        reward = -gap.mean() / 5.0
        state = state.replace(time=time, replicas=replicas, ready=replicas, metrics=metrics)
        latency = metrics[0, LATENCY_P95]
        info = {
            "slo_violation": (latency > params.slo_s).astype(jnp.float32),
            "error_ratio": jnp.zeros((), jnp.float32),
            "replicas_total": replicas.sum().astype(jnp.float32),
            "latency_p95_s": latency,
            "scaling_actions": (delta != 0).sum().astype(jnp.float32),
        }
        return self.get_obs(state, params), state, reward, jnp.array(False), info

    def is_terminated(self, state, params):
        return jnp.array(False)

    def action_space(self, params=None):
        return spaces.Box(0, 2 * self.max_delta, (len(self.services),), jnp.int32)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (3 * len(self.services),), jnp.float32)
