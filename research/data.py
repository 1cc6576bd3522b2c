"""Data preparation for the dynamics model: Parquet rows -> per-run arrays -> windows.

Pipeline:

1. `load_runs` reads `service_metrics`, `events` and `runs` of a dataset with polars (lazily, run
   by run) and `frame_to_runs` turns the rows of each run into dense arrays on a step grid:
   metrics (T, S, M) in physical units with a mask for nulls, replicas (T, S, 2), the entry
   request rate (T,) and fault severities (T, S, F) from the `events` table. Bad data raises
   `DataError` naming the run and the column (NaN or infinite values, a feature null
   throughout, a run shorter than one window, services that differ from those expected).
2. `WindowSet` normalises the runs with a `Normaliser` and indexes windows of L + H rows: L steps
   of context and H steps of targets (one-step and rollout). Row t is a `StepInput`: step t's
   metrics, mask and replicas, and the drivers of step t + 1 (action = desired replicas of
   t + 1, entry rate of t + 1, faults of t + 1). Rows past a run's end are padding with mask 0.
3. `split_labels` assigns whole runs or contiguous time blocks to train/val/test; a window is
   kept only when all its L + H rows carry one label, so no window crosses a split.
4. `difficulty` scores windows from calm (no fault, steady load) to hard (faults, load spikes)
   for the curriculum.
5. `stream_windows` yields `WindowSet`s chunk by chunk from Parquet for data larger than memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from collectors.errors import DataError
from collectors.schema import FAULT_TYPES, METRIC_COLUMNS, REPLICA_COLUMNS
from research.model import RR, StepInput
from research.normalise import Normaliser

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How runs become windows.

    split: "run" (whole runs per split), "time" (contiguous blocks of every run) or "auto"
    (by run when there are at least `min_runs_for_run_split` runs, else by time).
    """

    split: str = "auto"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    block_steps: int = 200
    min_runs_for_run_split: int = 5
    seed: int = 0
    missing_ok: tuple[str, ...] = ()
    chunk_steps: int = 20_000


@dataclasses.dataclass
class RunArrays:
    """One run on a dense step grid (T steps, S services, M metrics, F fault types)."""

    run_id: str
    services: list[str]
    entry_index: int
    metrics: np.ndarray  # (T, S, M) float32 physical units, 0 where missing
    mask: np.ndarray  # (T, S, M) float32 1 where measured
    replicas: np.ndarray  # (T, S, 2) float32 desired, ready
    entry_rate: np.ndarray  # (T,) float32 entry request rate (rps), gaps filled
    faults: np.ndarray  # (T, S, F) float32 severities
    interval_s: float = 2.0

    @property
    def n_steps(self) -> int:
        return self.metrics.shape[0]


# ---------------------------------------------------------------------------------------------
# Rows -> run arrays


def load_runs(
    dataset: str | Path,
    runs: Sequence[str] | None = None,
    services: Sequence[str] | None = None,
    missing_ok: Sequence[str] = (),
    min_steps: int = 2,
    step_range: tuple[int, int] | None = None,
) -> list[RunArrays]:
    """Reads runs of `dataset` into arrays, one run at a time (see `frame_to_runs`)."""
    from collectors.dataset import list_runs, read_table

    run_table = list_runs(dataset)
    run_ids = list(runs) if runs is not None else run_table["run_id"].to_list()
    if not run_ids:
        raise DataError(f"dataset {dataset}: no runs in the runs table")
    out = []
    for run_id in run_ids:
        metrics = read_table(dataset, "service_metrics", runs=[run_id])
        if step_range is not None:
            metrics = metrics.filter(pl.col("step").is_between(*step_range, closed="left"))
        events = read_table(dataset, "events", runs=[run_id]).collect()
        info = run_table.filter(pl.col("run_id") == run_id)
        out += frame_to_runs(
            metrics.collect(), events, info, services, missing_ok, min_steps=min_steps
        )
    return out


