"""The sampling loop: read every source at a fixed interval, write MemoryStore + ParquetSink.

Step k is scheduled at `t0 + k * interval_s`, so the loop never drifts. A step that starts more
than `late_tolerance_s` after its schedule (because the previous one overran) still runs, is
counted in `CollectorStats.late_steps` and logged; no step is ever skipped. A source that fails
nulls its columns for the step (with a warning) and is retried with exponential back-off
(`collectors.sources.base.Backoff`). When several sources give the same column, the first
source in the list that has a value wins.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from collectors.errors import KubeworldError
from collectors.schema import METRIC_COLUMNS, NODE_METRIC_COLUMNS, REPLICA_COLUMNS
from collectors.sources.base import Backoff, Sample, Source

log = logging.getLogger(__name__)

StepHook = Callable[[int, float, list[dict[str, Any]]], None]


class Clock(Protocol):
    """Wall time in epoch seconds and an interruptible wait."""

    def now(self) -> float: ...

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Wait `seconds` or until `stop` is set; True when stopped."""
        ...


class SystemClock:
    """Epoch seconds that never jump: the wall time at creation plus monotonic time since."""

    def __init__(self):
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        return stop.wait(max(0.0, seconds))


class FakeClock:
    """A clock for tests: `wait` advances time at once; `advance` simulates slow work."""

    def __init__(self, start_s: float = 1.7e9):
        self.t = start_s

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        self.t += max(0.0, seconds)
        return stop.is_set()


def new_run_id(prefix: str = "tb", clock_s: float | None = None) -> str:
    """A short run id like `tb-20261203T201500-ab12`."""
    moment = datetime.fromtimestamp(clock_s if clock_s is not None else time.time(), UTC)
    return f"{prefix}-{moment:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"


def utc(ts_s: float) -> datetime:
    """Epoch seconds -> an aware UTC datetime at millisecond precision."""
    return datetime.fromtimestamp(round(ts_s, 3), UTC)


@dataclass(frozen=True)
class RunInfo:
    """What the `runs` row records about a collection run."""

    run_id: str
    source: str
    app: str
    interval_s: float
    services: tuple[str, ...]
    entry_service: str
    call_graph: tuple[tuple[str, str], ...] = ()
    config: dict = field(default_factory=dict)

    def row(self, started_at_s: float) -> dict[str, Any]:
        """The `runs` table row."""
        return {
            "run_id": self.run_id,
            "source": self.source,
            "app": self.app,
            "interval_s": float(self.interval_s),
            "started_at": utc(started_at_s),
            "services": list(self.services),
            "entry_service": self.entry_service,
            "call_graph": [{"source": a, "target": b} for a, b in self.call_graph],
            "config": json.dumps(self.config, default=str, sort_keys=True),
        }


@dataclass
class CollectorStats:
    """Counters of a run: steps written, late steps, source failures, step durations."""

    steps: int = 0
    late_steps: int = 0
    source_failures: int = 0
    null_values: int = 0
    step_durations_s: list[float] = field(default_factory=list)


