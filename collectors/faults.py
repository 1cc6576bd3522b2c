"""Fault injection for collection: schedules, backends, guardrails, and the injector thread.

A schedule is a list of `FaultSpec` (when, what, where, how strong, how long): scripted, or
drawn at random (a Poisson process per fault type with duration and severity ranges). The
`FaultInjector` runs it in a background thread through a backend (the testbed supervisor, or
Kubernetes: pod deletion through the API and Chaos Mesh objects for the other types), behind
`Guardrails` (a namespace allow-list, at most N faults at once, never a protected pod, dry run).

Every fault is rolled back at its planned end, on `stop()` (SIGTERM/Ctrl-C in the entry point)
and on error, and is written to `events` when it ends with its true start and end.

Crash safety (the choice made here): a fault is always injected with its own duration, which
the backend enforces by itself (the testbed supervisor expires it; Chaos Mesh deletes the
effect after `spec.duration`; a pod kill is instantaneous), so a killed collector leaves no
fault active beyond its planned end. Each injection and each rollback is also appended, fsynced,
to a journal `<dataset>/_faults/<run_id>.jsonl`; a clean stop deletes the journal once the
events are flushed. `recover_fault_journals(dataset)` (run at the start of every collection)
writes the events of a killed run that are not in the dataset yet, ending at the logged
rollback or, when none was logged, at the planned end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collectors.collector import SystemClock, utc
from collectors.errors import ConfigError, FaultError, KubeworldError
from collectors.schema import FAULT_TYPES

log = logging.getLogger(__name__)

JOURNAL_DIR = "_faults"


# -- schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultSpec:
    """One planned fault: `at_s` seconds after the injector starts, for `duration_s`."""

    at_s: float
    type: str
    target: str
    severity: float
    duration_s: float

    def __post_init__(self):
        if self.type not in FAULT_TYPES:
            raise ConfigError(f"fault type {self.type!r} not in {list(FAULT_TYPES)}")
        if not 0.0 <= self.severity <= 1.0:
            raise ConfigError(f"fault {self.type} on {self.target}: severity {self.severity}")
        if self.duration_s <= 0 or self.at_s < 0:
            raise ConfigError(f"fault {self.type} on {self.target}: at_s/duration_s must be >= 0")


def scripted_schedule(faults: Sequence[dict]) -> list[FaultSpec]:
    """A schedule from dicts with keys at_s, type, target, severity, duration_s."""
    return sorted((FaultSpec(**dict(f)) for f in faults), key=lambda f: f.at_s)


def random_schedule(
    horizon_s: float,
    targets: Sequence[str],
    rates_per_min: dict[str, float],
    duration_s: tuple[float, float],
    severity: tuple[float, float],
    seed: int,
    start_after_s: float = 0.0,
) -> list[FaultSpec]:
    """Faults as independent Poisson processes per type (`rates_per_min`), uniform target,
    duration and severity within the ranges; deterministic in `seed`. Faults end before
    `horizon_s`."""
    unknown = sorted(set(rates_per_min) - set(FAULT_TYPES))
    if unknown:
        raise ConfigError(f"faults.rates_per_min: unknown type(s) {unknown}")
    rng = random.Random(seed)
    out = []
    for fault_type, rate in sorted(rates_per_min.items()):
        if rate <= 0:
            continue
        t_s = start_after_s + rng.expovariate(rate / 60.0)
        while t_s < horizon_s:
            length_s = rng.uniform(*duration_s)
            if t_s + length_s < horizon_s:
                out.append(
                    FaultSpec(
                        at_s=round(t_s, 3),
                        type=fault_type,
                        target=rng.choice(list(targets)),
                        severity=round(rng.uniform(*severity), 3),
                        duration_s=round(length_s, 3),
                    )
                )
            t_s += rng.expovariate(rate / 60.0)
    return sorted(out, key=lambda f: f.at_s)


# -- guardrails and backends -----------------------------------------------------------------


def own_pod_names() -> tuple[str, ...]:
    """The collector's own pod, as Kubernetes tells a pod (POD_NAME, else HOSTNAME)."""
    return tuple(n for n in (os.environ.get("POD_NAME"), os.environ.get("HOSTNAME")) if n)


