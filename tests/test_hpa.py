"""The HPA against decisions computed by hand from the Kubernetes documentation's rules."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest

from collectors.errors import DataError
from collectors.schema import METRIC_COLUMNS
from research.agents import heuristics as h
from research.agents import policies

REQUEST = 0.25  # cores requested per pod
CPU = METRIC_COLUMNS.index("cpu_cores")


class FakeState(NamedTuple):
    metrics: jax.Array  # (S, M)
    replicas: jax.Array  # (S,)
    ready: jax.Array  # (S,)


def state(replicas, utilisation, ready=None):
    """An environment state whose pods run at `utilisation` of their CPU request."""
    replicas = jnp.asarray(replicas, jnp.int32)
    ready = replicas if ready is None else jnp.asarray(ready, jnp.int32)
    util = jnp.asarray(utilisation, jnp.float32)
    metrics = jnp.zeros((replicas.shape[0], len(METRIC_COLUMNS)), jnp.float32)
    metrics = metrics.at[:, CPU].set(util * ready * REQUEST)
    return FakeState(metrics, replicas, ready)


def params(**kw):
    """One sync per step (interval 15 s): a window of 20 syncs = 300 s."""
    base = dict(target_utilisation=0.5, cpu_request_cores=REQUEST, max_replicas=20)
    return h.hpa_params_for(15.0, **{**base, **kw})


_hpa_step = jax.jit(h.hpa_step)  # one compilation per shape of settings and state


def decide(p, s, hpa_state=None):
    hpa_state = h.hpa_init(p, s.replicas) if hpa_state is None else hpa_state
    target, hpa_state = _hpa_step(p, hpa_state, s)
    return np.asarray(target).tolist(), hpa_state


def test_sync_and_window_sizes_follow_the_interval():
    p = h.hpa_params_for(2.0)
    assert p.sync_period_steps == 8  # 15 s / 2 s, rounded
    assert p.window_syncs == 19  # ceil(300 s / 16 s)
    p = h.hpa_params_for(15.0)
    assert (p.sync_period_steps, p.window_syncs) == (1, 20)


def test_ratio_doubles_and_halves_replicas():
    # Documentation: metric 200m for a target of 100m doubles the replicas, 50m halves them.
    assert decide(params(), state([3], [1.0]))[0] == [6]
    assert decide(params(), state([4], [0.25]))[0] == [2]


def test_tolerance_band_keeps_replicas():
    # ratio 1.08 lies within 0.1 of 1: no change; ratio 1.12 does not: ceil(4 x 1.12) = 5.
    assert decide(params(), state([4], [0.54]))[0] == [4]
    assert decide(params(), state([4], [0.56]))[0] == [5]
    assert decide(params(), state([4], [0.46]))[0] == [4]
    assert decide(params(), state([10], [0.44]))[0] == [9]  # ceil(10 x 0.88) = 9


def test_desired_uses_ready_pods():
    # 4 desired, 2 ready at 100 %: ceil(2 x 2.0) = 4, no change although the ratio is 2.
    assert decide(params(), state([4], [1.0], ready=[2]))[0] == [4]


def test_scale_down_waits_for_the_stabilisation_window():
    p = params()
    target, hpa_state = decide(p, state([6], [0.5]))  # recommends 6 (within tolerance)
    assert target == [6]
    targets = []
    for _ in range(20):  # load drops: every later sync recommends 2
        target, hpa_state = decide(p, state([6], [1 / 6]), hpa_state)
        targets.append(target[0])
    # The recommendation of 6 stays in the window for 19 more syncs (285 s), then expires.
    assert targets[:19] == [6] * 19
    assert targets[19] == 2


def test_stabilisation_uses_the_largest_recent_recommendation():
    p = params()
    _, hpa_state = decide(p, state([6], [0.33]))  # ceil(6 x 0.66) = 4, target 4
    _, hpa_state = decide(p, state([4], [0.5]), hpa_state)  # within tolerance: recommends 4
    target, hpa_state = decide(p, state([4], [0.125]), hpa_state)  # 1, but 4 is in the window
    assert target == [4]


def test_scale_up_is_limited_to_the_larger_of_double_and_four_pods():
    p = params()
    assert decide(p, state([1], [5.0]))[0] == [5]  # wants 10; max(2 x 1, 1 + 4) = 5
    assert decide(p, state([6], [1.5]))[0] == [12]  # wants 18; max(2 x 6, 6 + 4) = 12
    assert decide(p, state([3], [2.0]))[0] == [7]  # wants 12; max(6, 7) = 7


def test_scale_up_is_not_stabilised():
    p = params()
    _, hpa_state = decide(p, state([2], [0.25]))  # recommends 1
    target, _ = decide(p, state([2], [1.0]), hpa_state)  # wants 4: goes up at once
    assert target == [4]


def test_min_and_max_replicas_bound_the_target():
    p = params(min_replicas=2, max_replicas=6)
    assert decide(p, state([3], [0.05]))[0] == [2]
    assert decide(p, state([5], [1.0]))[0] == [6]


def test_missing_metric_keeps_replicas_and_records_nothing():
    p = params()
    s = state([3, 3], [1.0, 1.0])
    s = s._replace(metrics=s.metrics.at[1, CPU].set(jnp.nan))
    target, hpa_state = decide(p, s)
    assert target == [6, 3]
    assert np.asarray(hpa_state.recommendations)[0].tolist() == [6, 0]
    # No pod ready: no utilisation, no change.
    assert decide(p, state([3], [1.0], ready=[0]))[0] == [3]


def test_sync_period_holds_the_target_between_syncs():
    p = h.hpa_params_for(2.0, target_utilisation=0.5, cpu_request_cores=REQUEST)
    hpa_state = h.hpa_init(p, jnp.array([2], jnp.int32))
    current, targets = 2, []
    for i in range(17):
        util = 1.0 if i < 8 else 0.25
        target, hpa_state = decide(p, state([current], [util]), hpa_state)
        current = target[0]
        targets.append(current)
    # Synced at step 0 (2 -> 4); steps 1-7 would want 8 but hold; the sync at step 8 wants 2
    # but the window still holds 4; the sync at step 16 likewise.
    assert targets == [4] * 17
    assert int(hpa_state.cursor) == 3


def test_hpa_vmaps_over_target_utilisation():
    targets = jnp.array([0.25, 0.5, 1.0])
    p = params()
    s = state([4], [0.5])

    def run(target):
        q = p.replace(target_utilisation=target)
        return h.hpa_step(q, h.hpa_init(q, s.replicas), s)[0]

    out = jax.jit(jax.vmap(run))(targets)
    assert np.asarray(out)[:, 0].tolist() == [8, 4, 2]


class FakeEnv:
    min_replicas, max_replicas, max_delta = 1, 6, 1


def test_target_to_action_bounds_the_delta():
    s = state([1, 3, 6, 4], [0.5] * 4)
    action = policies.target_to_action(FakeEnv, s, jnp.array([5, 3, 9, 0]))
    assert np.asarray(action).tolist() == [2, 1, 1, 0]


def test_threshold_and_static_policies():
    s = state([2, 2, 2], [0.9, 0.5, 0.1])
    key = jax.random.key(0)
    threshold = h.threshold_policy(cpu_request_cores=REQUEST)
    assert np.asarray(threshold(None, s, key)).tolist() == [3, 2, 1]
    assert np.asarray(h.static_policy(6)(None, s, key)).tolist() == [6, 6, 6]
    rand = np.asarray(h.random_policy(1, 6)(None, s, key))
    assert ((rand >= 1) & (rand <= 6)).all()


def history_frame(steps=2, util=1.0, drop=None):
    rows = []
    for step in range(steps):
        for service in ("frontend", "catalog"):
            row = {"step": step, "service": service, "replicas_desired": 2, "replicas_ready": 2}
            row |= {c: 0.0 for c in METRIC_COLUMNS}
            row["cpu_cores"] = util * 2 * REQUEST
            if drop == service and step == steps - 1:
                continue
            rows.append(row)
    return pl.DataFrame(rows)


def test_live_hpa_reads_the_newest_step_of_a_history_frame():
    live = policies.LiveHPA(params(), ["frontend", "catalog"])
    assert live(history_frame()) == {"frontend": 4, "catalog": 4}
    with pytest.raises(DataError, match="catalog"):
        live(history_frame(drop="catalog"))
