"""Configuration of the local testbed: the application, the supervisor and the load.

The services and their call graph are the ones every part of kubeworld shares (frontend ->
catalog, frontend -> checkout, checkout -> payment), kept here as data so that the code never
names a service.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from collectors.errors import ConfigError
from collectors.testbed.load import LoadCurve, curve_from_spec

NAMESPACE = "testbed"
NODE_NAME = "testbed-node"

# Prometheus job names of the scrape targets (keys of `Testbed.scrape_targets()`).
JOB_APP = "app"
JOB_CADVISOR = "cadvisor"
JOB_KUBE_STATE = "kube-state-metrics"
JOB_NODE = "node-exporter"
JOB_LOADGEN = "loadgen"
JOBS: tuple[str, ...] = (JOB_APP, JOB_CADVISOR, JOB_KUBE_STATE, JOB_NODE, JOB_LOADGEN)


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the application: its cost per request and the services it calls."""

    name: str
    # Concurrent requests one replica serves; further requests wait in its queue.
    workers: int = 4
    # Mean time a worker spends waiting per request (gamma distributed, cv 0.5), seconds.
    service_time_s: float = 0.04
    # CPU time burnt per request on the replica's event loop, seconds.
    cpu_per_request_s: float = 0.001
    # Requests that may wait for a worker per replica; beyond that the replica answers 503.
    queue_limit: int = 64
    # Services called (concurrently) by every request, after the service's own work.
    calls: tuple[str, ...] = ()


DEFAULT_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "frontend",
        workers=32,
        service_time_s=0.005,
        cpu_per_request_s=0.0005,
        queue_limit=256,
        calls=("catalog", "checkout"),
    ),
    ServiceSpec("catalog", workers=4, service_time_s=0.08),
    ServiceSpec("checkout", workers=8, service_time_s=0.03, calls=("payment",)),
    ServiceSpec("payment", workers=4, service_time_s=0.06),
)


@dataclass(frozen=True)
class TestbedConfig:
    """Everything the testbed's supervisor, replicas and load generator need.

    `services[0]` is the entry service; the call graph is the union of the services' `calls`.
    Every replica is one OS process serving HTTP on 127.0.0.1 with `workers` concurrent
    requests, so capacity grows with replicas until the machine's cores run out.
    """

    __test__ = False  # not a pytest test class despite the name

    # The application, entry service first.
    services: tuple[ServiceSpec, ...] = DEFAULT_SERVICES
    # Replicas per service at start; a missing service starts with `min_replicas`.
    initial_replicas: dict[str, int] = field(default_factory=dict)
    # Bounds of `scale` per service (the contract's testbed bounds: 1..6).
    min_replicas: int = 1
    max_replicas: int = 6
    # Seconds between a replica's start and the moment it counts as ready (a pod's start-up).
    startup_delay_s: float = 3.0
    # Seconds the supervisor waits before restarting a replica that died or was killed.
    restart_backoff_s: float = 5.0
    # Seconds a replica waits for a called service before answering 504.
    call_timeout_s: float = 5.0
    # Load curve of the open-loop generator at start (a LoadCurve or its dict spec); None = idle.
    load: LoadCurve | dict | None = None
    # Seconds the load generator waits for an answer before counting a timeout.
    load_timeout_s: float = 10.0
    # Requests the load generator keeps in flight at most; beyond, arrivals are dropped.
    load_max_in_flight: int = 2000
    # Added service time of a `latency` fault at severity 1, seconds.
    latency_fault_max_s: float = 0.2
    # Delay of each outgoing call and response of a `network_delay` fault at severity 1, seconds.
    network_delay_max_s: float = 0.1
    # Allocation rate of a `memory_leak` fault at severity 1 per replica, bytes per second.
    memory_leak_rate_bytes_per_s: float = 32e6
    # Most memory a `memory_leak` fault allocates per replica, bytes.
    memory_leak_max_bytes: float = 512e6
    # Seconds `Testbed.__enter__` waits for every service to have its replicas ready.
    ready_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        names = [s.name for s in self.services]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"TestbedConfig.services: names must be unique, got {names}")
        for spec in self.services:
            for callee in spec.calls:
                if callee not in names:
                    raise ConfigError(
                        f"TestbedConfig.services: {spec.name} calls unknown service {callee!r}"
                    )
        for name, n in self.initial_replicas.items():
            if name not in names:
                raise ConfigError(f"TestbedConfig.initial_replicas: unknown service {name!r}")
            if not self.min_replicas <= n <= self.max_replicas:
                raise ConfigError(
                    f"TestbedConfig.initial_replicas[{name}] = {n} outside "
                    f"[{self.min_replicas}, {self.max_replicas}]"
                )
        if self.load is not None:
            curve_from_spec(self.load)

    @property
    def service_names(self) -> list[str]:
        return [s.name for s in self.services]

    @property
    def call_graph(self) -> list[tuple[str, str]]:
        return [(s.name, callee) for s in self.services for callee in s.calls]

    def replicas_at_start(self, service: str) -> int:
        return self.initial_replicas.get(service, self.min_replicas)

    def spec(self, service: str) -> ServiceSpec:
        for s in self.services:
            if s.name == service:
                return s
        raise ConfigError(f"unknown service {service!r}; services are {self.service_names}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_dict` turns back into this config."""
        out = asdict(self)
        out["load"] = None if self.load is None else curve_from_spec(self.load).to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestbedConfig:
        """A config from a (Hydra or JSON) dict; unknown fields raise ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"TestbedConfig: unknown fields {sorted(unknown)}")
        kwargs = dict(data)
        if "services" in kwargs and kwargs["services"] is not None:
            kwargs["services"] = tuple(_service_from_dict(s) for s in kwargs["services"])
        if "initial_replicas" in kwargs:
            kwargs["initial_replicas"] = dict(kwargs["initial_replicas"] or {})
        if kwargs.get("load") is not None:
            kwargs["load"] = curve_from_spec(dict(kwargs["load"]))
        return cls(**kwargs)

    def with_overrides(self, **changes: Any) -> TestbedConfig:
        return replace(self, **changes)


def _service_from_dict(data: dict[str, Any] | ServiceSpec) -> ServiceSpec:
    if isinstance(data, ServiceSpec):
        return data
    known = {f.name for f in fields(ServiceSpec)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"TestbedConfig.services: unknown fields {sorted(unknown)}")
    kwargs = dict(data)
    kwargs["calls"] = tuple(kwargs.get("calls") or ())
    return ServiceSpec(**kwargs)
