"""Import the Nezha Online Boutique data (IntelligentDDS/Nezha `rca_data/<day>`), one run per day.

Source layout (see the dataset's PROVENANCE.md): `<day>/metric/<pod>_metric.csv` per pod (one pod
per service), `<day>/metric/front_service.csv` (the entry service seen end to end),
`<day>/metric/dependency.csv` (call graph, plus edges service -> host IP) and
`<day>/<day>-fault_list.json` (labelled faults). `path` may be the dataset folder, `rca_data` or a
day folder: every folder `D` holding `D/metric/` and `D/<D.name>-fault_list.json` is one day.

Mapping to our tables, one choice per column (what the source lacks is null, never zero):

- Steps: samples are every 60 s. `step = round((TimeStamp - t0) / 60)` with `t0` the earliest
  sample of the day; pods report within +-1 s of the grid, and `ts` is the grid time
  `t0 + 60 s * step` (more than 15 s off the grid raises `DataError`). Every service gets every
  step of the day; a step missing from a pod file is a row of nulls.
- `replicas_desired = replicas_ready = 1`: the data has one pod per service throughout and no
  scaling.
- `request_rate_rps` and `throughput_rps` = `PodWorkload(Ops)`, the requests the pod handled per
  second (its values are whole counts divided by 60, i.e. a per-second rate over the minute). The
  source has no separate offered load, so both columns carry the handled rate.
- `error_ratio` = `1 - SuccessRate(%) / 100` of `front_service.csv` for the entry service;
  null for the others, because `PodSuccessRate(%)` is always 0 in the source (not collected).
- `latency_p50_s` = `LatencyP50(s)` of `front_service.csv` for the entry service; null for the
  others (the pods report no median).
- `latency_p95_s`, `latency_p99_s` = `PodServerLatencyP95(s)`, `PodServerLatencyP99(s)`: calls
  served by the pod (for the frontend these equal `front_service.csv`'s P95/P99). NaN (no served
  traffic in the interval) becomes null. The client-side latencies and P90 are not imported.
- `cpu_cores` = `CpuUsage(m) / 1000` (millicores to cores).
- `memory_bytes` = `MemoryUsage(Mi) * 2**20`.
- `net_rx_bytes_per_s`, `net_tx_bytes_per_s` = `NetworkReceiveBytes`, `NetworkTransmitBytes` as
  they are. PROVENANCE.md reads them as bytes per interval, but the pipeline that produced the
  files reports per-second rates: `NodeNetworkReceiveBytes` and `PodWorkload(Ops)` are whole
  numbers divided by 60, and dividing the pod bytes by 60 again would make the frontend send about
  500 bytes per request, too little for an HTML page; as given it is about 30 kB. Set
  `NETWORK_BYTES_PER_INTERVAL = True` to divide by the interval instead.
- `node_metrics`: `dependency.csv` also links each service to an IP (33.33.33.x); pods with the
  same IP report identical node figures, so the IP names the node. Per node and step:
  `cpu_utilization = NodeCpuUsageRate(%) / 100`, `memory_utilization = NodeMemoryUsageRate(%) /
  100`, `net_rx_bytes_per_s = NodeNetworkReceiveBytes` (a per-second rate, see above),
  `net_tx_bytes_per_s` null (not in the source). A service without an IP edge gets the node
  `node-of-<service>`.
- `runs`: source `nezha`, app from the services (`online-boutique` when `frontend` is one),
  interval 60 s, `started_at = t0`, services with the entry first (the one service no other calls;
  `frontend`), the call graph from `dependency.csv` restricted to edges between services (the
  host-IP edges and `loadgenerator` go to `config.placement` / are dropped), `config` JSON with
  the day, the source files, the placement and the unit choices.
- `events`: one `fault` per labelled fault, `ts_start = inject_timestamp`, `ts_end = ts_start +
  180 s` (the paper's fault duration), `type` from `FAULT_TYPE_MAP` (`cpu_contention`,
  `cpu_consumed` -> `cpu_stress`, `network_delay` -> `network_delay`, `return`, `exception` ->
  `error`), `target` = the service of `inject_pod` (pod hash stripped), `severity` null
  (unknown), `params` JSON with the original type, pod and time, `origin` `import`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from collectors.errors import DataError
from collectors.schema import PARTITION_COLUMN, TABLES
from collectors.sink import ParquetSink

log = logging.getLogger(__name__)

INTERVAL_S = 60.0
FAULT_DURATION_S = 180.0
MAX_GRID_OFFSET_S = 15.0
NETWORK_BYTES_PER_INTERVAL = False
MIB_BYTES = 2**20
FAULT_TYPE_MAP = {
    "cpu_contention": "cpu_stress",
    "cpu_consumed": "cpu_stress",
    "network_delay": "network_delay",
    "return": "error",
    "exception": "error",
}
POD_COLUMNS = (
    "TimeStamp",
    "PodName",
    "CpuUsage(m)",
    "MemoryUsage(Mi)",
    "NetworkReceiveBytes",
    "NetworkTransmitBytes",
    "PodServerLatencyP95(s)",
    "PodServerLatencyP99(s)",
    "PodWorkload(Ops)",
    "NodeCpuUsageRate(%)",
    "NodeMemoryUsageRate(%)",
    "NodeNetworkReceiveBytes",
)
FRONT_COLUMNS = ("TimeStamp", "SuccessRate(%)", "LatencyP50(s)")


@dataclass(frozen=True)
class Day:
    """One day of the source, read and aligned to the 60 s grid."""

    name: str
    folder: Path
    t0_s: int  # unix seconds of step 0
    n_steps: int
    services: list[str]  # entry first
    call_graph: list[tuple[str, str]]
    placement: dict[str, str]  # service -> node
    pods: dict[str, pl.DataFrame]  # service -> POD_COLUMNS + step
    front: pl.DataFrame  # FRONT_COLUMNS + step


def nezha_days(path: str | Path) -> list[Path]:
    """The day folders under `path` (or `path` itself), sorted; `DataError` if there are none."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: Nezha data folder does not exist")
    candidates = [root, *sorted(p.parent for p in root.rglob("metric") if p.is_dir())]
    days = [d for d in candidates if _fault_list(d).is_file() and (d / "metric").is_dir()]
    if not days:
        raise DataError(f"{root}: no Nezha day folder (<day>/metric and <day>-fault_list.json)")
    return sorted(set(days))


