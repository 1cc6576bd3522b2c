"""The dynamics model: an ensemble of attention models over time predicting the next step.

A token is one time step: every service's normalised metrics and masks, the replica counts, and
the drivers of the *following* step (the action, i.e. the desired replicas, the exogenous entry
request rate and the fault severities). So the output read at token t is a distribution over the
metrics of step t + 1.

Architecture of one member (all K members share this definition and are vmapped):

    e_t = Dense(token_t)                                 # token embedding, (d_model,)
    k_t^l, v_t^l = Dense_l(RMSNorm(e_t)), rotary(t)      # keys/values of layer l: token-local
    x = e_t (newest token)                               # one query stream per output position
    for l in layers:  x += Attn_l(RMSNorm(x), k^l, v^l over the last L tokens)
                      x += MLP_l(RMSNorm(x))             # ReLU
    r, s = Dense(RMSNorm(x))                             # raw residual and scale per (S, M)

Keys and values depend on their own token only, never on other tokens, and carry rotary
position phases computed from the absolute step index modulo `rope_period` in integer
arithmetic. A key cached when its step arrived therefore stays valid while the window slides:
`step_cached` computes only the newest token's keys/values, writes them into a ring buffer of L
slots and runs the query stream once, and equals `predict` on the slid window.

Output layer (bounds by construction, in physical space, then encoded): every metric is the last
value moved by a bounded residual: non-negative quantities through a sharp softplus in the
normaliser's log space, `error_ratio` through a sigmoid, `throughput_rps` as the predicted
request rate times a sigmoid, p95 = p50 + a non-negative spread and p99 = p95 + another. The
entry service's `request_rate_rps` is tied to the exogenous entry rate of the next step (it is
that rate by definition), so it is not learned and is left out of the loss. Replica counts are
inputs only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from collectors.errors import ConfigError
from collectors.schema import FAULT_TYPES, METRIC_COLUMNS
from research.normalise import Normaliser

RR, TP, ER, P50, P95, P99 = (
    METRIC_COLUMNS.index(name)
    for name in (
        "request_rate_rps",
        "throughput_rps",
        "error_ratio",
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
    )
)
_LO, _HI = np.array([P50, P95]), np.array([P95, P99])  # spreads p95 - p50, p99 - p95
Z90 = 1.6448536  # standard normal quantile of 0.95: the half-width of a central 90% interval


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """Static shape and architecture of the dynamics model.

    n_services: S. n_metrics: M, must equal len(METRIC_COLUMNS). n_faults: F = len(FAULT_TYPES).
    window: L, steps of context. d_model, n_layers, n_heads, mlp_ratio: Transformer sizes.
    ensemble: K members. entry_index: index of the entry service. rope_period: period (steps)
    of the integer rotary phases, at least L. max_residual: bound of one step's residual in
    normalised units. ratio_step: logits moved per unit of residual for ratios. min_scale:
    smallest predicted scale. softplus_beta: sharpness of the non-negativity softplus.
    input_clip: normalised inputs are clipped to +-input_clip.
    """

    n_services: int
    n_metrics: int = len(METRIC_COLUMNS)
    n_faults: int = len(FAULT_TYPES)
    window: int = 16
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    ensemble: int = 4
    entry_index: int = 0
    rope_period: int = 64
    max_residual: float = 4.0
    ratio_step: float = 2.0
    min_scale: float = 0.01
    softplus_beta: float = 20.0
    input_clip: float = 10.0

    def __post_init__(self):
        if self.n_metrics != len(METRIC_COLUMNS):
            raise ConfigError(f"n_metrics={self.n_metrics}; the model needs {len(METRIC_COLUMNS)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"d_model={self.d_model} must split into even heads of n_heads")
        if self.rope_period < self.window:
            raise ConfigError(f"rope_period={self.rope_period} < window={self.window}")
        if not 0 <= self.entry_index < self.n_services:
            raise ConfigError(f"entry_index={self.entry_index} outside {self.n_services} services")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def token_dim(self) -> int:
        s, m, f = self.n_services, self.n_metrics, self.n_faults
        return 2 * s * m + 3 * s + 1 + s * f

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicsConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class StepInput(NamedTuple):
    """One time step t and the drivers of step t + 1. A window stacks L of them on axis -3/-2.

    metrics: (..., S, M) float32 normalised metrics of step t (0 where missing).
    mask: (..., S, M) float32, 1 where the metric of step t was measured.
    replicas: (..., S, 2) float32 desired and ready replicas at step t.
    action: (..., S) float32 desired replicas for step t + 1 (the action taken at t).
    entry_rate: (...,) float32 entry request rate of step t + 1, in requests per second.
    faults: (..., S, F) float32 fault severities (0..1) active in step t + 1.
    """

    metrics: jnp.ndarray
    mask: jnp.ndarray
    replicas: jnp.ndarray
    action: jnp.ndarray
    entry_rate: jnp.ndarray
    faults: jnp.ndarray


Window = StepInput  # the same fields with a time axis: metrics (B, L, S, M), entry_rate (B, L)


class Cache(NamedTuple):
    """Ring buffer of the last L tokens' keys and values, per member.

    keys, values: (K, B, n_layers, L, n_heads, head_dim), keys already rotated.
    pos: (K, B) int32 absolute index of the next step to be written (slot pos % L).
    """

    keys: jnp.ndarray
    values: jnp.ndarray
    pos: jnp.ndarray


# ---------------------------------------------------------------------------------------------
# Tokens and rotary phases


def tokens(norm: Normaliser, cfg: DynamicsConfig, x: StepInput) -> jnp.ndarray:
    """(..., token_dim) model input of each step; normalised values are clipped to +-input_clip."""
    lead = x.metrics.shape[:-2]
    entry = cfg.entry_index
    entry_z = (
        jnp.log1p(jnp.maximum(x.entry_rate, 0.0) / norm.unit[entry, RR]) - norm.mu[entry, RR]
    ) / norm.sd[entry, RR]
    parts = [
        jnp.clip(x.metrics, -cfg.input_clip, cfg.input_clip) * x.mask,
        x.mask,
        jnp.log1p(jnp.maximum(x.replicas, 0.0)) - 1.0,
        (jnp.log1p(jnp.maximum(x.action, 0.0)) - 1.0)[..., None],
        jnp.clip(entry_z, -cfg.input_clip, cfg.input_clip)[..., None, None],
        x.faults,
    ]
    return jnp.concatenate([p.reshape(*lead, -1) for p in parts], axis=-1)


def rope_freqs(cfg: DynamicsConfig) -> np.ndarray:
    """(head_dim // 2,) integer frequencies in cycles per `rope_period` steps."""
    n = cfg.head_dim // 2
    geo = np.geomspace(1, max(cfg.rope_period // 4, 1), n)
    return np.maximum(np.round(geo), np.arange(1, n + 1)).astype(np.int32)


def rotate(cfg: DynamicsConfig, x: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
    """Rotary phases: x (..., T, H, D) at absolute steps pos (..., T) int32.

    The phase is 2 pi ((pos * k) mod P) / P, computed in integers, so the product of a query and
    a key depends exactly on their distance, however large the absolute indices grow.
    """
    freqs = jnp.asarray(rope_freqs(cfg))
    period = cfg.rope_period
    turns = ((pos[..., None] % period) * freqs) % period  # (..., T, D/2)
    angle = (2.0 * math.pi / period) * turns.astype(jnp.float32)
    cos, sin = jnp.cos(angle)[..., None, :], jnp.sin(angle)[..., None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# One member


class Member(nn.Module):
    """One ensemble member (see the module docstring)."""

    cfg: DynamicsConfig

    def setup(self):
        c = self.cfg
        n_out = c.n_services * c.n_metrics
        self.embed = nn.Dense(c.d_model)
        self.kv_norm = nn.RMSNorm()
        self.kv = [nn.DenseGeneral((2, c.n_heads, c.head_dim)) for _ in range(c.n_layers)]
        self.q_norm = [nn.RMSNorm() for _ in range(c.n_layers)]
        self.q = [nn.DenseGeneral((c.n_heads, c.head_dim)) for _ in range(c.n_layers)]
        self.o = [nn.DenseGeneral(c.d_model, axis=(-2, -1)) for _ in range(c.n_layers)]
        self.mlp_norm = [nn.RMSNorm() for _ in range(c.n_layers)]
        self.mlp_in = [nn.Dense(c.mlp_ratio * c.d_model) for _ in range(c.n_layers)]
        self.mlp_out = [nn.Dense(c.d_model) for _ in range(c.n_layers)]
        self.out_norm = nn.RMSNorm()
        self.head = nn.Dense(2 * n_out, kernel_init=nn.initializers.normal(0.01))

    def __call__(self, tok: jnp.ndarray) -> jnp.ndarray:
        """Initialisation path: tok (B, T, token_dim) -> (B, T, 2 S M) raw outputs."""
        pos = jnp.broadcast_to(jnp.arange(tok.shape[-2]), tok.shape[:-1])
        e, k, v = self.keys_values(tok, pos)
        return self.readout(e, pos, k, v, None)

    def keys_values(self, tok, pos):
        """tok (B, T, token_dim), pos (B, T) -> e (B, T, d), k and v (B, n_layers, T, H, D).

        Layers lead the time axis, as in the cache, so a step writes its slot in place."""
        e = self.embed(tok)
        h = self.kv_norm(e)
        kvs = [layer(h) for layer in self.kv]  # each (B, T, 2, H, D)
        k = jnp.stack([rotate(self.cfg, kv[..., 0, :, :], pos) for kv in kvs], axis=1)
        v = jnp.stack([kv[..., 1, :, :] for kv in kvs], axis=1)
        return e, k, v

    def readout(self, x, qpos, k, v, bias):
        """Query stream x (B, Q, d) at qpos (B, Q) over k, v (B, n_layers, T, H, D).

        bias: (Q, T) additive attention bias (0 or -inf), or None for all keys visible.
        Returns raw outputs (B, Q, 2 S M).
        """
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        for layer in range(self.cfg.n_layers):
            q = rotate(self.cfg, self.q[layer](self.q_norm[layer](x)), qpos)  # (B, Q, H, D)
            logits = jnp.einsum("bqhd,bthd->bhqt", q, k[:, layer]) * scale
            if bias is not None:
                logits = logits + bias
            attn = jax.nn.softmax(logits, axis=-1)
            x = x + self.o[layer](jnp.einsum("bhqt,bthd->bqhd", attn, v[:, layer]))
            hidden = nn.relu(self.mlp_in[layer](self.mlp_norm[layer](x)))
            x = x + self.mlp_out[layer](hidden)
        return self.head(self.out_norm(x))


# ---------------------------------------------------------------------------------------------
# Output layer: physical bounds by construction


def _pos(cfg: DynamicsConfig, y: jnp.ndarray) -> jnp.ndarray:
    """Sharp softplus: a smooth max(y, 0)."""
    return jax.nn.softplus(cfg.softplus_beta * y) / cfg.softplus_beta


def _logit(p: jnp.ndarray, eps: float = 0.01) -> jnp.ndarray:
    p = jnp.clip(p, eps, 1.0 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def bounded_output(
    norm: Normaliser,
    cfg: DynamicsConfig,
    last_z: jnp.ndarray,
    entry_rate: jnp.ndarray,
    raw: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Raw head outputs -> (mean, scale), both (..., S, M) in normalised space.

    last_z: (..., S, M) normalised metrics of the last step (the residual's base).
    entry_rate: (...,) entry request rate of the predicted step (rps).
    raw: (..., 2 S M) head outputs: residuals, then scales.
    decode(mean) satisfies every bound for any input (see the module docstring).
    """
    shape = last_z.shape
    res_raw, scale_raw = jnp.split(raw.reshape(*shape[:-2], 2, *shape[-2:]), 2, axis=-3)
    res = cfg.max_residual * jnp.tanh(res_raw[..., 0, :, :] / cfg.max_residual)
    scale = jax.nn.softplus(scale_raw[..., 0, :, :] - 0.43) + cfg.min_scale

    y_last = jnp.maximum(jnp.clip(last_z, -cfg.input_clip, cfg.input_clip) * norm.sd + norm.mu, 0)
    x_last = norm.from_y(y_last)
    # non-negative quantities: residual in log space, kept >= 0 by a sharp softplus
    x_pos = norm.from_y(_pos(cfg, y_last + norm.sd * res))

    entry = jax.nn.one_hot(cfg.entry_index, cfg.n_services)
    rate = x_pos[..., RR] * (1 - entry) + jnp.maximum(entry_rate, 0.0)[..., None] * entry
    ratio_last = x_last[..., TP] / jnp.maximum(x_last[..., RR], 1e-6)
    throughput = rate * jax.nn.sigmoid(_logit(ratio_last) + cfg.ratio_step * res[..., TP])
    errors = jax.nn.sigmoid(_logit(x_last[..., ER]) + cfg.ratio_step * res[..., ER])

    spread_last = jnp.maximum(x_last[..., _HI] - x_last[..., _LO], 0.0)  # (.., S, 2)
    spread_y = jnp.log1p(spread_last / norm.delta_unit) + res[..., _HI]
    spread = norm.delta_unit * jnp.expm1(_pos(cfg, spread_y))
    p50 = x_pos[..., P50]
    p95 = p50 + spread[..., 0]
    p99 = p95 + spread[..., 1]

    x_new = x_pos.at[..., RR].set(rate)
    x_new = x_new.at[..., TP].set(throughput).at[..., ER].set(errors)
    x_new = x_new.at[..., P95].set(p95).at[..., P99].set(p99)
    return norm.encode(x_new), scale * norm.scale_factor


def loss_mask(cfg: DynamicsConfig) -> jnp.ndarray:
    """(S, M) 1 for learned features; 0 for the entry request rate, which is given."""
    return jnp.ones((cfg.n_services, cfg.n_metrics)).at[cfg.entry_index, RR].set(0.0)


# ---------------------------------------------------------------------------------------------
# Member-level pure functions (one member's params, batch axis B)


def _member(cfg: DynamicsConfig) -> Member:
    return Member(cfg)


def _window_forward(p, norm, cfg, window: StepInput):
    """Window (B, L, ...) -> mean, scale (B, S, M) for the next step, and cache (no K axis)."""
    batch, length = window.metrics.shape[:2]
    tok = tokens(norm, cfg, window)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    module = _member(cfg)
    e, k, v = module.apply({"params": p}, tok, pos, method=Member.keys_values)
    raw = module.apply({"params": p}, e[:, -1:], pos[:, -1:], k, v, None, method=Member.readout)
    mean, scale = bounded_output(
        norm, cfg, window.metrics[:, -1], window.entry_rate[:, -1], raw[:, 0]
    )
    cache = (k, v, jnp.full((batch,), length, jnp.int32))
    return mean, scale, cache


def _step_forward(p, norm, cfg, cache, step: StepInput):
    """Cache (no K axis) + step (B, ...) -> mean, scale (B, S, M) and the updated cache."""
    keys, values, pos = cache  # (B, n_layers, L, H, D), (B,)
    tok = tokens(norm, cfg, step)[:, None]  # (B, 1, token_dim)
    module = _member(cfg)
    e, k, v = module.apply({"params": p}, tok, pos[:, None], method=Member.keys_values)
    # Ring buffer: the new step overwrites slot pos % L of each row (a scatter, in place in a
    # scan's carry) instead of rewriting the whole cache.
    rows, slot = jnp.arange(keys.shape[0]), pos % cfg.window
    keys = keys.at[rows, :, slot].set(k[:, :, 0])
    values = values.at[rows, :, slot].set(v[:, :, 0])
    raw = module.apply({"params": p}, e, pos[:, None], keys, values, None, method=Member.readout)
    mean, scale = bounded_output(norm, cfg, step.metrics, step.entry_rate, raw[:, 0])
    return mean, scale, (keys, values, pos + 1)


def _sequence_forward(p, norm, cfg, seq: StepInput):
    """Teacher forcing: seq (B, T, ...) -> mean, scale (B, T, S, M), output t predicts t + 1.

    Each position attends to itself and the L - 1 steps before it (fewer at the start).
    """
    batch, length = seq.metrics.shape[:2]
    tok = tokens(norm, cfg, seq)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    module = _member(cfg)
    e, k, v = module.apply({"params": p}, tok, pos, method=Member.keys_values)
    dist = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    bias = jnp.where((dist >= 0) & (dist < cfg.window), 0.0, -jnp.inf)
    raw = module.apply({"params": p}, e, pos, k, v, bias, method=Member.readout)
    return bounded_output(norm, cfg, seq.metrics, seq.entry_rate, raw)


# ---------------------------------------------------------------------------------------------
# Public API (ensemble): params = {"net": member params with a leading K axis, "norm": Normaliser}


def init_params(
    cfg: DynamicsConfig, key: jax.Array, normaliser: Normaliser | None = None
) -> dict[str, Any]:
    """Ensemble parameters {"net": (K, ...) member params, "norm": Normaliser}."""
    net = _init_net(cfg, key)
    norm = normaliser if normaliser is not None else Normaliser.identity(cfg.n_services)
    return {"net": net, "norm": norm}


@functools.partial(jax.jit, static_argnums=0)
def _init_net(cfg: DynamicsConfig, key: jax.Array) -> dict[str, Any]:
    member_keys = jax.random.split(key, cfg.ensemble)
    dummy = jnp.zeros((1, cfg.window, cfg.token_dim), jnp.float32)
    return jax.vmap(lambda k: _member(cfg).init(k, dummy)["params"])(member_keys)


def predict(params, cfg: DynamicsConfig, window: StepInput) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Window (B, L, ...) -> (mean, scale), each (K, B, S, M) normalised, for step L."""
    fn = jax.vmap(_window_forward, in_axes=(0, None, None, None))
    mean, scale, _ = fn(params["net"], params["norm"], cfg, window)
    return mean, scale


def init_cache(params, cfg: DynamicsConfig, window: StepInput) -> Cache:
    """Cache of the L steps of `window` (B, L, ...); the next `step_cached` predicts after it."""
    fn = jax.vmap(_window_forward, in_axes=(0, None, None, None))
    _, _, (keys, values, pos) = fn(params["net"], params["norm"], cfg, window)
    return Cache(keys, values, pos)


def step_cached(
    params, cfg: DynamicsConfig, cache: Cache, step: StepInput, per_member: bool = False
) -> tuple[jnp.ndarray, jnp.ndarray, Cache]:
    """Appends one step (B, ...) to the cache and predicts the step after it.

    Equal to `predict` on the window slid by one step. Returns mean, scale (K, B, S, M)
    normalised and the new cache. With per_member=True every field of `step` has a leading K
    axis (each member fed its own prediction, as in rollouts).
    """
    step_axis = 0 if per_member else None
    fn = jax.vmap(_step_forward, in_axes=(0, None, None, 0, step_axis))
    mean, scale, (keys, values, pos) = fn(params["net"], params["norm"], cfg, tuple(cache), step)
    return mean, scale, Cache(keys, values, pos)


def predict_sequence(params, cfg: DynamicsConfig, seq: StepInput):
    """Teacher-forced predictions at every position of seq (B, T, ...): (K, B, T, S, M) each."""
    fn = jax.vmap(_sequence_forward, in_axes=(0, None, None, None))
    return fn(params["net"], params["norm"], cfg, seq)


def feed_prediction(step: StepInput, mean: jnp.ndarray) -> StepInput:
    """`step` with its metrics replaced by predicted means (K, B, S, M) and a full mask.

    The result has a leading K axis on every field, for `step_cached(..., per_member=True)`.
    """
    k = mean.shape[0]
    tiled = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), step)
    return tiled._replace(metrics=mean, mask=jnp.ones_like(mean))


def rollout(params, cfg: DynamicsConfig, window: StepInput, future: StepInput, horizon: int):
    """Open-loop rollout, each member fed its own predicted means.

    window: (B, L, ...) observed steps. future: (B, >= horizon - 1, ...) steps L, L + 1, ...
    whose replicas, actions, entry rates and faults are used and whose metrics are ignored.
    Returns mean, scale (K, B, horizon, S, M): predictions of steps L .. L + horizon - 1.
    """
    fn = jax.vmap(_window_forward, in_axes=(0, None, None, None))
    mean, scale, cache = fn(params["net"], params["norm"], cfg, window)
    cache = Cache(*cache)

    def body(carry, step):
        prev_mean, cache = carry
        m, s, cache = step_cached(params, cfg, cache, feed_prediction(step, prev_mean), True)
        return (m, cache), (m, s)

    steps = jax.tree.map(lambda a: jnp.moveaxis(a[:, : horizon - 1], 1, 0), future)
    _, (means, scales) = jax.lax.scan(body, (mean, cache), steps)
    means = jnp.concatenate([mean[:, :, None], jnp.moveaxis(means, 0, 2)], axis=2)
    scales = jnp.concatenate([scale[:, :, None], jnp.moveaxis(scales, 0, 2)], axis=2)
    return means, scales


def ensemble_moments(mean: jnp.ndarray, scale: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mixture mean and standard deviation over the member axis 0: (K, ...) -> (...)."""
    mix_mean = mean.mean(axis=0)
    var = (scale**2).mean(axis=0) + mean.var(axis=0)
    return mix_mean, jnp.sqrt(var)


def flops_per_cached_step(cfg: DynamicsConfig) -> int:
    """Multiply-adds x 2 of one `step_cached` call for one environment, all K members."""
    d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    per_layer = 2 * (d * 2 * d + d * d + d * d + 2 * d * h) + 2 * 2 * cfg.window * d
    member = 2 * cfg.token_dim * d + cfg.n_layers * per_layer
    member += 2 * d * 2 * cfg.n_services * cfg.n_metrics
    return cfg.ensemble * member
