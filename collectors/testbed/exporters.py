"""Cluster-level metrics of the testbed in the names a real cluster exports.

- `CadvisorCollector`: per container CPU seconds and working-set memory (psutil of the replica's
  process; RSS stands for the working set) and network bytes (counted by the replica's HTTP
  layer, since per-process network counters do not exist on loopback).
- `KubeStateCollector`: desired and available replicas per deployment, pod readiness, restarts.
- `NodeCollector`: the machine's CPU seconds per mode, memory and network (psutil).

Every series carries `namespace`; container series also `pod`, `container` (the service name),
and, beyond what cAdvisor has, `deployment` and `service`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from collectors.testbed.config import NAMESPACE, NODE_NAME
from collectors.testbed.replica import read_net_counters


@dataclass
class PodView:
    """What the exporters need to know of one pod."""

    name: str
    service: str
    pid: int | None  # None while no process runs
    ready: bool
    restarts: int
    net_path: str


class CadvisorCollector(Collector):
    """container_* series of the running pods."""

    def __init__(self, pods: Callable[[], list[PodView]]) -> None:
        self._pods = pods
        self._procs: dict[int, psutil.Process] = {}

    def _process(self, pid: int) -> psutil.Process:
        if pid not in self._procs:
            self._procs[pid] = psutil.Process(pid)
        return self._procs[pid]

    def collect(self) -> Iterator:
        labels = ["namespace", "pod", "container", "deployment", "service"]
        cpu = CounterMetricFamily(
            "container_cpu_usage_seconds", "Cumulative CPU time consumed.", labels=labels
        )
        mem = GaugeMetricFamily(
            "container_memory_working_set_bytes", "Current working set.", labels=labels
        )
        rx = CounterMetricFamily(
            "container_network_receive_bytes", "Cumulative bytes received.", labels=labels
        )
        tx = CounterMetricFamily(
            "container_network_transmit_bytes", "Cumulative bytes transmitted.", labels=labels
        )
        live = set()
        for pod in self._pods():
            if pod.pid is None:
                continue
            try:
                proc = self._process(pod.pid)
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss = proc.memory_info().rss
                rx_bytes, tx_bytes = read_net_counters(pod.net_path)
            except (psutil.Error, OSError):
                continue
            live.add(pod.pid)
            values = [NAMESPACE, pod.name, pod.service, pod.service, pod.service]
            cpu.add_metric(values, times.user + times.system)
            mem.add_metric(values, rss)
            rx.add_metric(values, rx_bytes)
            tx.add_metric(values, tx_bytes)
        self._procs = {pid: p for pid, p in self._procs.items() if pid in live}
        yield from (cpu, mem, rx, tx)


class KubeStateCollector(Collector):
    """kube_* series of the deployments (services) and their pods."""

    def __init__(self, desired: Callable[[], dict[str, int]], pods: Callable[[], list[PodView]]):
        self._desired = desired
        self._pods = pods

    def collect(self) -> Iterator:
        spec = GaugeMetricFamily(
            "kube_deployment_spec_replicas",
            "Desired replicas of a deployment.",
            labels=["namespace", "deployment"],
        )
        available = GaugeMetricFamily(
            "kube_deployment_status_replicas_available",
            "Ready replicas of a deployment.",
            labels=["namespace", "deployment"],
        )
        existing = GaugeMetricFamily(
            "kube_deployment_status_replicas",
            "Replicas (pods) of a deployment, ready or not.",
            labels=["namespace", "deployment"],
        )
        ready = GaugeMetricFamily(
            "kube_pod_status_ready",
            "Whether a pod is ready.",
            labels=["namespace", "pod", "condition"],
        )
        restarts = CounterMetricFamily(
            "kube_pod_container_status_restarts",
            "Restarts of a pod's container.",
            labels=["namespace", "pod", "container"],
        )
        pods = self._pods()
        for service, n in self._desired().items():
            mine = [p for p in pods if p.service == service]
            spec.add_metric([NAMESPACE, service], n)
            available.add_metric([NAMESPACE, service], sum(p.ready for p in mine))
            existing.add_metric([NAMESPACE, service], len(mine))
        for p in pods:
            ready.add_metric([NAMESPACE, p.name, "true"], float(p.ready))
            restarts.add_metric([NAMESPACE, p.name, p.service], p.restarts)
        yield from (spec, available, existing, ready, restarts)


class NodeCollector(Collector):
    """node_* series of this machine."""

    def collect(self) -> Iterator:
        cpu = CounterMetricFamily(
            "node_cpu_seconds",
            "Seconds the CPUs spent in each mode.",
            labels=["node", "cpu", "mode"],
        )
        for i, times in enumerate(psutil.cpu_times(percpu=True)):
            for mode, seconds in times._asdict().items():
                if mode not in ("guest", "guest_nice"):
                    cpu.add_metric([NODE_NAME, str(i), mode], seconds)
        vm = psutil.virtual_memory()
        total = GaugeMetricFamily(
            "node_memory_MemTotal_bytes", "Memory of the node.", labels=["node"]
        )
        total.add_metric([NODE_NAME], vm.total)
        avail = GaugeMetricFamily(
            "node_memory_MemAvailable_bytes", "Memory available to new work.", labels=["node"]
        )
        avail.add_metric([NODE_NAME], vm.available)
        rx = CounterMetricFamily(
            "node_network_receive_bytes", "Bytes received.", labels=["node", "device"]
        )
        tx = CounterMetricFamily(
            "node_network_transmit_bytes", "Bytes transmitted.", labels=["node", "device"]
        )
        for device, io in psutil.net_io_counters(pernic=True).items():
            rx.add_metric([NODE_NAME, device], io.bytes_recv)
            tx.add_metric([NODE_NAME, device], io.bytes_sent)
        yield from (cpu, total, avail, rx, tx)