def _fault_list(day: Path) -> Path:
    return day / f"{day.name}-fault_list.json"


def run_id_of(day: str) -> str:
    """The run id of one imported day, e.g. `nezha-20220823`."""
    return f"nezha-{day.replace('-', '')}"


def import_nezha(
    path: str | Path, out: str | Path, day: str | None = None, overwrite: bool = False
) -> str:
    """Import one day of Nezha data from `path` into the dataset `out` and return its run id.

    `day` (e.g. "2022-08-23") picks one when `path` holds several. An already imported run
    raises `DataError` unless `overwrite`, which replaces it.
    """
    days = nezha_days(path)
    if day is not None:
        days = [d for d in days if d.name == day]
    if len(days) != 1:
        found = [d.name for d in nezha_days(path)]
        raise DataError(f"{path}: pick one day with day=...; found {found}")
    return _import_day(days[0], Path(out), overwrite)


def import_nezha_all(path: str | Path, out: str | Path, overwrite: bool = False) -> list[str]:
    """Import every day found under `path` into `out`; one run per day, run ids returned."""
    return [_import_day(day, Path(out), overwrite) for day in nezha_days(path)]


def _import_day(folder: Path, out: Path, overwrite: bool) -> str:
    run_id = run_id_of(folder.name)
    _make_room(out, run_id, overwrite)
    day = read_day(folder)
    with ParquetSink(out, flush_rows=1_000_000) as sink:
        sink.write("service_metrics", service_metrics(day, run_id))
        sink.write("node_metrics", node_metrics(day, run_id))
        sink.write("events", events(day, run_id))
        sink.flush()
        # The run appears in `runs` last, once its data is on disk.
        sink.write("runs", [runs_row(day, run_id)])
    log.info("imported %s as run %s into %s", folder, run_id, out)
    return run_id