class Collector:
    """Sample `sources` every `interval_s` for a run and write the rows.

    Args:
        run: the run's description (written to `runs` when the run starts).
        sources: read in order each step; earlier sources win on shared columns.
        store: a `MemoryStore` (or None); sink: a `ParquetSink` (or None).
        clock: `SystemClock()` by default; tests pass a `FakeClock`.
        on_step: hooks called after each step's rows are written, `hook(step, ts_s, rows)`;
            a hook that raises a `KubeworldError` is logged and the loop goes on.
        late_tolerance_s: a step starting later than this after its schedule is late
            (default a quarter of the interval).
        backoff_max_s: longest wait before retrying a failed source (default 8 intervals).
        stop_event: setting it ends the run after the current step (as `stop()` does).
    """

    def __init__(
        self,
        run: RunInfo,
        sources: Sequence[Source],
        store=None,
        sink=None,
        clock: Clock | None = None,
        on_step: Sequence[StepHook] = (),
        late_tolerance_s: float | None = None,
        backoff_max_s: float | None = None,
        stop_event: threading.Event | None = None,
    ):
        self.run_info = run
        self.sources = list(sources)
        self.store = store
        self.sink = sink
        self.clock = clock or SystemClock()
        self.on_step = list(on_step)
        self.interval_s = run.interval_s
        self.late_tolerance_s = (
            late_tolerance_s if late_tolerance_s is not None else 0.25 * run.interval_s
        )
        max_s = backoff_max_s if backoff_max_s is not None else 8 * run.interval_s
        self.backoff = {id(s): Backoff(run.interval_s, max_s) for s in self.sources}
        self.stats = CollectorStats()
        self.stop_event = stop_event or threading.Event()
        self._null_now: set[tuple[str, str, str]] = set()
        self._nodes: set[str] = set()  # every node seen: a node missing at a step gets nulls

    # -- the loop ----------------------------------------------------------------------------

    def run(
        self,
        duration_s: float | None = None,
        n_steps: int | None = None,
        progress: Callable[[int, CollectorStats], None] | None = None,
    ) -> CollectorStats:
        """Collect `n_steps` steps (or `duration_s / interval_s`, or until `stop()`).

        Sources are read once before step 0 (not written) so that rates exist from step 0.
        Returns the run's counters. Ends early, cleanly, when `stop()` is called.
        """
        if n_steps is None and duration_s is not None:
            n_steps = max(1, math.ceil(duration_s / self.interval_s))
        self._prime()
        t0_s = self.clock.now() + self.interval_s
        self._write("runs", [self.run_info.row(t0_s)])
        k = 0
        while n_steps is None or k < n_steps:
            scheduled_s = t0_s + k * self.interval_s
            if self.clock.wait(scheduled_s - self.clock.now(), self.stop_event):
                break
            self.step(k, scheduled_s)
            if progress is not None:
                progress(k, self.stats)
            k += 1
        self._report()
        return self.stats

    def stop(self) -> None:
        """Ask the loop to end after the current step (safe from any thread or signal handler)."""
        self.stop_event.set()

    def step(self, k: int, scheduled_s: float) -> list[dict[str, Any]]:
        """Sample, merge and write step `k`; returns its service rows."""
        started_s = self.clock.now()
        lateness_s = started_s - scheduled_s
        if lateness_s > self.late_tolerance_s:
            self.stats.late_steps += 1
            log.warning("step %d started %.3f s late (previous step overran)", k, lateness_s)

        samples = [self._read(source, started_s, scheduled_s) for source in self.sources]
        service_rows = self._service_rows(k, started_s, samples)
        node_rows = self._node_rows(k, started_s, samples)
        self._write("service_metrics", service_rows)
        if node_rows:
            self._write("node_metrics", node_rows)
        self.stats.steps += 1
        self._run_hooks(k, started_s, service_rows)
        self.stats.step_durations_s.append(self.clock.now() - started_s)
        return service_rows

    # -- parts of a step ---------------------------------------------------------------------

    def _prime(self) -> None:
        now_s = self.clock.now()
        for source in self.sources:
            try:
                source.sample(now_s)
            except KubeworldError as err:
                log.warning("source %s not readable before the run: %s", source.name, err)

    def _read(self, source: Source, now_s: float, scheduled_s: float) -> Sample | None:
        backoff = self.backoff[id(source)]
        if not backoff.ready(scheduled_s):
            return None
        try:
            sample = source.sample(now_s)
        except KubeworldError as err:
            self.stats.source_failures += 1
            delay_s = backoff.failed(scheduled_s)
            log.warning(
                "source %s failed (%s); its columns are null, retry in %.1f s",
                source.name,
                err,
                delay_s,
            )
            return None
        if backoff.failures:
            log.info("source %s readable again", source.name)
        backoff.succeeded()
        for what in sample.missing:
            log.warning("source %s: could not read %s", source.name, what)
        return sample

    def _service_rows(self, k: int, ts_s: float, samples: list[Sample | None]) -> list[dict]:
        rows = []
        for service in self.run_info.services:
            row: dict[str, Any] = {
                "run_id": self.run_info.run_id,
                "ts": utc(ts_s),
                "step": k,
                "service": service,
            }
            for column in (*REPLICA_COLUMNS, *METRIC_COLUMNS):
                value = _first(samples, "services", service, column)
                if value is not None and column in REPLICA_COLUMNS:
                    value = round(value)
                row[column] = value
                self._track_null("service", service, column, value)
            rows.append(row)
        return rows

    def _node_rows(self, k: int, ts_s: float, samples: list[Sample | None]) -> list[dict]:
        self._nodes.update(n for s in samples if s is not None for n in s.nodes)
        rows = []
        for node in sorted(self._nodes):
            row: dict[str, Any] = {
                "run_id": self.run_info.run_id,
                "ts": utc(ts_s),
                "step": k,
                "node": node,
            }
            for column in NODE_METRIC_COLUMNS:
                row[column] = _first(samples, "nodes", node, column)
            rows.append(row)
        return rows

    def _track_null(self, kind: str, name: str, column: str, value: float | None) -> None:
        key = (kind, name, column)
        if value is None:
            self.stats.null_values += 1
            if key not in self._null_now:
                self._null_now.add(key)
                log.warning("%s %s: %s is null from now on", kind, name, column)
        elif key in self._null_now:
            self._null_now.discard(key)
            log.info("%s %s: %s has values again", kind, name, column)

    def _write(self, table_name: str, rows: list[dict[str, Any]]) -> None:
        if self.store is not None:
            self.store.append(table_name, rows)
        if self.sink is not None:
            self.sink.write(table_name, rows)

    def _run_hooks(self, k: int, ts_s: float, rows: list[dict[str, Any]]) -> None:
        for hook in self.on_step:
            try:
                hook(k, ts_s, rows)
            except KubeworldError as err:
                log.warning("step %d: hook %s failed: %s", k, getattr(hook, "__name__", hook), err)

    def _report(self) -> None:
        durations = self.stats.step_durations_s
        mean_ms = 1000 * sum(durations) / len(durations) if durations else float("nan")
        log.info(
            "run %s: %d steps, %d late, %d source failures, mean step %.1f ms",
            self.run_info.run_id,
            self.stats.steps,
            self.stats.late_steps,
            self.stats.source_failures,
            mean_ms,
        )


def _first(samples: list[Sample | None], kind: str, name: str, column: str) -> float | None:
    """The first non-null value of `column` for `name` among the samples, or None."""
    for sample in samples:
        if sample is None:
            continue
        value = getattr(sample, kind).get(name, {}).get(column)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None