def frame_to_runs(
    service_metrics: pl.DataFrame,
    events: pl.DataFrame | None = None,
    runs: pl.DataFrame | None = None,
    services: Sequence[str] | None = None,
    missing_ok: Sequence[str] = (),
    min_steps: int = 2,
) -> list[RunArrays]:
    """Rows of `service_metrics` (any number of runs) -> one `RunArrays` per run.

    services: the expected services in model order (entry first); when None they come from the
    `runs` table, else from the rows (sorted). missing_ok: metric columns allowed to be null
    throughout a run (they stay masked). min_steps: shortest accepted run.
    """
    if service_metrics.is_empty():
        raise DataError("service_metrics: no rows")
    out = []
    for run_id in service_metrics["run_id"].unique(maintain_order=True).to_list():
        rows = service_metrics.filter(pl.col("run_id") == run_id)
        info = runs.filter(pl.col("run_id") == run_id) if runs is not None else None
        run_events = events.filter(pl.col("run_id") == run_id) if events is not None else None
        out.append(_one_run(run_id, rows, run_events, info, services, missing_ok, min_steps))
    return out


def _run_services(run_id, rows, info, expected) -> tuple[list[str], int]:
    present = sorted(rows["service"].unique().to_list())
    listed, entry = None, None
    if info is not None and not info.is_empty():
        listed = info["services"][0]
        entry = info["entry_service"][0]
        listed = list(listed) if listed is not None else None
    order = list(expected) if expected is not None else (listed or present)
    if sorted(order) != present:
        raise DataError(
            f"run {run_id!r}, column 'service': services {present} differ from the "
            f"expected {sorted(order)}"
        )
    entry_index = order.index(entry) if entry in order else 0
    return order, entry_index


def _check_values(run_id: str, rows: pl.DataFrame) -> None:
    for name in METRIC_COLUMNS:
        bad = rows.filter(pl.col(name).is_nan() | pl.col(name).is_infinite())
        if not bad.is_empty():
            raise DataError(
                f"run {run_id!r}, column {name!r}: {bad.height} NaN or infinite values "
                f"(first at step {bad['step'][0]}, service {bad['service'][0]!r})"
            )


def _one_run(run_id, rows, events, info, expected, missing_ok, min_steps) -> RunArrays:
    services, entry_index = _run_services(run_id, rows, info, expected)
    _check_values(run_id, rows)
    rows = rows.sort("step")
    step0 = int(rows["step"].min())
    n_steps = int(rows["step"].max()) - step0 + 1
    if n_steps < min_steps:
        raise DataError(
            f"run {run_id!r}, column 'step': {n_steps} steps, shorter than one window "
            f"({min_steps} steps)"
        )
    t_idx = (rows["step"].to_numpy() - step0).astype(np.int64)
    s_idx = rows["service"].replace_strict(services, list(range(len(services)))).to_numpy()

    values = np.full((n_steps, len(services), len(METRIC_COLUMNS)), np.nan)
    values[t_idx, s_idx] = rows.select(METRIC_COLUMNS).to_numpy().astype(np.float64)
    mask = np.isfinite(values)
    for m, name in enumerate(METRIC_COLUMNS):
        for s, service in enumerate(services):
            if not mask[:, s, m].any() and name not in missing_ok:
                raise DataError(
                    f"run {run_id!r}, column {name!r}: null throughout for service {service!r}"
                )

    reps = np.full((n_steps, len(services), 2), np.nan)
    reps[t_idx, s_idx] = rows.select(REPLICA_COLUMNS).to_numpy().astype(np.float64)
    reps = _fill_gaps(reps, default=1.0)
    entry_rate = _fill_gaps(values[:, entry_index, RR], default=0.0)

    step_ts = _step_times(rows, step0, n_steps)
    faults = _fault_matrix(events, services, step_ts)
    interval = float(info["interval_s"][0]) if info is not None and not info.is_empty() else 2.0
    return RunArrays(
        run_id=run_id,
        services=services,
        entry_index=entry_index,
        metrics=np.where(mask, values, 0.0).astype(np.float32),
        mask=mask.astype(np.float32),
        replicas=reps.astype(np.float32),
        entry_rate=entry_rate.astype(np.float32),
        faults=faults,
        interval_s=interval if interval == interval else 2.0,
    )


