"""ParquetSink, dataset reader and MemoryStore: round trips, crash safety, validation, threads."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from collectors.dataset import list_runs, read_table, table_files
from collectors.errors import DataError
from collectors.memory import MemoryStore
from collectors.schema import METRIC_COLUMNS, NODE_METRIC_COLUMNS, SCHEMA_VERSION_KEY
from collectors.sink import ParquetSink

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 12, 3, 20, 15, tzinfo=dt.UTC)
SERVICES = ("frontend", "catalog", "checkout", "payment")


def run_row(run_id: str = "tb-20261203T201500-ab12") -> dict:
    return {
        "run_id": run_id,
        "source": "testbed",
        "app": "testbed",
        "interval_s": 2.0,
        "started_at": T0,
        "services": list(SERVICES),
        "entry_service": "frontend",
        "call_graph": [
            {"source": "frontend", "target": "catalog"},
            {"source": "frontend", "target": "checkout"},
            {"source": "checkout", "target": "payment"},
        ],
        "config": json.dumps({"interval_s": 2.0}),
    }


def service_rows(run_id: str, steps: range) -> list[dict]:
    rows = []
    for step in steps:
        for i, service in enumerate(SERVICES):
            row = {name: float(step * 10 + i) for name in METRIC_COLUMNS}
            row["latency_p99_s"] = None  # a missing measurement stays null
            rows.append(
                {
                    "run_id": run_id,
                    "ts": T0 + dt.timedelta(seconds=2 * step),
                    "step": step,
                    "service": service,
                    "replicas_desired": 2,
                    "replicas_ready": 1,
                    **row,
                }
            )
    return rows


def node_rows(run_id: str, steps: range) -> list[dict]:
    return [
        {
            "run_id": run_id,
            "ts": T0 + dt.timedelta(seconds=2 * step),
            "step": step,
            "node": "testbed-node",
            **{name: 0.5 + step for name in NODE_METRIC_COLUMNS},
        }
        for step in steps
    ]


def event_row(run_id: str, **overrides) -> dict:
    row = {
        "run_id": run_id,
        "ts_start": T0,
        "ts_end": T0 + dt.timedelta(seconds=30),
        "kind": "fault",
        "type": "cpu_stress",
        "target": "checkout",
        "severity": 0.7,
        "params": json.dumps({"cores": 1}),
        "origin": "injector",
    }
    return {**row, **overrides}


def _as_dicts(frame: pl.DataFrame) -> list[dict]:
    return frame.to_dicts()


def test_round_trip_of_every_table(tmp_path):
    run_id = "tb-20261203T201500-ab12"
    written = {
        "runs": [run_row(run_id)],
        "service_metrics": service_rows(run_id, range(25)),
        "node_metrics": node_rows(run_id, range(25)),
        "events": [event_row(run_id), event_row(run_id, ts_end=None, severity=None)],
    }
    with ParquetSink(tmp_path / "ds", flush_rows=7) as sink:
        for name, rows in written.items():
            for start in range(0, len(rows), 3):
                sink.write(name, rows[start : start + 3])

    for name, rows in written.items():
        sort_by = {"runs": "run_id", "events": "severity"}.get(name, "step")
        got = read_table(tmp_path / "ds", name).collect()
        expected = pl.DataFrame(rows, schema=got.schema)
        assert got.columns[0] == "run_id"
        key = [sort_by, "service"] if name == "service_metrics" else [sort_by]
        assert _as_dicts(got.sort(key, nulls_last=True)) == _as_dicts(
            expected.sort(key, nulls_last=True)
        )
    runs = list_runs(tmp_path / "ds")
    assert runs["run_id"].to_list() == [run_id]
    assert runs["call_graph"][0].to_list()[2] == {"source": "checkout", "target": "payment"}


def test_filters_by_run_service_and_time(tmp_path):
    with ParquetSink(tmp_path, flush_rows=10) as sink:
        sink.write("service_metrics", service_rows("run-a", range(10)))
        sink.write("service_metrics", service_rows("run-b", range(10)))
        sink.write("events", [event_row("run-a"), event_row("run-b", target="payment")])

    frame = read_table(
        tmp_path,
        "service_metrics",
        runs=["run-b"],
        services="payment",
        start=T0 + dt.timedelta(seconds=4),
        end=(T0 + dt.timedelta(seconds=10)).replace(tzinfo=None),
    ).collect()
    assert frame["run_id"].unique().to_list() == ["run-b"]
    assert frame["service"].unique().to_list() == ["payment"]
    assert frame["step"].to_list() == [2, 3, 4]
    events = read_table(tmp_path, "events", services=["payment"]).collect()
    assert events["run_id"].to_list() == ["run-b"]
    assert read_table(tmp_path, "events", start=T0 + dt.timedelta(minutes=5)).collect().is_empty()
    assert read_table(tmp_path, "node_metrics").collect().is_empty()


def test_flush_every_n_rows_and_reopening_never_collides(tmp_path):
    sink = ParquetSink(tmp_path, flush_rows=8)
    sink.write("service_metrics", service_rows("r", range(2)))  # 8 rows: flushed at once
    assert read_table(tmp_path, "service_metrics").collect().height == 8
    sink.write("service_metrics", service_rows("r", range(2, 3)))  # 4 rows: buffered
    assert read_table(tmp_path, "service_metrics").collect().height == 8
    sink.close()
    with ParquetSink(tmp_path, flush_rows=8) as again:
        again.write("service_metrics", service_rows("r", range(3, 4)))
    steps = read_table(tmp_path, "service_metrics").collect()["step"]
    assert sorted(steps.unique().to_list()) == [0, 1, 2, 3]
    assert len(table_files(tmp_path, "service_metrics")) == 3


@pytest.mark.parametrize(
    ("table_name", "row", "column"),
    [
        ("events", event_row("r", type="meteor"), "type"),
        ("events", event_row("r", kind="reboot"), "kind"),
        ("events", event_row("r", origin="nobody"), "origin"),
        ("events", event_row("r", severity=1.5), "severity"),
        ("service_metrics", {**service_rows("r", range(1))[0], "cpu_cores": "lots"}, "cpu_cores"),
        ("service_metrics", {**service_rows("r", range(1))[0], "replicas_ready": 1.5}, "replicas"),
        ("service_metrics", {**service_rows("r", range(1))[0], "colour": 1}, "colour"),
        ("runs", {**run_row(), "source": "somewhere"}, "source"),
        ("runs", {**run_row(), "run_id": "../escape"}, "run_id"),
    ],
)
def test_bad_rows_raise_data_error_naming_table_and_column(tmp_path, table_name, row, column):
    with ParquetSink(tmp_path) as sink, pytest.raises(DataError, match=column) as info:
        sink.write(table_name, [row])
    assert table_name in str(info.value)
    with pytest.raises(DataError, match=column):
        MemoryStore().append(table_name, [row])


def _one_part(tmp_path: Path) -> Path:
    with ParquetSink(tmp_path / "ds") as sink:
        sink.write("service_metrics", service_rows("r", range(3)))
    (part,) = table_files(tmp_path / "ds", "service_metrics")
    return part


def test_truncated_file_gives_a_clear_error(tmp_path):
    part = _one_part(tmp_path)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable") as info:
        read_table(tmp_path / "ds", "service_metrics")
    assert str(part) in str(info.value)


def test_renamed_column_gives_a_clear_error(tmp_path):
    part = _one_part(tmp_path)
    data = pq.read_table(part)
    names = ["cpu_millicores" if n == "cpu_cores" else n for n in data.column_names]
    renamed = data.rename_columns(names).replace_schema_metadata(data.schema.metadata)
    pq.write_table(renamed, part)
    with pytest.raises(DataError, match="'cpu_cores'.*missing") as info:
        read_table(tmp_path / "ds", "service_metrics")
    assert str(part) in str(info.value)


def test_wrong_dtype_gives_a_clear_error(tmp_path):
    part = _one_part(tmp_path)
    data = pq.read_table(part)
    index = data.column_names.index("step")
    data = data.set_column(index, "step", data.column("step").cast("int32"))
    pq.write_table(data, part)
    with pytest.raises(DataError, match="'step'.*int32") as info:
        read_table(tmp_path / "ds", "service_metrics")
    assert str(part) in str(info.value)


def test_newer_schema_version_gives_a_clear_error(tmp_path):
    part = _one_part(tmp_path)
    data = pq.read_table(part)
    meta = {**data.schema.metadata, SCHEMA_VERSION_KEY: b"99"}
    pq.write_table(data.replace_schema_metadata(meta), part)
    with pytest.raises(DataError, match="version '99' is newer") as info:
        read_table(tmp_path / "ds", "service_metrics")
    assert str(part) in str(info.value)


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_storage import service_rows
from collectors.sink import ParquetSink

sink = ParquetSink({dataset!r}, flush_rows={flush_rows})
step = 0
while True:
    sink.write("service_metrics", service_rows("victim", range(step, step + 1)))
    step += 1
    print(sink.rows_written.get("service_metrics", 0), flush=True)
    if step >= {stop_step}:
        print("idle", flush=True)
        time.sleep(60)
"""


