"""Read a kubeworld dataset as polars lazy frames, validated against `collectors.schema`.

`read_table` lists the parts of the selected runs (`<dataset>/<table>/run_id=<id>/part-*.parquet`),
checks each file's footer with `pyarrow.parquet.read_schema` (cheap: it reads the footer only),
then builds one lazy scan over them, so datasets larger than memory stay lazy. A file that
cannot be read, lacks a column, has a column of another dtype, or carries no or an unknown
schema version raises `DataError` naming the file and the column.

Columns come out in the table's schema order with `run_id` first (from the partition path).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from collectors.errors import DataError
from collectors.schema import PARTITION_COLUMN, SCHEMA_VERSION, SCHEMA_VERSION_KEY, table
from collectors.sink import file_schema

# Column that `services=` filters on, per table.
SERVICE_COLUMN = {"service_metrics": "service", "events": "target"}
# Column that `start=`/`end=` filter on, per table (events: by overlap of [ts_start, ts_end]).
TIME_COLUMN = {"service_metrics": "ts", "node_metrics": "ts", "runs": "started_at"}
TimeLike = dt.datetime | str


def polars_schema(table_name: str) -> pl.Schema:
    """The polars schema of `table_name` (as `read_table` returns it)."""
    return pl.from_arrow(table(table_name).schema.empty_table()).schema


def validate_file(path: Path, table_name: str) -> None:
    """Check one part's footer against `table_name`'s file schema; raise `DataError` naming the
    file (and the column) at fault."""
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: unreadable Parquet file of table {table_name!r}: {err}") from None

    version = (found.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version is None:
        raise DataError(
            f"{path}: no schema version in the file metadata (key {SCHEMA_VERSION_KEY!r})"
        )
    if version.decode() != str(SCHEMA_VERSION):
        newer = version.decode().isdigit() and int(version) > SCHEMA_VERSION
        what = "newer than" if newer else "unknown to"
        raise DataError(
            f"{path}: schema version {version.decode()!r} is {what} this reader "
            f"(version {SCHEMA_VERSION})"
        )

    for field in file_schema(table_name):
        index = found.get_field_index(field.name)
        if index < 0:
            raise DataError(f"{path}: column {field.name!r} of table {table_name!r} is missing")
        if not found.field(index).type.equals(field.type):
            raise DataError(
                f"{path}: column {field.name!r} of table {table_name!r} has dtype "
                f"{found.field(index).type}, expected {field.type}"
            )


def table_files(
    dataset: str | Path, table_name: str, runs: Iterable[str] | None = None
) -> list[Path]:
    """The parts of `table_name` in `dataset`, of the given runs (all when None), in write order
    within each run. Raises `DataError` when the dataset folder does not exist."""
    root = Path(dataset)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    table(table_name)
    wanted = None if runs is None else {runs} if isinstance(runs, str) else set(runs)
    files: list[Path] = []
    for partition in sorted((root / table_name).glob(f"{PARTITION_COLUMN}=*")):
        run_id = partition.name.split("=", 1)[1]
        if wanted is None or run_id in wanted:
            files.extend(sorted(partition.glob("part-*.parquet")))
    return files


def read_table(
    dataset: str | Path,
    table_name: str,
    runs: Iterable[str] | str | None = None,
    services: Iterable[str] | str | None = None,
    start: TimeLike | None = None,
    end: TimeLike | None = None,
) -> pl.LazyFrame:
    """A validated lazy frame of `table_name` in `dataset`.

    Args:
        dataset: the dataset folder.
        table_name: one of `collectors.schema.TABLES`.
        runs: run ids to keep (all when None); other runs' files are not even opened.
        services: services to keep (`service_metrics.service`, `events.target`).
        start: keep samples at or after this UTC time (naive datetimes and ISO strings are
            taken as UTC); events that end at or after it.
        end: keep samples strictly before this time; events that start before it.
    """
    files = table_files(dataset, table_name, runs)
    for path in files:
        validate_file(path, table_name)
    if not files:
        return pl.LazyFrame(schema=polars_schema(table_name))

    frame = pl.scan_parquet(
        files,
        hive_partitioning=True,
        hive_schema={PARTITION_COLUMN: pl.String},
        try_parse_hive_dates=False,
        extra_columns="ignore",
    ).select(table(table_name).columns)
    return _filtered(frame, table_name, services, start, end)


def _filtered(
    frame: pl.LazyFrame,
    table_name: str,
    services: Iterable[str] | str | None,
    start: TimeLike | None,
    end: TimeLike | None,
) -> pl.LazyFrame:
    if services is not None:
        if table_name not in SERVICE_COLUMN:
            raise DataError(f"table {table_name!r} has no service column to filter on")
        wanted = [services] if isinstance(services, str) else list(services)
        frame = frame.filter(pl.col(SERVICE_COLUMN[table_name]).is_in(wanted))
    if table_name == "events":
        if start is not None:
            ts_end = pl.col("ts_end")
            frame = frame.filter(ts_end.is_null() | (ts_end >= _utc(start)))
        if end is not None:
            frame = frame.filter(pl.col("ts_start") < _utc(end))
        return frame
    if start is not None:
        frame = frame.filter(pl.col(TIME_COLUMN[table_name]) >= _utc(start))
    if end is not None:
        frame = frame.filter(pl.col(TIME_COLUMN[table_name]) < _utc(end))
    return frame


def _utc(value: TimeLike) -> pl.Expr:
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return pl.lit(moment.astimezone(dt.UTC), dtype=pl.Datetime("ms", "UTC"))


def list_runs(dataset: str | Path) -> pl.DataFrame:
    """The `runs` table of `dataset`, collected, ordered by start time."""
    return read_table(dataset, "runs").collect().sort("started_at", "run_id")


def run_summary(dataset: str | Path, run_id: str) -> dict[str, int]:
    """Counts of one run: `steps`, `services`, `nodes`, `events` and `rows` of service metrics."""
    metrics = read_table(dataset, "service_metrics", runs=run_id).select("step", "service")
    counts = metrics.select(
        steps=pl.col("step").n_unique(), services=pl.col("service").n_unique(), rows=pl.len()
    ).collect()
    nodes = read_table(dataset, "node_metrics", runs=run_id).select(pl.col("node").n_unique())
    events = read_table(dataset, "events", runs=run_id).select(pl.len())
    return {
        **{name: int(counts[name][0]) for name in ("steps", "services", "rows")},
        "nodes": int(nodes.collect().item()),
        "events": int(events.collect().item()),
    }