@dataclass(frozen=True)
class Guardrails:
    """Limits every injection obeys.

    `namespaces`: the only namespaces faults may touch. `max_concurrent`: faults active at once
    at most (further ones are skipped and logged). `protected_pods`: pod names never touched
    (the collector's own by default). `protected_services`: targets never touched.
    `dry_run`: log what would be done, touch nothing, write no events.
    """

    namespaces: tuple[str, ...]
    max_concurrent: int = 2
    protected_pods: tuple[str, ...] = field(default_factory=own_pod_names)
    protected_services: tuple[str, ...] = ()
    dry_run: bool = False


class FaultBackend(ABC):
    """Injects and rolls back faults on one system; `namespace` is where faults land."""

    namespace: str
    name: str

    @abstractmethod
    def inject(self, spec: FaultSpec, guardrails: Guardrails) -> tuple[str, dict]:
        """Start `spec` (enforcing its own duration); returns (handle, params for events)."""

    @abstractmethod
    def rollback(self, handle: str) -> None:
        """End the fault now; a fault already gone is not an error."""


class TestbedFaultBackend(FaultBackend):
    """Faults through the testbed supervisor (`collectors.sources.testbed.TestbedCluster`)."""

    __test__ = False
    name = "testbed"

    def __init__(self, cluster, namespace: str = "testbed"):
        self.cluster = cluster
        self.namespace = namespace

    def inject(self, spec: FaultSpec, guardrails: Guardrails) -> tuple[str, dict]:
        try:
            fault_id = self.cluster.inject(spec.type, spec.target, spec.severity, spec.duration_s)
        except KubeworldError as err:
            raise FaultError(f"testbed: inject {spec.type} on {spec.target}: {err}") from err
        return fault_id, {"fault_id": fault_id}

    def rollback(self, handle: str) -> None:
        try:
            self.cluster.rollback(handle)
        except KubeworldError as err:
            if "HTTP 404" in str(err):
                return
            raise FaultError(f"testbed: rollback fault {handle}: {err}") from err


CHAOS_GROUP, CHAOS_VERSION = "chaos-mesh.org", "v1alpha1"


