"""Physical plausibility of a dynamics model, reported as violation rates.

A model passes accuracy checks on data like its training data and can still be wrong where an
agent takes it: more replicas that raise latency, more load that lowers it. These checks ask
the model counterfactual questions from real windows and compare the answers with what any
queueing system obeys. Each figure is the fraction of checked cases that break the rule
(0 = always plausible); a case is one (window, service) pair, or one (window, edge) pair.

- `bounds`: a predicted value is negative or not finite, an error ratio lies above 1, or the
  latency quantiles are out of order (p50 <= p95 <= p99).
- `throughput_above_load`: predicted throughput above the predicted request rate.
- `monotone_replicas`: with one more replica for a service (desired and ready now, and
  desired next), its predicted p95 latency or error ratio rises.
- `monotone_load`: with the next step's entry rate raised by `load_factor`, a service's
  predicted request rate, p95 latency or CPU falls.
- `littles_law`: Little's law L = lambda W gives the requests in flight at a service from its
  arrival rate lambda (`request_rate_rps`; failed requests occupy the service too) and its
  latency W. Calls are synchronous, so every request in flight at a callee holds one in flight
  at its caller: lambda_caller W_caller >= lambda_callee W_callee on every call graph edge.
  The metric set has no concurrency column, so the law is checked in this call-graph form,
  with the p50 latency standing in for the mean on both sides.

A relative tolerance `rel_tol` (plus a tiny absolute one) keeps float rounding and the
model's own noise floor from counting as violations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collectors.schema import METRIC_COLUMNS
from research import model as dyn

Predictor = Callable[[dyn.StepInput], jax.Array]  # window (B, L, ...) -> next metrics (B, S, M)

M = {name: i for i, name in enumerate(METRIC_COLUMNS)}
CHECKS = ("bounds", "throughput_above_load", "monotone_replicas", "monotone_load", "littles_law")
_ABS_TOL = 1e-6


def _rises(after: np.ndarray, before: np.ndarray, rel_tol: float) -> np.ndarray:
    return after > before + rel_tol * np.abs(before) + _ABS_TOL


def bound_cases(x: np.ndarray) -> np.ndarray:
    """(B, S) bool: the prediction of a service breaks a bound (see the module docstring)."""
    p50, p95, p99 = (
        x[..., M["latency_p50_s"]],
        x[..., M["latency_p95_s"]],
        x[..., M["latency_p99_s"]],
    )
    bad = ~np.isfinite(x).all(axis=-1) | (x < 0).any(axis=-1)
    bad |= x[..., M["error_ratio"]] > 1.0 + _ABS_TOL
    bad |= _rises(p50, p95, 1e-5) | _rises(p95, p99, 1e-5)
    return bad


def with_more_replicas(window: dyn.StepInput, service: int, extra: int = 1) -> dyn.StepInput:
    """`window` with `extra` more replicas of `service` at its last step, now and next."""
    replicas = window.replicas.at[:, -1, service, :].add(extra)
    action = window.action.at[:, -1, service].add(extra)
    return window._replace(replicas=replicas, action=action)


def with_more_load(window: dyn.StepInput, factor: float) -> dyn.StepInput:
    """`window` with the entry rate of the step to predict multiplied by `factor`."""
    return window._replace(entry_rate=window.entry_rate.at[:, -1].multiply(factor))


def check(
    predict: Predictor,
    window: dyn.StepInput,
    edges: Sequence[tuple[int, int]],
    load_factor: float = 1.25,
    rel_tol: float = 0.02,
) -> dict[str, Any]:
    """Violation rates of `predict` on the windows `window` (B, L, ...), one per `CHECKS` name.

    `edges` are the call graph's (caller, callee) service indices. Also returns `n_windows`.
    """
    base = np.asarray(predict(window))  # (B, S, M)
    n_windows, n_services = base.shape[:2]
    rates: dict[str, Any] = {"bounds": float(bound_cases(base).mean())}

    rates["throughput_above_load"] = float(
        _rises(base[..., M["throughput_rps"]], base[..., M["request_rate_rps"]], 1e-5).mean()
    )

    replica_bad = []
    for s in range(n_services):
        more = np.asarray(predict(with_more_replicas(window, s)))[:, s]
        bad = _rises(more[:, M["latency_p95_s"]], base[:, s, M["latency_p95_s"]], rel_tol)
        bad |= _rises(more[:, M["error_ratio"]], base[:, s, M["error_ratio"]], rel_tol)
        replica_bad.append(bad)
    rates["monotone_replicas"] = float(np.mean(replica_bad))

    loaded = np.asarray(predict(with_more_load(window, load_factor)))
    load_bad = np.zeros(base.shape[:2], bool)
    for name in ("request_rate_rps", "latency_p95_s", "cpu_cores"):
        load_bad |= _rises(base[..., M[name]], loaded[..., M[name]], rel_tol)
    rates["monotone_load"] = float(load_bad.mean())

    in_flight = base[..., M["request_rate_rps"]] * base[..., M["latency_p50_s"]]  # (B, S)
    if edges:
        law_bad = [_rises(in_flight[:, b], in_flight[:, a], rel_tol) for a, b in edges]
        rates["littles_law"] = float(np.mean(law_bad))
    else:
        rates["littles_law"] = 0.0
    rates["n_windows"] = int(n_windows)
    return rates


def bundle_predictor(bundle) -> Predictor:
    """The model of a `research.checkpoint.ModelBundle` as a `Predictor`: the ensemble's mean
    prediction in normalised space, decoded to physical units."""
    params, cfg = bundle.params, bundle.cfg

    @jax.jit
    def predict(window: dyn.StepInput) -> jax.Array:
        mean, _ = dyn.predict(params, cfg, window)
        return params["norm"].decode(mean.mean(axis=0))

    return predict


def call_graph_edges(services: Sequence[str], call_graph: Sequence[Sequence[str]]):
    """(caller, callee) index pairs of a call graph given by service names."""
    index = {s: i for i, s in enumerate(services)}
    return [(index[a], index[b]) for a, b in call_graph if a in index and b in index]


def check_model(
    bundle, dataset: str | Path, max_windows: int = 512, batch_size: int = 256, **kwargs: Any
) -> dict[str, Any]:
    """Violation rates of a trained model on up to `max_windows` held-out windows of `dataset`
    (its test split, by the checkpoint's data config); `kwargs` go to `check`."""
    from research.accuracy import held_out

    _, test = held_out(bundle, dataset, horizon=1)
    idx = np.linspace(0, len(test) - 1, min(len(test), max_windows)).astype(int)
    predict = bundle_predictor(bundle)
    edges = call_graph_edges(bundle.services, bundle.call_graph)
    length = bundle.cfg.window
    parts, weights = [], []
    for start in range(0, len(idx), batch_size):
        batch = test.batch(idx[start : start + batch_size])
        window = jax.tree.map(lambda a: jnp.asarray(a[:, :length]), batch)
        parts.append(check(predict, window, edges, **kwargs))
        weights.append(parts[-1]["n_windows"])
    result = {k: float(np.average([p[k] for p in parts], weights=weights)) for k in CHECKS}
    result["n_windows"] = int(sum(weights))
    return result
