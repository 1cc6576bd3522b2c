"""The Parquet data contract: the four tables of a dataset, their columns, dtypes and units.

Every reader and writer in kubeworld takes its columns from here. A dataset is a folder holding
one hive-partitioned Parquet dataset per table, `<dataset>/<table>/run_id=<id>/part-<n>.parquet`.
Each file carries `SCHEMA_VERSION` in its key-value metadata under `SCHEMA_VERSION_KEY`.

Units are in the column names (`_s` seconds, `_rps` requests per second, `_bytes`, `_cores`).
A measurement that could not be taken is null, never zero and never a dropped row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"kubeworld.schema_version"
PARTITION_COLUMN = "run_id"

TS = pa.timestamp("ms", tz="UTC")

# Per-service metrics the dynamics model predicts, in the model's feature order.
METRIC_COLUMNS: tuple[str, ...] = (
    "request_rate_rps",
    "throughput_rps",
    "error_ratio",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "cpu_cores",
    "memory_bytes",
    "net_rx_bytes_per_s",
    "net_tx_bytes_per_s",
)
# Per-service cluster state: inputs of the model (set by the action), never predicted.
REPLICA_COLUMNS: tuple[str, ...] = ("replicas_desired", "replicas_ready")

NODE_METRIC_COLUMNS: tuple[str, ...] = (
    "cpu_utilization",
    "memory_utilization",
    "net_rx_bytes_per_s",
    "net_tx_bytes_per_s",
)

# Closed sets of the `events` table.
FAULT_TYPES: tuple[str, ...] = (
    "pod_kill",
    "cpu_stress",
    "memory_leak",
    "latency",
    "error",
    "network_delay",
)
EVENT_KINDS: tuple[str, ...] = ("fault", "scale")
EVENT_TYPES: tuple[str, ...] = (*FAULT_TYPES, "scale")
EVENT_ORIGINS: tuple[str, ...] = ("injector", "agent", "hpa", "explorer", "import")
SOURCES: tuple[str, ...] = ("testbed", "prometheus", "scrape", "kubernetes", "reference", "nezha")


@dataclass(frozen=True)
class Table:
    """One table of a dataset: its name, its Arrow schema and what one row stands for."""

    name: str
    schema: pa.Schema
    row: str

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    def schema_with_version(self) -> pa.Schema:
        """The schema with the schema version in its metadata, as written to every file."""
        return self.schema.with_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


RUNS = Table(
    name="runs",
    row="collection run",
    schema=pa.schema(
        [
            ("run_id", pa.string()),
            ("source", pa.string()),
            ("app", pa.string()),
            ("interval_s", pa.float64()),
            ("started_at", TS),
            ("services", pa.list_(pa.string())),
            ("entry_service", pa.string()),
            (
                "call_graph",
                pa.list_(pa.struct([("source", pa.string()), ("target", pa.string())])),
            ),
            ("config", pa.string()),  # JSON
        ]
    ),
)

SERVICE_METRICS = Table(
    name="service_metrics",
    row="run, step, service",
    schema=pa.schema(
        [
            ("run_id", pa.string()),
            ("ts", TS),
            ("step", pa.int64()),
            ("service", pa.string()),
            ("replicas_desired", pa.int32()),
            ("replicas_ready", pa.int32()),
            *[(name, pa.float64()) for name in METRIC_COLUMNS],
        ]
    ),
)

NODE_METRICS = Table(
    name="node_metrics",
    row="run, step, node",
    schema=pa.schema(
        [
            ("run_id", pa.string()),
            ("ts", TS),
            ("step", pa.int64()),
            ("node", pa.string()),
            *[(name, pa.float64()) for name in NODE_METRIC_COLUMNS],
        ]
    ),
)

EVENTS = Table(
    name="events",
    row="fault or action",
    schema=pa.schema(
        [
            ("run_id", pa.string()),
            ("ts_start", TS),
            ("ts_end", TS),
            ("kind", pa.string()),  # one of EVENT_KINDS
            ("type", pa.string()),  # one of EVENT_TYPES
            ("target", pa.string()),
            ("severity", pa.float64()),  # 0..1
            ("params", pa.string()),  # JSON
            ("origin", pa.string()),  # one of EVENT_ORIGINS
        ]
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (RUNS, SERVICE_METRICS, NODE_METRICS, EVENTS)}


def table(name: str) -> Table:
    """The table called `name`; raises `DataError` naming the unknown table."""
    from collectors.errors import DataError

    try:
        return TABLES[name]
    except KeyError:
        raise DataError(f"unknown table {name!r}; tables are {sorted(TABLES)}") from None
