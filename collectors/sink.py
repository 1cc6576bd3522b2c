"""`ParquetSink`: append rows of the four tables to a hive-partitioned Parquet dataset.

Layout (see `collectors.schema`): `<dataset>/<table>/run_id=<id>/part-<n>-<token>.parquet`. The
partition column `run_id` lives in the directory name, not in the files. `<n>` is the write time
in nanoseconds (strictly increasing within one sink) and `<token>` is random, so parts written by
several processes, or by one dataset reopened many times, never collide, and sorting the names
gives the order of writing.

Durability: every file is written under a hidden temporary name in its final directory, fsynced,
renamed with `os.replace` and the directory fsynced. A reader that lists `part-*.parquet` therefore
never sees half a file, and a writer killed at any instant loses at most the rows it had not
flushed yet. The sink flushes a table every `flush_rows` buffered rows, on `flush()`, on
`close()` and on SIGTERM (when it is created in the main thread; the previous handler is chained).

Rows are validated when they are written, not when they are flushed: an unknown column, a value
of the wrong type, a value outside a closed set (`runs.source`, `events.kind/type/origin`) or a
severity outside [0, 1] raises `DataError` naming the table and the column.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collectors.errors import DataError
from collectors.schema import (
    EVENT_KINDS,
    EVENT_ORIGINS,
    EVENT_TYPES,
    PARTITION_COLUMN,
    SOURCES,
    table,
)

log = logging.getLogger(__name__)

Rows = Sequence[Mapping[str, Any]] | pa.Table | pl.DataFrame

# Columns restricted to a closed set of values, per table.
CLOSED_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "runs": {"source": SOURCES},
    "events": {"kind": EVENT_KINDS, "type": EVENT_TYPES, "origin": EVENT_ORIGINS},
}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
COMPRESSION = "zstd"


def file_schema(table_name: str) -> pa.Schema:
    """The schema stored in each file of `table_name`: the table's columns less `run_id`,
    with the schema version in the metadata."""
    full = table(table_name).schema_with_version()
    return full.remove(full.get_field_index(PARTITION_COLUMN))


def to_arrow(table_name: str, rows: Rows) -> pa.Table:
    """Validate `rows` of `table_name` and return them as an Arrow table in the table's schema.

    `rows` is a list of dicts (a missing key is null), a `pyarrow.Table` or a `polars.DataFrame`
    (a missing column is null). Raises `DataError` naming the table and column at fault.
    """
    spec = table(table_name)
    if isinstance(rows, pl.DataFrame):
        rows = rows.to_arrow()
    if isinstance(rows, pa.Table):
        data = _columns_from_arrow(table_name, rows)
    else:
        data = _columns_from_dicts(table_name, rows)
    out = pa.table(data, schema=spec.schema)
    _check_values(table_name, out)
    return out


def _columns_from_dicts(table_name: str, rows: Sequence[Mapping[str, Any]]) -> list[pa.Array]:
    spec = table(table_name)
    known = set(spec.columns)
    for row in rows:
        unknown = set(row) - known
        if unknown:
            raise DataError(f"table {table_name!r}: unknown column(s) {sorted(unknown)}")
    arrays = []
    for field in spec.schema:
        values = [row.get(field.name) for row in rows]
        arrays.append(_array(table_name, field, values))
    return arrays


def _array(table_name: str, field: pa.Field, values: list[Any]) -> pa.Array:
    if pa.types.is_integer(field.type):
        # pyarrow would truncate 1.5 to 1 silently.
        fractional = [v for v in values if isinstance(v, float) and not v.is_integer()]
        if fractional:
            raise DataError(
                f"table {table_name!r}, column {field.name!r}: non-integer value(s) "
                f"{fractional[:3]} for {field.type}"
            )
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as err:
        raise DataError(
            f"table {table_name!r}, column {field.name!r}: values do not fit {field.type}: {err}"
        ) from None


def _columns_from_arrow(table_name: str, rows: pa.Table) -> list[pa.Array]:
    spec = table(table_name)
    unknown = set(rows.column_names) - set(spec.columns)
    if unknown:
        raise DataError(f"table {table_name!r}: unknown column(s) {sorted(unknown)}")
    arrays = []
    for field in spec.schema:
        if field.name not in rows.column_names:
            arrays.append(pa.nulls(rows.num_rows, type=field.type))
            continue
        column = rows.column(field.name)
        try:
            arrays.append(column.cast(field.type, safe=True).combine_chunks())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
            raise DataError(
                f"table {table_name!r}, column {field.name!r}: {column.type} does not cast to "
                f"{field.type}: {err}"
            ) from None
    return arrays


def _check_values(table_name: str, data: pa.Table) -> None:
    run_ids = data.column(PARTITION_COLUMN)
    if run_ids.null_count:
        raise DataError(f"table {table_name!r}, column 'run_id': null run id")
    for run_id in pc.unique(run_ids).to_pylist():
        if not _RUN_ID.match(run_id):
            raise DataError(
                f"table {table_name!r}, column 'run_id': {run_id!r} is not a valid run id "
                "(letters, digits and ._:+- only, starting with a letter or digit)"
            )
    for column, allowed in CLOSED_SETS.get(table_name, {}).items():
        values = data.column(column)
        bad = pc.invert(pc.is_in(values, value_set=pa.array(allowed))).fill_null(True)
        if pc.any(bad).as_py():
            found = sorted({str(v) for v in values.filter(bad).to_pylist()})
            raise DataError(
                f"table {table_name!r}, column {column!r}: value(s) {found} not in {list(allowed)}"
            )
    if table_name == "events":
        severity = data.column("severity")
        outside = pc.or_(pc.less(severity, 0.0), pc.greater(severity, 1.0))
        if pc.any(outside).as_py():
            raise DataError("table 'events', column 'severity': values outside [0, 1]")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(directory: Path, data: pa.Table, part_n: int) -> Path:
    """Write `data` atomically as `<directory>/part-<part_n>-<token>.parquet` and return its path.

    The file is written to a hidden temporary name, fsynced, then renamed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{part_n:020d}-{uuid.uuid4().hex[:8]}.parquet"
    final = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            pq.write_table(data, handle, compression=COMPRESSION)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    return final


