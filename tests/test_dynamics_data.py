"""Data preparation of the dynamics model: splits without leaks, clear errors on bad data."""

import datetime as dt

import jax
import numpy as np
import polars as pl
import pytest

from collectors.errors import DataError
from research import synthetic
from research.checkpoint import ModelBundle
from research.data import (
    DataConfig,
    frame_to_runs,
    load_runs,
    make_windows,
    split_labels,
    split_windows,
    stack_runs,
)
from research.model import DynamicsConfig, init_params
from research.normalise import fit_normaliser
from research.online import as_windows

WINDOW, HORIZON = 4, 3
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def frame(run_id: str = "r0", n_steps: int = 40, seed: int = 0) -> pl.DataFrame:
    """service_metrics rows of one synthetic run."""
    arrays, _ = synthetic.simulate_run(n_steps, seed)
    return pl.DataFrame(synthetic._metric_rows(run_id, T0, arrays, 2.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "ds"
    synthetic.write_dataset(path, n_runs=6, n_steps=120, seed=1)
    return path


def row_sets(windows) -> list[set[int]]:
    rows = windows.starts[:, None] + np.arange(windows.window + windows.horizon)
    return [set(r.tolist()) for r in rows]


@pytest.mark.parametrize("mode", ["run", "time"])
def test_split_leaks_no_window(dataset, mode):
    runs = load_runs(dataset)
    norm = fit_normaliser(*stack_runs(runs))
    cfg = DataConfig(split=mode, block_steps=25, seed=3)
    sets = split_windows(runs, norm, WINDOW, HORIZON, cfg)
    assert all(len(ws) for ws in sets.values())
    used = {name: set().union(*row_sets(ws)) for name, ws in sets.items()}
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]

    # every window lies inside one run, and all its steps carry its split's label
    labels = split_labels(runs, cfg)
    for i, ws in enumerate(sets.values()):
        for run, t in zip(ws.run_of, ws.t0, strict=True):
            steps = np.arange(t, min(t + WINDOW + HORIZON, runs[run].n_steps))
            assert (labels[run][steps] == i).all()
    if mode == "run":
        for a in sets:
            for b in sets:
                if a != b:
                    assert not set(sets[a].run_of.tolist()) & set(sets[b].run_of.tolist())


def test_run_shorter_than_one_window_names_run():
    runs = frame_to_runs(frame("short", n_steps=WINDOW))
    norm = fit_normaliser(*stack_runs(runs))
    with pytest.raises(DataError, match=r"run 'short', column 'step'.*shorter than one window"):
        make_windows(runs, norm, WINDOW, HORIZON)
    with pytest.raises(DataError, match=r"run 'short', column 'step'"):
        frame_to_runs(frame("short", n_steps=WINDOW), min_steps=WINDOW + 1)


def test_feature_null_throughout_names_run_and_column():
    rows = frame("r-null").with_columns(
        pl.when(pl.col("service") == "payment")
        .then(None)
        .otherwise(pl.col("cpu_cores"))
        .alias("cpu_cores")
    )
    with pytest.raises(DataError, match=r"run 'r-null', column 'cpu_cores'.*'payment'"):
        frame_to_runs(rows)
    # allowed when the column is declared as possibly missing: it stays masked
    (run,) = frame_to_runs(rows, missing_ok=["cpu_cores"])
    assert run.mask[:, run.services.index("payment"), 6].sum() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_infinite_values_name_run_and_column(bad):
    rows = frame("r-bad").with_columns(
        pl.when(pl.col("step") == 7)
        .then(bad)
        .otherwise(pl.col("latency_p95_s"))
        .alias("latency_p95_s")
    )
    with pytest.raises(DataError, match=r"run 'r-bad', column 'latency_p95_s'.*step 7"):
        frame_to_runs(rows)


def test_services_differing_from_checkpoint_name_run():
    runs = frame_to_runs(frame("r-ok"))
    cfg = DynamicsConfig(n_services=4, window=WINDOW, d_model=8, n_heads=2, n_layers=1, ensemble=1)
    params = init_params(cfg, jax.random.key(0), fit_normaliser(*stack_runs(runs)))
    bundle = ModelBundle(
        cfg=cfg,
        params=params,
        services=["frontend", "catalog", "checkout", "shipping"],
        entry_service="frontend",
        call_graph=[],
        interval_s=2.0,
        meta={},
    )
    with pytest.raises(DataError, match=r"run 'r-ok', column 'service'.*shipping"):
        as_windows(bundle, frame("r-ok"), HORIZON)
    with pytest.raises(DataError, match=r"run 'r-ok', column 'service'"):
        frame_to_runs(frame("r-ok"), services=bundle.services)


def test_missing_values_are_masked_not_zero():
    rows = frame("r-gap").with_columns(
        pl.when(pl.col("step") == 5)
        .then(None)
        .otherwise(pl.col("error_ratio"))
        .alias("error_ratio")
    )
    (run,) = frame_to_runs(rows)
    assert (run.mask[5, :, 2] == 0).all() and run.mask[4:7:2, :, 2].all()
    norm = fit_normaliser(*stack_runs([run]))
    ws = make_windows([run], norm, WINDOW, HORIZON)
    assert (ws.rows.metrics[5, :, 2] == 0).all()  # masked entries carry no value


def test_fault_events_become_next_step_drivers(dataset):
    runs = load_runs(dataset)
    faults = sum(float(run.faults.sum()) for run in runs)
    assert faults > 0  # the synthetic runs hold fault events
    run = next(r for r in runs if r.faults.sum() > 0)
    norm = fit_normaliser(*stack_runs(runs))
    ws = make_windows([run], norm, WINDOW, HORIZON)
    # row t carries the action and faults of step t + 1
    np.testing.assert_array_equal(ws.rows.faults[: run.n_steps - 1], run.faults[1:])
    np.testing.assert_array_equal(ws.rows.action[: run.n_steps - 1], run.replicas[1:, :, 0])
    # calm windows come first in the curriculum order
    order = np.argsort(ws.score)
    assert ws.score[order[0]] <= ws.score[order[-1]]
