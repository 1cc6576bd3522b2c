"""Actor-critic networks for per-service discrete scaling actions.

The action is factorised over services: one categorical head per service over the
`n_actions` delta indices, so the joint log-probability is the sum over services.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.orthogonal(scale),
        bias_init=nn.initializers.zeros,
    )


class ActorCritic(nn.Module):
    """Separate MLP torsos for the policy and the value.

    Input: observations (B, ...) flattened to (B, D). Output: logits (B, S, A) and values (B,).
    """

    n_services: int
    n_actions: int
    hidden_sizes: Sequence[int] = (64, 64)

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = obs.reshape(obs.shape[0], -1).astype(jnp.float32)

        actor = x
        for width in self.hidden_sizes:
            actor = jnp.tanh(_dense(width, np.sqrt(2.0))(actor))
        logits = _dense(self.n_services * self.n_actions, 0.01)(actor)
        logits = logits.reshape(x.shape[0], self.n_services, self.n_actions)

        critic = x
        for width in self.hidden_sizes:
            critic = jnp.tanh(_dense(width, np.sqrt(2.0))(critic))
        values = _dense(1, 1.0)(critic)[:, 0]
        return logits, values


def log_prob(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """Joint log-probability (B,) of per-service actions (B, S) under logits (B, S, A)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_p, actions[..., None], axis=-1)[..., 0]
    return chosen.sum(axis=-1)


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy (B,) of the factorised distribution, the sum of per-service entropies."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(log_p) * log_p).sum(axis=(-2, -1))


def sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-service actions (B, S) int32 sampled from logits (B, S, A)."""
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