class ParquetSink:
    """Buffers rows per table and appends them as Parquet parts of a hive-partitioned dataset.

    Use it as a context manager or call `close()`. Safe to share between threads. Created in the
    main thread it installs a SIGTERM handler that flushes every table and then chains to the
    previous handler (the default action becomes `SystemExit(143)`, so `finally` blocks run).

    Args:
        dataset: the dataset folder (created if missing).
        flush_rows: a table is written out once this many of its rows are buffered.

    `rows_written[table]` counts the rows of each table that are on disk. Rows still buffered
    when the process dies without `close()` (or SIGTERM) are lost; nothing else is.
    """

    def __init__(self, dataset: str | Path, flush_rows: int = 1000):
        if flush_rows < 1:
            raise DataError(f"ParquetSink: flush_rows must be >= 1, got {flush_rows}")
        self.dataset = Path(dataset)
        self.dataset.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.rows_written: dict[str, int] = {}
        self._buffers: dict[str, list[pa.Table]] = {}
        self._buffered: dict[str, int] = {}
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._pending_signal: int | None = None
        self._last_part_n = 0
        self._closed = False
        self._previous_handler: Any = None
        self._installed_handler = False
        self._install_sigterm()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, table_name: str, rows: Rows) -> None:
        """Validate and buffer `rows` of `table_name`; flush the table once `flush_rows` are
        buffered. Each row carries `run_id`; missing columns are null."""
        data = to_arrow(table_name, rows)
        with self._guard():
            if self._closed:
                raise DataError(f"ParquetSink({self.dataset}): write after close")
            self._buffers.setdefault(table_name, []).append(data)
            self._buffered[table_name] = self._buffered.get(table_name, 0) + data.num_rows
            if self._buffered[table_name] >= self.flush_rows:
                self._flush_table(table_name)

    def flush(self) -> None:
        """Write every buffered row to disk."""
        with self._guard():
            for table_name in list(self._buffers):
                self._flush_table(table_name)

    def close(self) -> None:
        """Flush, then restore the SIGTERM handler this sink replaced. Idempotent."""
        with self._guard():
            if self._closed:
                return
            self.flush()
            self._closed = True
        self._uninstall_sigterm()

    def _flush_table(self, table_name: str) -> None:
        chunks = self._buffers.get(table_name)
        if not chunks:
            return
        data = pa.concat_tables(chunks)
        target = file_schema(table_name)
        for run_id in pc.unique(data.column(PARTITION_COLUMN)).to_pylist():
            part = data.filter(pc.equal(data.column(PARTITION_COLUMN), run_id))
            part = part.drop_columns([PARTITION_COLUMN]).cast(target)
            directory = self.dataset / table_name / f"{PARTITION_COLUMN}={run_id}"
            write_part(directory, part, self._next_part_n())
        # The rows leave the buffer only once every file holding them is renamed into place.
        del self._buffers[table_name]
        self._buffered[table_name] = 0
        self.rows_written[table_name] = self.rows_written.get(table_name, 0) + data.num_rows
        log.debug("flushed %d rows of %s to %s", data.num_rows, table_name, self.dataset)

    def _next_part_n(self) -> int:
        self._last_part_n = max(self._last_part_n + 1, time.time_ns())
        return self._last_part_n

    def _guard(self) -> _Guard:
        return _Guard(self)

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed_handler = True

    def _uninstall_sigterm(self) -> None:
        if not getattr(self, "_installed_handler", False):
            return
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._installed_handler = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._owner == threading.get_ident():
            # The main thread was interrupted inside the sink: finish that call first.
            self._pending_signal = signum
            return
        if not self._closed:
            log.info("SIGTERM: flushing %s", self.dataset)
            self.flush()
        self._chain(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def _after_guard(self) -> None:
        signum = self._pending_signal
        if signum is not None:
            self._pending_signal = None
            self._on_sigterm(signum, None)


class _Guard:
    """Holds the sink's lock and records the owning thread, so that a SIGTERM arriving in the
    middle of a sink call is handled once the call is done."""

    def __init__(self, sink: ParquetSink):
        self.sink = sink
        self.outer = False

    def __enter__(self) -> None:
        self.sink._lock.acquire()
        if self.sink._owner is None:
            self.sink._owner = threading.get_ident()
            self.outer = True

    def __exit__(self, *exc: object) -> None:
        if self.outer:
            self.sink._owner = None
        self.sink._lock.release()
        if self.outer:
            self.sink._after_guard()