class KubernetesFaultBackend(FaultBackend):
    """pod_kill by deleting a pod through the API; other types as Chaos Mesh objects.

    `cluster` is a `collectors.sources.kubernetes.KubernetesCluster`. Chaos objects select the
    target deployment's pods by its selector labels and carry `spec.duration`; rollback deletes
    them. `http_port` is the port HTTPChaos intercepts; `latency_max_ms`, `memory_max_mb` and
    `network_delay_max_ms` are the effects at severity 1.
    """

    name = "kubernetes"

    def __init__(
        self,
        cluster,
        http_port: int = 8080,
        latency_max_ms: float = 500.0,
        memory_max_mb: float = 512.0,
        network_delay_max_ms: float = 200.0,
        seed: int = 0,
    ):
        self.cluster = cluster
        self.namespace = cluster.namespace
        self.http_port = http_port
        self.latency_max_ms = latency_max_ms
        self.memory_max_mb = memory_max_mb
        self.network_delay_max_ms = network_delay_max_ms
        self._rng = random.Random(seed)

    def inject(self, spec: FaultSpec, guardrails: Guardrails) -> tuple[str, dict]:
        try:
            pods = self.cluster.pods(spec.target)
        except KubeworldError as err:
            raise FaultError(f"kubernetes: pods of {spec.target}: {err}") from err
        names = [p.metadata.name for p in pods]
        protected = sorted(set(names) & set(guardrails.protected_pods))
        if spec.type == "pod_kill":
            return self._kill(spec, [n for n in names if n not in protected])
        if protected:
            raise FaultError(
                f"kubernetes: {spec.type} on {spec.target} would hit protected pod(s) {protected}"
            )
        return self._chaos(spec)

    def _kill(self, spec: FaultSpec, candidates: list[str]) -> tuple[str, dict]:
        if not candidates:
            raise FaultError(f"kubernetes: pod_kill on {spec.target}: no pod that may be killed")
        n = max(1, round(spec.severity * len(candidates)))
        victims = self._rng.sample(candidates, n)
        for pod in victims:
            try:
                self.cluster.delete_pod(pod)
            except KubeworldError as err:
                raise FaultError(f"kubernetes: pod_kill {pod}: {err}") from err
        return f"pods/{','.join(victims)}", {"pods": victims}

    def _chaos(self, spec: FaultSpec) -> tuple[str, dict]:
        kind, plural, body = self.chaos_manifest(spec)
        try:
            self.cluster._call(
                f"create {kind} {body['metadata']['name']}",
                self.cluster.custom.create_namespaced_custom_object,
                CHAOS_GROUP,
                CHAOS_VERSION,
                self.namespace,
                plural,
                body,
            )
        except KubeworldError as err:
            raise FaultError(f"kubernetes: {spec.type} on {spec.target}: {err}") from err
        name = body["metadata"]["name"]
        return f"{plural}/{name}", {"chaos_kind": kind, "name": name, "spec": body["spec"]}

    def chaos_manifest(self, spec: FaultSpec) -> tuple[str, str, dict]:
        """(kind, plural, object) of the Chaos Mesh resource for a non-pod_kill fault."""
        self.cluster.deployments()
        labels = self.cluster._selectors.get(spec.target)
        if not labels:
            raise FaultError(f"kubernetes: no deployment {spec.target!r} in {self.namespace!r}")
        selector = {"namespaces": [self.namespace], "labelSelectors": labels}
        common = {"mode": "all", "selector": selector, "duration": f"{round(spec.duration_s)}s"}
        s = spec.severity
        if spec.type == "cpu_stress":
            kind, plural = "StressChaos", "stresschaos"
            body = {"stressors": {"cpu": {"workers": max(1, round(4 * s)), "load": round(100 * s)}}}
        elif spec.type == "memory_leak":
            kind, plural = "StressChaos", "stresschaos"
            size = f"{max(1, round(self.memory_max_mb * s))}MB"
            body = {"stressors": {"memory": {"workers": 1, "size": size}}}
        elif spec.type == "network_delay":
            kind, plural = "NetworkChaos", "networkchaos"
            latency = f"{max(1, round(self.network_delay_max_ms * s))}ms"
            body = {"action": "delay", "direction": "to", "delay": {"latency": latency}}
        elif spec.type == "latency":
            kind, plural = "HTTPChaos", "httpchaos"
            delay = f"{max(1, round(self.latency_max_ms * s))}ms"
            body = {"target": "Request", "port": self.http_port, "delay": delay}
        elif spec.type == "error":
            kind, plural = "HTTPChaos", "httpchaos"
            body = {"target": "Response", "port": self.http_port, "replace": {"code": 500}}
            common = {**common, "mode": "fixed-percent", "value": str(max(1, round(100 * s)))}
        else:
            raise FaultError(f"kubernetes: no Chaos Mesh mapping for fault type {spec.type!r}")
        name = f"kw-{spec.type.replace('_', '-')}-{spec.target}-{uuid.uuid4().hex[:6]}"
        manifest = {
            "apiVersion": f"{CHAOS_GROUP}/{CHAOS_VERSION}",
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "kubeworld"},
            },
            "spec": {**common, **body},
        }
        return kind, plural, manifest

    def rollback(self, handle: str) -> None:
        plural, name = handle.split("/", 1)
        if plural == "pods":
            return  # the deployment replaces a deleted pod; nothing to undo
        try:
            self.cluster._call(
                f"delete {plural}/{name}",
                self.cluster.custom.delete_namespaced_custom_object,
                CHAOS_GROUP,
                CHAOS_VERSION,
                self.namespace,
                plural,
                name,
            )
        except KubeworldError as err:
            if "HTTP 404" in str(err):
                return
            raise FaultError(f"kubernetes: rollback {handle}: {err}") from err


# -- journal ---------------------------------------------------------------------------------