def _fill_gaps(x: np.ndarray, default: float) -> np.ndarray:
    """Forward- then backward-fills NaN along axis 0; all-NaN columns become `default`."""
    x = x.copy()
    flat = x.reshape(x.shape[0], -1)
    for j in range(flat.shape[1]):
        col = flat[:, j]
        ok = np.isfinite(col)
        if not ok.any():
            col[:] = default
            continue
        idx = np.where(ok, np.arange(len(col)), 0)
        np.maximum.accumulate(idx, out=idx)
        first = np.argmax(ok)
        col[:] = np.where(np.arange(len(col)) < first, col[first], col[idx])
    return flat.reshape(x.shape)


def _step_times(rows: pl.DataFrame, step0: int, n_steps: int) -> np.ndarray:
    """(T,) int64 ms timestamps of each step (earliest sample), interpolated over gaps."""
    per_step = rows.group_by("step").agg(pl.col("ts").min()).sort("step")
    steps = per_step["step"].to_numpy() - step0
    ts = per_step["ts"].dt.epoch("ms").to_numpy().astype(np.float64)
    ok = np.isfinite(ts)
    if not ok.any():
        return np.arange(n_steps, dtype=np.int64)
    return np.interp(np.arange(n_steps), steps[ok], ts[ok]).astype(np.int64)


def _fault_matrix(events: pl.DataFrame | None, services, step_ts: np.ndarray) -> np.ndarray:
    """(T, S, F) max severity of the faults active at each step.

    A fault targets a service when `target` is its name or starts with `<name>-` (a pod);
    any other target (a node) counts for every service.
    """
    out = np.zeros((len(step_ts), len(services), len(FAULT_TYPES)), np.float32)
    if events is None or events.is_empty():
        return out
    faults = events.filter(pl.col("kind") == "fault")
    for row in faults.iter_rows(named=True):
        if row["type"] not in FAULT_TYPES or row["ts_start"] is None:
            continue
        start = row["ts_start"].timestamp() * 1000
        end = row["ts_end"].timestamp() * 1000 if row["ts_end"] is not None else np.inf
        active = (step_ts >= start) & (step_ts < end)
        target = row["target"] or ""
        hit = [s for s, name in enumerate(services) if target == name or target.startswith(name)]
        rows_s = hit or list(range(len(services)))
        f = FAULT_TYPES.index(row["type"])
        sev = float(row["severity"]) if row["severity"] is not None else 1.0
        for s in rows_s:
            out[active, s, f] = np.maximum(out[active, s, f], sev)
    return out


def stack_runs(runs: Sequence[RunArrays]) -> tuple[np.ndarray, np.ndarray]:
    """All steps of all runs: metrics and mask, each (sum T, S, M), for fitting a normaliser."""
    return (
        np.concatenate([r.metrics for r in runs]),
        np.concatenate([r.mask for r in runs]),
    )


# ---------------------------------------------------------------------------------------------
# Splits


