"""Pieces shared by both environments: the application's layout, the action space, the replica
control plane (start-up delay, pod kills), the reward and the observation window.

Axis names: S services, M metrics (`collectors.schema.METRIC_COLUMNS` order), F fault types
(`collectors.schema.FAULT_TYPES` order), P slots of the start-up pipeline, W observation window.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from gymnax.environments import spaces

from collectors.errors import ConfigError
from collectors.schema import FAULT_TYPES, METRIC_COLUMNS

SERVICES: tuple[str, ...] = ("frontend", "catalog", "checkout", "payment")
ENTRY_SERVICE = "frontend"
CALL_GRAPH: tuple[tuple[str, str], ...] = (
    ("frontend", "catalog"),
    ("frontend", "checkout"),
    ("checkout", "payment"),
)
N_METRICS = len(METRIC_COLUMNS)
N_FAULTS = len(FAULT_TYPES)
METRIC = {name: i for i, name in enumerate(METRIC_COLUMNS)}
FAULT = {name: i for i, name in enumerate(FAULT_TYPES)}


@dataclass(frozen=True)
class Layout:
    """The static shape of the application: services (entry first), call graph, replica bounds.

    Hashable, so it can sit on an environment instance that is a static jit argument.
    """

    services: tuple[str, ...] = SERVICES
    entry_service: str = ENTRY_SERVICE
    call_graph: tuple[tuple[str, str], ...] = CALL_GRAPH
    min_replicas: int = 1
    max_replicas: int = 6
    max_delta: int = 1
    interval_s: float = 2.0
    pipeline_slots: int = 8  # P: longest start-up or restart delay, in steps

    def __post_init__(self) -> None:
        if self.entry_service not in self.services:
            raise ConfigError(f"entry_service {self.entry_service!r} not in {self.services}")
        for source, target in self.call_graph:
            if source not in self.services or target not in self.services:
                raise ConfigError(f"call_graph edge {source}->{target} names an unknown service")
            if self.services.index(source) >= self.services.index(target):
                raise ConfigError(
                    f"call_graph edge {source}->{target}: services must be listed callers first"
                )
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"replica bounds [{self.min_replicas}, {self.max_replicas}] invalid")
        if self.max_delta < 1:
            raise ConfigError(f"max_delta must be >= 1, got {self.max_delta}")

    @property
    def n_services(self) -> int:
        return len(self.services)

    @property
    def entry_index(self) -> int:
        return self.services.index(self.entry_service)

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """Call graph edges as (caller, callee) service indices."""
        return tuple((self.services.index(a), self.services.index(b)) for a, b in self.call_graph)


class MultiDiscrete(spaces.Space):
    """One discrete choice in [0, n) per service; gymnax 1.0.1 has no such space of its own.

    Attributes: `n` choices per entry, `nvec` (S,) the same for every entry, `shape` (S,),
    `dtype` int32.
    """

    def __init__(self, n_entries: int, n: int):
        self.n = n
        self.nvec = (n,) * n_entries
        self.shape = (n_entries,)
        self.dtype = jnp.int32

    def __repr__(self) -> str:
        return f"MultiDiscrete({self.shape[0]} x {self.n})"

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, self.shape, 0, self.n, dtype=self.dtype)

    def contains(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.all((x >= 0) & (x < self.n)) & (x.shape == self.shape)


def action_space(layout: Layout) -> MultiDiscrete:
    """Per service an index in [0, 2 * max_delta]; the replica change is index - max_delta."""
    return MultiDiscrete(layout.n_services, 2 * layout.max_delta + 1)


def apply_action(layout: Layout, replicas: jax.Array, action: jax.Array) -> jax.Array:
    """New desired replicas (S,) int32 after the action (S,) int, clipped to the bounds."""
    delta = jnp.clip(jnp.asarray(action, jnp.int32), 0, 2 * layout.max_delta) - layout.max_delta
    return jnp.clip(replicas + delta, layout.min_replicas, layout.max_replicas).astype(jnp.int32)


def target_to_action(env, state, target: jax.Array) -> jax.Array:
    """The action index (S,) int32 that moves `state.replicas` towards `target` (S,) replicas as
    far as `env.max_delta` allows."""
    delta = jnp.clip(jnp.asarray(target, jnp.int32) - state.replicas, -env.max_delta, env.max_delta)
    return (delta + env.max_delta).astype(jnp.int32)


def reconcile(
    ready: jax.Array, pending: jax.Array, desired: jax.Array, startup_steps: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The control plane's step: pending replicas advance one slot (slot 0 becomes ready), then
    ready + pending is brought to `desired`.

    ready (S,) int32, pending (S, P) int32 where slot j becomes ready after j + 1 more steps.
    A replica added now goes into slot `startup_steps - 1`, so it is ready `startup_steps` steps
    after the decision. Removal takes the newest pending replicas first, then ready ones.
    """
    ready = ready + pending[:, 0]
    pending = jnp.concatenate([pending[:, 1:], jnp.zeros_like(pending[:, :1])], axis=1)

    total = ready + pending.sum(axis=1)
    added = jnp.maximum(desired - total, 0)
    slot = jnp.clip(startup_steps - 1, 0, pending.shape[1] - 1)
    pending = pending.at[:, slot].add(added)

    excess = jnp.maximum(total - desired, 0)
    newest_first = jnp.cumsum(pending[:, ::-1], axis=1)
    taken_cum = jnp.minimum(newest_first, excess[:, None])
    taken = jnp.diff(taken_cum, axis=1, prepend=jnp.zeros_like(taken_cum[:, :1]))
    pending = pending - taken[:, ::-1]
    ready = ready - (excess - taken_cum[:, -1])
    return ready.astype(jnp.int32), pending.astype(jnp.int32)


