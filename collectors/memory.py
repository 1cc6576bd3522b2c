"""`MemoryStore`: the recent window of a collection in memory, for agents and online training.

It holds, per run, the last `capacity_steps` steps of `service_metrics` and `node_metrics`, the
last `capacity_steps` rows of `events` and the latest row of `runs`. Rows are validated exactly
as `ParquetSink` validates them (`collectors.sink.to_arrow`), so what the store holds is what the
dataset would hold.

Threading: one writer thread calls `append`; any number of reader threads call the queries. A
lock guards the containers; readers copy the rows they need under it and build their polars
frame outside it, so a reader never sees half an append and never blocks the writer for long.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import polars as pl
import pyarrow as pa

from collectors.errors import DataError
from collectors.schema import table
from collectors.sink import Rows, to_arrow

STEP_TABLES = ("service_metrics", "node_metrics")


class MemoryStore:
    """The last `capacity_steps` steps per run, queried as polars frames.

    Args:
        capacity_steps: steps kept per run (older steps are dropped first); also the number of
            events kept per run.
    """

    def __init__(self, capacity_steps: int = 600):
        if capacity_steps < 1:
            raise DataError(f"MemoryStore: capacity_steps must be >= 1, got {capacity_steps}")
        self.capacity_steps = capacity_steps
        self._lock = threading.Lock()
        # table -> run_id -> step -> rows of that step
        self._steps: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {
            name: {} for name in STEP_TABLES
        }
        self._events: dict[str, deque[dict[str, Any]]] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._last_run: str | None = None

    def append(self, table_name: str, rows: Rows) -> None:
        """Validate and add `rows` of `table_name` (dicts with `run_id`, an Arrow table or a
        polars frame); raises `DataError` naming the table and column at fault."""
        data = to_arrow(table_name, rows).to_pylist()
        with self._lock:
            if table_name in STEP_TABLES:
                self._add_steps(table_name, data)
            elif table_name == "events":
                for row in data:
                    per_run = self._events.setdefault(row["run_id"], deque())
                    per_run.append(row)
                    while len(per_run) > self.capacity_steps:
                        per_run.popleft()
            else:
                for row in data:
                    self._runs[row["run_id"]] = row

    def _add_steps(self, table_name: str, data: list[dict[str, Any]]) -> None:
        for row in data:
            if row["step"] is None:
                raise DataError(f"table {table_name!r}, column 'step': null step")
            per_run = self._steps[table_name].setdefault(row["run_id"], {})
            per_run.setdefault(row["step"], []).append(row)
            if table_name == "service_metrics":
                self._last_run = row["run_id"]
        for per_run in self._steps[table_name].values():
            while len(per_run) > self.capacity_steps:
                del per_run[min(per_run)]

    def runs(self) -> list[str]:
        """Run ids with service metrics held, in the order they first appeared."""
        with self._lock:
            return list(self._steps["service_metrics"])

    def latest(self, run_id: str | None = None) -> pl.DataFrame:
        """`service_metrics` rows of the newest step of `run_id` (default: the run appended to
        last); empty with the table's schema when nothing is held."""
        with self._lock:
            per_run = self._steps["service_metrics"].get(run_id or self._last_run or "", {})
            rows = list(per_run[max(per_run)]) if per_run else []
        return _frame("service_metrics", rows)

    def window(self, service: str, n: int, run_id: str | None = None) -> pl.DataFrame:
        """The last `n` steps of `service` in `run_id` (default: the run appended to last),
        oldest first; fewer rows when fewer steps are held."""
        with self._lock:
            per_run = self._steps["service_metrics"].get(run_id or self._last_run or "", {})
            steps = sorted(per_run)[-n:] if n > 0 else []
            rows = [row for step in steps for row in per_run[step] if row["service"] == service]
        return _frame("service_metrics", rows)

    def frame(self, table_name: str = "service_metrics") -> pl.DataFrame:
        """Every row held of `table_name`, by run and then step (or start time)."""
        table(table_name)
        with self._lock:
            if table_name in STEP_TABLES:
                rows = [
                    row
                    for per_run in self._steps[table_name].values()
                    for step in sorted(per_run)
                    for row in per_run[step]
                ]
            elif table_name == "events":
                rows = [row for per_run in self._events.values() for row in per_run]
            else:
                rows = list(self._runs.values())
        return _frame(table_name, rows)


def _frame(table_name: str, rows: list[dict[str, Any]]) -> pl.DataFrame:
    schema = table(table_name).schema
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema))