def split_labels(runs: Sequence[RunArrays], cfg: DataConfig) -> list[np.ndarray]:
    """Per run, (T,) int8 split label of each step: 0 train, 1 val, 2 test.

    By run: whole runs go to one split (a seeded permutation, at least one run in val and test).
    By time: every run is cut into blocks of `block_steps`, and blocks are assigned to splits
    in a seeded order with the configured fractions.
    """
    mode = cfg.split
    if mode == "auto":
        mode = "run" if len(runs) >= cfg.min_runs_for_run_split else "time"
    rng = np.random.default_rng(cfg.seed)
    if mode == "run":
        n = len(runs)
        if n < 3:
            raise DataError(f"split by run needs at least 3 runs, the dataset has {n}")
        n_test = max(1, round(cfg.test_fraction * n))
        n_val = max(1, round(cfg.val_fraction * n))
        order = rng.permutation(n)
        labels = np.zeros(n, np.int8)
        labels[order[:n_test]] = 2
        labels[order[n_test : n_test + n_val]] = 1
        return [np.full(r.n_steps, labels[i], np.int8) for i, r in enumerate(runs)]
    if mode != "time":
        raise DataError(f"data.split={cfg.split!r}; allowed: run, time, auto")
    out = []
    for run in runs:
        n_blocks = max(1, -(-run.n_steps // cfg.block_steps))
        block_labels = _block_labels(n_blocks, cfg, rng)
        out.append(np.repeat(block_labels, cfg.block_steps)[: run.n_steps])
    return out


def _block_labels(n_blocks: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    n_test = max(1, round(cfg.test_fraction * n_blocks)) if n_blocks >= 3 else 0
    n_val = max(1, round(cfg.val_fraction * n_blocks)) if n_blocks >= 3 else 0
    labels = np.zeros(n_blocks, np.int8)
    order = rng.permutation(n_blocks)
    labels[order[:n_test]] = 2
    labels[order[n_test : n_test + n_val]] = 1
    return labels


# ---------------------------------------------------------------------------------------------
# Windows


@dataclasses.dataclass
class WindowSet:
    """Windows of L + H rows over normalised runs, gathered into batches on demand.

    rows: a `StepInput` of numpy arrays with a leading row axis over all runs (each run padded
    with H masked rows). starts: (N,) first row of each window. run_of: (N,) run index.
    t0: (N,) step index (in its run) of the window's first row. score: (N,) difficulty.
    """

    rows: StepInput
    starts: np.ndarray
    run_of: np.ndarray
    t0: np.ndarray
    score: np.ndarray
    window: int
    horizon: int
    run_ids: list[str]

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, idx: np.ndarray) -> StepInput:
        """Windows `idx` -> StepInput with fields (B, L + H, ...) as jnp arrays."""
        rows = self.starts[idx][:, None] + np.arange(self.window + self.horizon)
        return StepInput(*(jnp.asarray(field[rows]) for field in self.rows))

    def subset(self, idx: np.ndarray) -> WindowSet:
        """The windows `idx` (same rows)."""
        return dataclasses.replace(
            self,
            starts=self.starts[idx],
            run_of=self.run_of[idx],
            t0=self.t0[idx],
            score=self.score[idx],
        )


def run_rows(run: RunArrays, norm: Normaliser, horizon: int) -> StepInput:
    """One run -> rows (T + H, ...) as numpy: step t with the drivers of step t + 1."""
    z = np.asarray(norm.encode(jnp.asarray(run.metrics)))
    z = np.where(run.mask > 0, z, 0.0).astype(np.float32)
    nxt = np.minimum(np.arange(run.n_steps) + 1, run.n_steps - 1)
    rows = StepInput(
        metrics=z,
        mask=run.mask,
        replicas=run.replicas,
        action=run.replicas[nxt, :, 0],
        entry_rate=run.entry_rate[nxt],
        faults=run.faults[nxt],
    )
    pad = [np.repeat(field[-1:], horizon, axis=0) for field in rows]
    pad[0], pad[1] = np.zeros_like(pad[0]), np.zeros_like(pad[1])
    return StepInput(
        *(np.concatenate([f, p]).astype(np.float32) for f, p in zip(rows, pad, strict=True))
    )


def make_windows(
    runs: Sequence[RunArrays],
    norm: Normaliser,
    window: int,
    horizon: int,
    labels: Sequence[np.ndarray] | None = None,
    split: int | None = None,
) -> WindowSet:
    """Windows of L = `window` context rows and H = `horizon` target rows.

    With `labels` (from `split_labels`) and `split` (0, 1, 2), only windows whose L + H rows
    all lie in that split are kept (rows past the run's end are padding and count as inside).
    """
    parts, starts, run_of, t0 = [], [], [], []
    offset = 0
    span = window + horizon
    for i, run in enumerate(runs):
        if run.n_steps < window + 1:
            raise DataError(
                f"run {run.run_id!r}, column 'step': {run.n_steps} steps, shorter than one "
                f"window ({window + 1} steps)"
            )
        parts.append(run_rows(run, norm, horizon))
        s = np.arange(run.n_steps - window)
        if labels is not None and split is not None:
            lab = np.concatenate([labels[i], np.repeat(labels[i][-1:], horizon)])
            same = _constant_runs(lab, span)
            s = s[same[s] & (lab[s] == split)]
        starts.append(s + offset)
        run_of.append(np.full(len(s), i))
        t0.append(s)
        offset += run.n_steps + horizon
    rows = StepInput(*(np.concatenate(f) for f in zip(*parts, strict=True)))
    starts_a = np.concatenate(starts).astype(np.int64)
    ws = WindowSet(
        rows=rows,
        starts=starts_a,
        run_of=np.concatenate(run_of).astype(np.int64),
        t0=np.concatenate(t0).astype(np.int64),
        score=np.zeros(len(starts_a), np.float32),
        window=window,
        horizon=horizon,
        run_ids=[r.run_id for r in runs],
    )
    ws.score = difficulty(ws)
    return ws


def _constant_runs(labels: np.ndarray, span: int) -> np.ndarray:
    """(n,) True where labels[i : i + span] are all equal (False where the span overflows)."""
    change = np.concatenate([[0], np.cumsum(labels[1:] != labels[:-1])])
    ok = np.zeros(len(labels), bool)
    n = len(labels) - span + 1
    if n > 0:
        ok[:n] = change[span - 1 :] == change[:n]
    return ok


def difficulty(ws: WindowSet) -> np.ndarray:
    """(N,) curriculum score: 0 for calm windows, larger with faults, load swings and spikes.

    score = max fault severity + coefficient of variation of the entry rate + 0.1 * largest
    step change of any normalised metric, over the window's L + H rows.
    """
    if len(ws) == 0:
        return np.zeros(0, np.float32)
    rows = ws.starts[:, None] + np.arange(ws.window + ws.horizon)
    fault = ws.rows.faults[rows].max(axis=(1, 2, 3))
    rate = ws.rows.entry_rate[rows]
    cv = rate.std(axis=1) / (np.abs(rate.mean(axis=1)) + 1e-6)
    z, mask = ws.rows.metrics[rows], ws.rows.mask[rows]
    jump = np.abs(np.diff(z, axis=1)) * mask[:, 1:] * mask[:, :-1]
    return (fault + cv + 0.1 * jump.max(axis=(1, 2, 3))).astype(np.float32)


def split_windows(
    runs: Sequence[RunArrays], norm: Normaliser, window: int, horizon: int, cfg: DataConfig
) -> dict[str, WindowSet]:
    """Train/val/test `WindowSet`s that share no row (see `split_labels`)."""
    labels = split_labels(runs, cfg)
    return {
        name: make_windows(runs, norm, window, horizon, labels, i) for i, name in enumerate(SPLITS)
    }


# ---------------------------------------------------------------------------------------------
# Streaming


def stream_windows(
    dataset: str | Path,
    norm: Normaliser,
    window: int,
    horizon: int,
    cfg: DataConfig,
    services: Sequence[str] | None = None,
    runs: Sequence[str] | None = None,
    split: int = 0,
) -> Iterator[WindowSet]:
    """Windows of one split, one chunk of `cfg.chunk_steps` steps of one run at a time.

    For datasets larger than memory: only one chunk's rows are held. Chunks overlap by L + H
    steps so no window is lost at a boundary. Splits are by time block within each run (block
    labels depend on absolute step indices, so every chunk agrees on them).
    """
    from collectors.dataset import list_runs

    run_ids = list(runs) if runs is not None else list_runs(dataset)["run_id"].to_list()
    span = window + horizon
    rng = np.random.default_rng(cfg.seed)
    for run_id in run_ids:
        bounds = _step_bounds(dataset, run_id)
        n_blocks = max(1, -(-(bounds[1] - bounds[0] + 1) // cfg.block_steps))
        block_labels = _block_labels(n_blocks, cfg, rng)
        for lo in range(bounds[0], bounds[1] + 1, cfg.chunk_steps):
            hi = min(lo + cfg.chunk_steps + span, bounds[1] + 1)
            if hi - lo < window + 1:
                continue
            chunk = load_runs(dataset, [run_id], services, cfg.missing_ok, 2, (lo, hi))
            block = (np.arange(lo, lo + chunk[0].n_steps) - bounds[0]) // cfg.block_steps
            ws = make_windows(chunk, norm, window, horizon, [block_labels[block]], split)
            if len(ws):
                yield ws


def _step_bounds(dataset: str | Path, run_id: str) -> tuple[int, int]:
    from collectors.dataset import read_table

    frame = read_table(dataset, "service_metrics", runs=[run_id])
    out = frame.select(pl.col("step").min().alias("lo"), pl.col("step").max().alias("hi"))
    lo, hi = out.collect().row(0)
    if lo is None:
        raise DataError(f"run {run_id!r}, column 'step': no rows in service_metrics")
    return int(lo), int(hi)


def to_device(batch: StepInput) -> StepInput:
    """Moves a batch to the default device (a no-op on CPU beyond the conversion)."""
    return jax.tree.map(jnp.asarray, batch)