def _start_writer(dataset: Path, flush_rows: int, stop_step: int) -> subprocess.Popen:
    script = WRITER.format(
        root=str(ROOT), dataset=str(dataset), flush_rows=flush_rows, stop_step=stop_step
    )
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.mark.timeout(120)
def test_sigkill_mid_run_leaves_readable_files_and_every_flushed_row(tmp_path):
    dataset = tmp_path / "ds"
    writer = _start_writer(dataset, flush_rows=12, stop_step=10**9)
    flushed = 0
    try:
        for line in writer.stdout:
            flushed = int(line)
            if flushed >= 600:
                break
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()

    frame = read_table(dataset, "service_metrics").collect()
    assert frame.height >= flushed
    steps = frame["step"].unique().sort().to_list()
    assert steps == list(range(len(steps)))  # a prefix: nothing flushed was lost
    assert frame.group_by("step").len()["len"].to_list() == [len(SERVICES)] * len(steps)
    visible = [p for p in (dataset / "service_metrics").rglob("*") if p.is_file()]
    assert all(p.name.startswith("part-") or p.name.endswith(".tmp") for p in visible)


@pytest.mark.timeout(120)
def test_sigterm_flushes_and_exits(tmp_path):
    dataset = tmp_path / "ds"
    writer = _start_writer(dataset, flush_rows=10**6, stop_step=30)
    try:
        lines = []
        for line in writer.stdout:
            lines.append(line.strip())
            if lines[-1] == "idle":
                break
        assert lines[-2:] == ["0", "idle"]  # 30 steps buffered, none flushed yet
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        writer.kill()
        writer.wait()

    frame = read_table(dataset, "service_metrics").collect()
    assert frame.height == 30 * len(SERVICES)
    assert frame["step"].unique().sort().to_list() == list(range(30))