def kill_replicas(
    ready: jax.Array, pending: jax.Array, kill: jax.Array, restart_steps: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Kill one ready replica of each service where `kill` (S,) bool; it restarts (becomes ready
    again) after `restart_steps` steps, like a pod recreated by its ReplicaSet."""
    killed = (kill & (ready > 0)).astype(jnp.int32)
    slot = jnp.clip(restart_steps - 1, 0, pending.shape[1] - 1)
    return ready - killed, pending.at[:, slot].add(killed)


def reward_terms(
    layout: Layout,
    metrics: jax.Array,
    replicas: jax.Array,
    change: jax.Array,
    slo_s: jax.Array,
) -> dict[str, jax.Array]:
    """The reward's terms (before weights) and the info entries the contract names.

    metrics (S, M) physical, replicas (S,) desired, change (S,) int32 actual replica change.
    """
    entry = metrics[layout.entry_index]
    latency_p95_s = entry[METRIC["latency_p95_s"]]
    n_services = layout.n_services
    return {
        "slo_violation": (latency_p95_s > slo_s).astype(jnp.float32),
        "error_ratio": entry[METRIC["error_ratio"]],
        "cost": replicas.sum() / (n_services * layout.max_replicas),
        "churn": jnp.abs(change).sum() / n_services,
        "replicas_total": replicas.sum(),
        "latency_p95_s": latency_p95_s,
        "scaling_actions": jnp.abs(change).sum(),
    }


def weighted_reward(terms: dict[str, jax.Array], weights: jax.Array) -> jax.Array:
    """-(w_slo * slo + w_error * error + w_cost * cost + w_churn * churn), weights (4,)."""
    parts = jnp.stack([terms["slo_violation"], terms["error_ratio"], terms["cost"], terms["churn"]])
    return -(weights * parts).sum()


def info_from_terms(terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The `info` dict of a step: the contract's entries."""
    keys = ("slo_violation", "error_ratio", "replicas_total", "latency_p95_s", "scaling_actions")
    return {k: terms[k] for k in keys}


def push_window(window: jax.Array, z: jax.Array) -> jax.Array:
    """Slide the observation window (W, S, M) by one step, `z` (S, M) becoming the newest."""
    return jnp.concatenate([window[1:], z[None]], axis=0)


def observation(layout: Layout, window: jax.Array, replicas: jax.Array, ready: jax.Array):
    """The flat observation: window (W, S, M) normalised, then replicas and ready replicas (S,)
    each divided by max_replicas. Shape (W * S * M + 2 * S,) float32."""
    scale = 1.0 / layout.max_replicas
    return jnp.concatenate(
        [
            window.reshape(-1),
            replicas.astype(jnp.float32) * scale,
            ready.astype(jnp.float32) * scale,
        ]
    ).astype(jnp.float32)


def observation_size(layout: Layout, window_steps: int) -> int:
    return window_steps * layout.n_services * N_METRICS + 2 * layout.n_services