class FaultJournal:
    """Append-only, fsynced JSON lines of injections and rollbacks of one run."""

    def __init__(self, dataset: str | Path, run_id: str):
        self.path = Path(dataset) / JOURNAL_DIR / f"{run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def recover_fault_journals(dataset: str | Path, sink) -> int:
    """Write the events of killed runs' journals that the dataset lacks; returns their number.

    A journal's injection becomes an event ending at its logged rollback, or at its planned end
    when none was logged (the backend expired it by itself). Recovered journals are deleted.
    """
    from collectors.dataset import read_table

    folder = Path(dataset) / JOURNAL_DIR
    recovered = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        run_id = path.stem
        opened, ends = {}, {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record["op"] == "inject":
                opened[record["handle"]] = record
            else:
                ends[record["handle"]] = record["ts_s"]
        have = _existing_events(read_table, dataset, run_id)
        rows = []
        for handle, record in opened.items():
            row = _event_row(run_id, record, ends.get(handle, record["planned_end_s"]))
            if (row["type"], row["target"], row["ts_start"]) not in have:
                rows.append(row)
        if rows:
            sink.write("events", rows)
            sink.flush()
        recovered += len(rows)
        path.unlink()
        log.info("fault journal %s: %d event(s) recovered", path, len(rows))
    return recovered


def _existing_events(read_table, dataset, run_id: str) -> set:
    try:
        frame = read_table(dataset, "events", runs=[run_id]).collect()
    except KubeworldError:
        return set()
    return {(r["type"], r["target"], r["ts_start"]) for r in frame.iter_rows(named=True)}


def _event_row(run_id: str, record: dict, end_s: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "ts_start": utc(record["ts_s"]),
        "ts_end": utc(end_s),
        "kind": "fault",
        "type": record["type"],
        "target": record["target"],
        "severity": record["severity"],
        "params": json.dumps(record["params"], sort_keys=True, default=str),
        "origin": "injector",
    }


# -- the injector ----------------------------------------------------------------------------


@dataclass
class ActiveFault:
    """A fault injected and not yet rolled back."""

    spec: FaultSpec
    handle: str
    started_s: float
    params: dict


class FaultInjector:
    """Run a fault schedule in a background thread, within guardrails, recording `events`.

    Args:
        backend: where faults land (`TestbedFaultBackend`, `KubernetesFaultBackend`).
        schedule: the faults, `at_s` counted from `start()`.
        run_id: the run the events belong to.
        guardrails: limits; the backend's namespace must be in `guardrails.namespaces`.
        sink, store: where events go (either may be None).
        journal: a `FaultJournal` for crash recovery (or None).
        clock: `SystemClock()` by default. tick_s: how often the thread looks at the schedule.
    """

    def __init__(
        self,
        backend: FaultBackend,
        schedule: Sequence[FaultSpec],
        run_id: str,
        guardrails: Guardrails,
        sink=None,
        store=None,
        journal: FaultJournal | None = None,
        clock=None,
        tick_s: float = 0.1,
    ):
        if backend.namespace not in guardrails.namespaces:
            raise FaultError(
                f"fault injector: namespace {backend.namespace!r} not in the allow-list "
                f"{list(guardrails.namespaces)}"
            )
        self.backend = backend
        self.schedule = sorted(schedule, key=lambda f: f.at_s)
        self.run_id = run_id
        self.guardrails = guardrails
        self.sink = sink
        self.store = store
        self.journal = journal
        self.clock = clock or SystemClock()
        self.tick_s = tick_s
        self.active: dict[str, ActiveFault] = {}
        self.events: list[dict[str, Any]] = []
        self.skipped: list[tuple[FaultSpec, str]] = []
        self._next = 0
        self._t0_s: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    def start(self, t0_s: float | None = None) -> None:
        """Start the schedule's clock at `t0_s` (default now) and the background thread."""
        self._t0_s = t0_s if t0_s is not None else self.clock.now()
        self._thread = threading.Thread(target=self._loop, name="fault-injector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and roll back every active fault (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.rollback_all()

    def __enter__(self) -> FaultInjector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            while not self.clock.wait(self.tick_s, self._stop):
                self.tick(self.clock.now())
        except Exception:
            log.exception("fault injector failed; rolling back every active fault")
            raise
        finally:
            self.rollback_all()

    def tick(self, now_s: float) -> None:
        """Roll back the faults whose end has come, then inject the ones whose time has come."""
        with self._lock:
            for handle, fault in list(self.active.items()):
                if now_s >= fault.started_s + fault.spec.duration_s:
                    self._rollback(handle, now_s)
            while self._next < len(self.schedule):
                spec = self.schedule[self._next]
                if now_s < self._t0_s + spec.at_s:
                    break
                self._next += 1
                self._inject(spec, now_s)

    def _inject(self, spec: FaultSpec, now_s: float) -> None:
        reason = self._refusal(spec)
        if reason:
            log.warning("fault %s on %s skipped: %s", spec.type, spec.target, reason)
            self.skipped.append((spec, reason))
            return
        if self.guardrails.dry_run:
            log.info("dry run: would inject %s", asdict(spec))
            self.skipped.append((spec, "dry run"))
            return
        try:
            handle, params = self.backend.inject(spec, self.guardrails)
        except FaultError as err:
            log.warning("fault %s on %s not injected: %s", spec.type, spec.target, err)
            self.skipped.append((spec, str(err)))
            return
        params = {**params, "backend": self.backend.name, "planned_duration_s": spec.duration_s}
        self.active[handle] = ActiveFault(spec, handle, now_s, params)
        if self.journal is not None:
            self.journal.append(
                {
                    "op": "inject",
                    "handle": handle,
                    "ts_s": now_s,
                    "planned_end_s": now_s + spec.duration_s,
                    "type": spec.type,
                    "target": spec.target,
                    "severity": spec.severity,
                    "params": params,
                }
            )
        log.info("fault %s on %s (severity %.2f) injected", spec.type, spec.target, spec.severity)

    def _refusal(self, spec: FaultSpec) -> str | None:
        if spec.target in self.guardrails.protected_services:
            return f"target {spec.target!r} is protected"
        if len(self.active) >= self.guardrails.max_concurrent:
            return f"{len(self.active)} faults active (max_concurrent)"
        return None

    def _rollback(self, handle: str, now_s: float, force: bool = False) -> None:
        """Roll back one fault and record it; a failure is retried on the next tick until
        5 s past its planned end (or at once with `force`), after which the fault is recorded
        as ending at its planned end, when the backend expires it by itself."""
        fault = self.active[handle]
        try:
            self.backend.rollback(handle)
        except FaultError as err:
            planned_end_s = fault.started_s + fault.spec.duration_s
            if not force and now_s < planned_end_s + 5.0:
                log.warning("rollback of %s failed, will retry: %s", handle, err)
                return
            log.error("rollback of %s failed; the backend's own expiry ends it: %s", handle, err)
            now_s = planned_end_s
        del self.active[handle]
        if self.journal is not None:
            self.journal.append({"op": "rollback", "handle": handle, "ts_s": now_s})
        row = _event_row(
            self.run_id,
            {
                "ts_s": fault.started_s,
                "type": fault.spec.type,
                "target": fault.spec.target,
                "severity": fault.spec.severity,
                "params": fault.params,
            },
            now_s,
        )
        self.events.append(row)
        if self.store is not None:
            self.store.append("events", [row])
        if self.sink is not None:
            self.sink.write("events", [row])
        log.info("fault %s on %s rolled back", fault.spec.type, fault.spec.target)

    def rollback_all(self) -> None:
        """Roll back every active fault now (retrying each a few times)."""
        with self._lock:
            for attempt in range(3):
                for handle in list(self.active):
                    self._rollback(handle, self.clock.now(), force=attempt == 2)
                if not self.active:
                    return
                time.sleep(0.2 * (attempt + 1))

    def close_journal(self) -> None:
        """Delete the journal: call after the sink has flushed the events."""
        if self.journal is not None and not self.active:
            self.journal.remove()
            with contextlib.suppress(OSError):
                self.journal.path.parent.rmdir()  # only when no other run's journal is left