def _make_room(out: Path, run_id: str, overwrite: bool) -> None:
    existing = [out / name / f"{PARTITION_COLUMN}={run_id}" for name in TABLES]
    existing = [p for p in existing if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{out}: run {run_id!r} is already imported (use overwrite=true)")
    for partition in existing:
        shutil.rmtree(partition)


def read_day(folder: Path) -> Day:
    """Read one day folder and align every file on the 60 s grid."""
    metric = folder / "metric"
    pod_files = sorted(metric.glob("*_metric.csv"))
    if not pod_files:
        raise DataError(f"{metric}: no <pod>_metric.csv files")
    raw = {
        _service_of(f.name.removesuffix("_metric.csv")): _read_csv(f, POD_COLUMNS)
        for f in pod_files
    }
    front = _read_csv(metric / "front_service.csv", FRONT_COLUMNS)

    t0_s = min(int(frame["TimeStamp"].min()) for frame in [*raw.values(), front])
    pods = {s: _with_steps(frame, t0_s, pod_files[i]) for i, (s, frame) in enumerate(raw.items())}
    front = _with_steps(front, t0_s, metric / "front_service.csv")
    n_steps = 1 + max(int(frame["step"].max()) for frame in [*pods.values(), front])

    call_graph, placement = _dependencies(metric / "dependency.csv", set(pods))
    entry = _entry_service(sorted(pods), call_graph)
    services = [entry, *sorted(s for s in pods if s != entry)]
    placement = {s: placement.get(s, f"node-of-{s}") for s in services}
    return Day(folder.name, folder, t0_s, n_steps, services, call_graph, placement, pods, front)


def _service_of(pod: str) -> str:
    parts = pod.split("-")
    if len(parts) < 3:
        raise DataError(f"pod name {pod!r} is not <deployment>-<replicaset hash>-<pod hash>")
    return "-".join(parts[:-2])


def _read_csv(path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    try:
        frame = pl.read_csv(path, infer_schema_length=None)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise DataError(f"{path}: unreadable CSV: {err}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing")
    frame = frame.select(columns)
    numeric = [c for c in columns if c not in ("PodName",)]
    try:
        frame = frame.with_columns(pl.col(numeric).cast(pl.Float64, strict=True))
    except pl.exceptions.PolarsError as err:
        raise DataError(f"{path}: non-numeric values in {numeric}: {err}") from None
    return frame.with_columns(pl.col(numeric).fill_nan(None))


def _with_steps(frame: pl.DataFrame, t0_s: int, path: Path) -> pl.DataFrame:
    offset_s = pl.col("TimeStamp") - t0_s
    frame = frame.with_columns(step=(offset_s / INTERVAL_S).round().cast(pl.Int64))
    off_grid = frame.filter((offset_s - pl.col("step") * INTERVAL_S).abs() > MAX_GRID_OFFSET_S)
    if off_grid.height:
        raise DataError(f"{path}: column 'TimeStamp': {off_grid.height} samples off the 60 s grid")
    if frame["step"].is_duplicated().any():
        raise DataError(f"{path}: column 'TimeStamp': two samples in one 60 s step")
    return frame


def _dependencies(path: Path, services: set[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    frame = _read_dependency(path)
    call_graph: list[tuple[str, str]] = []
    placement: dict[str, str] = {}
    for source, target in frame.iter_rows():
        if source in services and target in services:
            call_graph.append((source, target))
        elif source in services and target not in services and _is_ip(target):
            placement[source] = target
    return sorted(set(call_graph)), placement


def _read_dependency(path: Path) -> pl.DataFrame:
    try:
        frame = pl.read_csv(path, schema_overrides={"Source": pl.String, "Target": pl.String})
    except (OSError, pl.exceptions.PolarsError) as err:
        raise DataError(f"{path}: unreadable CSV: {err}") from None
    for column in ("Source", "Target"):
        if column not in frame.columns:
            raise DataError(f"{path}: column {column!r} missing")
    return frame.select("Source", "Target")


def _is_ip(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


def _entry_service(services: list[str], call_graph: list[tuple[str, str]]) -> str:
    if "frontend" in services:
        return "frontend"
    called = {target for _, target in call_graph}
    roots = [s for s in services if s not in called and any(s == a for a, _ in call_graph)]
    if len(roots) != 1:
        raise DataError(f"cannot tell the entry service: services no one calls are {roots}")
    return roots[0]


def _grid(day: Day, run_id: str) -> pl.DataFrame:
    steps = pl.int_range(0, day.n_steps, dtype=pl.Int64, eager=True)
    t0_ms = day.t0_s * 1000
    ts_ms = t0_ms + steps * int(INTERVAL_S * 1000)
    return pl.DataFrame(
        {"run_id": run_id, "step": steps, "ts": ts_ms.cast(pl.Datetime("ms", "UTC"))}
    )


def service_metrics(day: Day, run_id: str) -> pl.DataFrame:
    """The `service_metrics` rows of one day: every service at every step."""
    net_scale = 1.0 / INTERVAL_S if NETWORK_BYTES_PER_INTERVAL else 1.0
    frames = []
    for service in day.services:
        pod = _grid(day, run_id).join(day.pods[service], on="step", how="left")
        if service == day.services[0]:
            pod = pod.join(day.front.drop("TimeStamp"), on="step", how="left")
            error_ratio = 1.0 - pl.col("SuccessRate(%)") / 100.0
            p50 = pl.col("LatencyP50(s)")
        else:
            error_ratio = p50 = pl.lit(None, dtype=pl.Float64)
        frames.append(
            pod.select(
                "run_id",
                "ts",
                "step",
                service=pl.lit(service),
                replicas_desired=pl.lit(1, dtype=pl.Int32),
                replicas_ready=pl.lit(1, dtype=pl.Int32),
                request_rate_rps=pl.col("PodWorkload(Ops)"),
                throughput_rps=pl.col("PodWorkload(Ops)"),
                error_ratio=error_ratio,
                latency_p50_s=p50,
                latency_p95_s=pl.col("PodServerLatencyP95(s)"),
                latency_p99_s=pl.col("PodServerLatencyP99(s)"),
                cpu_cores=pl.col("CpuUsage(m)") / 1000.0,
                memory_bytes=pl.col("MemoryUsage(Mi)") * MIB_BYTES,
                net_rx_bytes_per_s=pl.col("NetworkReceiveBytes") * net_scale,
                net_tx_bytes_per_s=pl.col("NetworkTransmitBytes") * net_scale,
            )
        )
    return pl.concat(frames)


def node_metrics(day: Day, run_id: str) -> pl.DataFrame:
    """The `node_metrics` rows of one day: each node at every step, from its first pod."""
    frames = []
    for node in sorted(set(day.placement.values())):
        hosted = [s for s in day.services if day.placement[s] == node]
        pods = pl.concat([day.pods[s] for s in hosted]).sort("step")
        first = pods.group_by("step", maintain_order=True).agg(pl.all().drop_nulls().first())
        frames.append(
            _grid(day, run_id)
            .join(first, on="step", how="left")
            .select(
                "run_id",
                "ts",
                "step",
                node=pl.lit(node),
                cpu_utilization=pl.col("NodeCpuUsageRate(%)") / 100.0,
                memory_utilization=pl.col("NodeMemoryUsageRate(%)") / 100.0,
                net_rx_bytes_per_s=pl.col("NodeNetworkReceiveBytes"),
                net_tx_bytes_per_s=pl.lit(None, dtype=pl.Float64),
            )
        )
    return pl.concat(frames)


def events(day: Day, run_id: str) -> list[dict]:
    """The `events` rows of one day: one fault per entry of the fault list, by start time."""
    path = _fault_list(day.folder)
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable fault list: {err}") from None
    entries = [entry for hour in labels.values() for entry in hour]
    rows = [_event(path, entry, run_id) for entry in entries]
    return sorted(rows, key=lambda row: row["ts_start"])


def _event(path: Path, entry: dict, run_id: str) -> dict:
    try:
        start_s = int(entry["inject_timestamp"])
        pod, source_type = entry["inject_pod"], entry["inject_type"]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: fault entry {entry!r}: field {err} missing or invalid") from None
    if source_type not in FAULT_TYPE_MAP:
        raise DataError(
            f"{path}: field 'inject_type': {source_type!r} is not one of {sorted(FAULT_TYPE_MAP)}"
        )
    start = dt.datetime.fromtimestamp(start_s, tz=dt.UTC)
    return {
        "run_id": run_id,
        "ts_start": start,
        "ts_end": start + dt.timedelta(seconds=FAULT_DURATION_S),
        "kind": "fault",
        "type": FAULT_TYPE_MAP[source_type],
        "target": _service_of(pod),
        "severity": None,
        "params": json.dumps(
            {"inject_type": source_type, "inject_pod": pod, "inject_time": entry.get("inject_time")}
        ),
        "origin": "import",
    }


def runs_row(day: Day, run_id: str) -> dict:
    """The `runs` row of one day."""
    config = {
        "dataset": "nezha",
        "day": day.name,
        "source_folder": str(day.folder),
        "placement": day.placement,
        "fault_duration_s": FAULT_DURATION_S,
        "replicas": "one pod per service, no scaling",
        "network_bytes_per_interval": NETWORK_BYTES_PER_INTERVAL,
    }
    return {
        "run_id": run_id,
        "source": "nezha",
        "app": "online-boutique" if "frontend" in day.services else "nezha",
        "interval_s": INTERVAL_S,
        "started_at": dt.datetime.fromtimestamp(day.t0_s, tz=dt.UTC),
        "services": day.services,
        "entry_service": day.services[0],
        "call_graph": [{"source": a, "target": b} for a, b in day.call_graph],
        "config": json.dumps(config, sort_keys=True),
    }