def test_sigterm_inside_a_sink_call_is_handled_when_the_call_ends(tmp_path):
    sink = ParquetSink(tmp_path, flush_rows=10**6)
    try:
        sink.write("service_metrics", service_rows("r", range(3)))
        with pytest.raises(SystemExit) as info, sink._guard():
            sink._on_sigterm(signal.SIGTERM, None)  # as if delivered in the middle of a write
            assert table_files(tmp_path, "service_metrics") == []
        assert info.value.code == 128 + signal.SIGTERM
        assert read_table(tmp_path, "service_metrics").collect().height == 12
    finally:
        sink.close()
    assert signal.getsignal(signal.SIGTERM) != sink._on_sigterm


def test_memory_store_queries(tmp_path):
    store = MemoryStore(capacity_steps=5)
    assert store.latest().is_empty()
    for step in range(8):
        store.append("service_metrics", service_rows("a", range(step, step + 1)))
    store.append("service_metrics", service_rows("b", range(3)))
    store.append("events", [event_row("a")])
    store.append("runs", [run_row("a")])

    assert store.latest()["run_id"].unique().to_list() == ["b"]
    latest = store.latest("a")
    assert latest["step"].unique().to_list() == [7]
    assert latest["service"].to_list() == list(SERVICES)
    window = store.window("checkout", 3, run_id="a")
    assert window["step"].to_list() == [5, 6, 7]
    assert window["service"].unique().to_list() == ["checkout"]
    assert store.window("checkout", 100, run_id="a")["step"].to_list() == [3, 4, 5, 6, 7]
    frame = store.frame()
    assert frame.height == 5 * 4 + 3 * 4
    assert frame.schema == read_table(tmp_path, "service_metrics").collect_schema()
    assert store.frame("events").height == 1
    assert store.frame("runs")["run_id"].to_list() == ["a"]
    assert store.runs() == ["a", "b"]


@pytest.mark.timeout(120)
def test_memory_store_concurrent_reads_while_written():
    store = MemoryStore(capacity_steps=20)
    steps_total = 400
    done = threading.Event()
    failures: list[str] = []
    reads: list[int] = []

    def writer() -> None:
        for step in range(steps_total):
            store.append("service_metrics", service_rows("r", range(step, step + 1)))
        done.set()

    def reader() -> None:
        while not done.is_set():
            latest = store.latest("r")
            if latest.height and sorted(latest["service"].to_list()) != sorted(SERVICES):
                failures.append(f"partial latest step: {latest['service'].to_list()}")
            steps = store.window("payment", 10, run_id="r")["step"].to_list()
            if steps != list(range(steps[0], steps[0] + len(steps))) if steps else False:
                failures.append(f"window not contiguous: {steps}")
            frame = store.frame()
            if frame.height % len(SERVICES) or frame.height > 20 * len(SERVICES):
                failures.append(f"frame of {frame.height} rows")
            reads.append(1)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    writer()
    for thread in threads:
        thread.join()
    assert failures == []
    assert reads
    assert store.latest("r")["step"].to_list() == [steps_total - 1] * len(SERVICES)
    assert store.frame()["step"].min() == steps_total - 20
