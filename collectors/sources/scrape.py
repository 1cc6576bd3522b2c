"""Direct scraping of `/metrics` endpoints, for when no Prometheus server is installed.

`ScrapeSource` fetches every target once per step, keeps each counter series' samples over the
rate window, and computes the same columns as the default PromQL queries
(`conf/source/queries/default.yaml`): `rate` with counter resets and extrapolation and
`histogram_quantile` with linear interpolation, as Prometheus computes them
(`collectors.sources.promql`), summed by the `service` label (or `deployment` when a series has
no `service` label) and, for node metrics, by the `node` label (or `default_node`).
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families

from collectors.errors import SourceError
from collectors.sources.base import Sample, Source, Values
from collectors.sources.promql import extrapolated_rate, histogram_quantile

log = logging.getLogger(__name__)

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
# job -> ["host:port", ...], or Prometheus service-discovery groups
# [{"targets": ["host:port", ...], "labels": {"job": ..., ...}}, ...]
Targets = dict[str, list[str]] | list[dict]
_5XX = re.compile(r"5..")


@dataclass(frozen=True)
class Series:
    """One series read at the current scrape: metric name, labels and value."""

    name: str
    labels: dict[str, str]
    value: float


class ScrapeSource(Source):
    """Scrape Prometheus text-format endpoints and compute per-service and per-node columns.

    `targets` is a mapping job -> ["host:port", ...] or a list of service-discovery groups
    (whose labels are added to the scraped series, which win on a clash, as with Prometheus'
    `honor_labels`), or a callable returning either (re-read every step, so replicas that come
    and go are followed). `window_s` is the rate window;
    `entry_service` gets the load generator's offered rate as `request_rate_rps` when the
    targets export `loadgen_requests_total`. `default_node` names node series without a `node`
    label.
    """

    name = "scrape"

    def __init__(
        self,
        targets: Targets | Callable[[], Targets],
        window_s: float,
        session: requests.Session | None = None,
        timeout_s: float = 1.0,
        entry_service: str | None = None,
        namespace: str | None = None,
        default_node: str = "node",
    ):
        self._targets = targets
        self.window_s = window_s
        self.session = session or requests.Session()
        self.timeout_s = timeout_s
        self.entry_service = entry_service
        self.namespace = namespace
        self.default_node = default_node
        self._history: dict[SeriesKey, deque[tuple[float, float]]] = {}

    def targets(self) -> list[tuple[str, str, dict[str, str]]]:
        """The current targets as (job, "host:port", target labels)."""
        targets = self._targets() if callable(self._targets) else self._targets
        if isinstance(targets, dict):
            return [(job, host, {}) for job, hosts in targets.items() for host in hosts]
        return [
            (group.get("labels", {}).get("job", "scrape"), host, dict(group.get("labels", {})))
            for group in targets
            for host in group["targets"]
        ]

    def sample(self, ts_s: float) -> Sample:
        """Scrape every target at `ts_s` and compute the columns; SourceError if none answers."""
        current, missing = self._scrape_all(ts_s)
        self._remember(current, ts_s)
        sample = Sample(services=self._service_values(current, ts_s), missing=missing)
        sample.nodes = self._node_values(current, ts_s)
        return sample

    # -- scraping ----------------------------------------------------------------------------

    def _scrape_all(self, ts_s: float) -> tuple[list[Series], list[str]]:
        current: list[Series] = []
        missing: list[str] = []
        try:
            targets = self.targets()
        except (requests.RequestException, SourceError) as err:
            raise SourceError(f"scrape: target discovery failed: {err}") from err
        for job, target, target_labels in targets:
            try:
                current.extend(self._scrape_one(job, target, target_labels))
            except (requests.RequestException, ValueError) as err:
                missing.append(f"{job}/{target}: {err}")
        if targets and len(missing) == len(targets):
            raise SourceError(f"scrape: no target answered at ts={ts_s:.3f}: {missing[0]}")
        return current, missing

    def _scrape_one(self, job: str, target: str, target_labels: dict) -> list[Series]:
        response = self.session.get(f"http://{target}/metrics", timeout=self.timeout_s)
        response.raise_for_status()
        series = []
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                labels = {"job": job, "instance": target, **target_labels, **s.labels}
                if self.namespace and labels.get("namespace", self.namespace) != self.namespace:
                    continue
                series.append(Series(s.name, labels, float(s.value)))
        return series

    def _remember(self, current: Iterable[Series], ts_s: float) -> None:
        for s in current:
            key = (s.name, tuple(sorted(s.labels.items())))
            history = self._history.setdefault(key, deque())
            history.append((ts_s, s.value))
        horizon_s = ts_s - self.window_s
        for key in list(self._history):
            history = self._history[key]
            while history and history[0][0] < horizon_s:
                history.popleft()
            if not history:
                del self._history[key]

    # -- PromQL equivalents ------------------------------------------------------------------

    def _rates(self, current: list[Series], name: str, ts_s: float) -> list[tuple[Series, float]]:
        """`rate(name[window])` of every current series of `name` that has two samples."""
        out = []
        for s in current:
            if s.name != name:
                continue
            history = self._history.get((s.name, tuple(sorted(s.labels.items()))), ())
            rate = extrapolated_rate(list(history), ts_s - self.window_s, ts_s)
            if rate is not None:
                out.append((s, rate))
        return out

    @staticmethod
    def _sum_by(pairs: Iterable[tuple[Series, float]], group: Callable[[Series], str | None]):
        sums: dict[str, float] = defaultdict(float)
        for s, value in pairs:
            key = group(s)
            if key is not None:
                sums[key] += value
        return dict(sums)

    def _service_values(self, current: list[Series], ts_s: float) -> dict[str, Values]:
        by_service = _service_of
        requests_ = self._rates(current, "http_requests_total", ts_s)
        total = self._sum_by(requests_, by_service)
        errors = self._sum_by(
            ((s, r) for s, r in requests_ if _5XX.fullmatch(s.labels.get("code", ""))),
            by_service,
        )
        gauges = {
            "memory_bytes": self._sum_by(
                ((s, s.value) for s in current if s.name == "container_memory_working_set_bytes"),
                by_service,
            ),
            "replicas_desired": self._sum_by(
                ((s, s.value) for s in current if s.name == "kube_deployment_spec_replicas"),
                by_service,
            ),
            "replicas_ready": self._sum_by(
                (
                    (s, s.value)
                    for s in current
                    if s.name == "kube_deployment_status_replicas_available"
                ),
                by_service,
            ),
        }
        rates = {
            column: self._sum_by(self._rates(current, metric, ts_s), by_service)
            for column, metric in (
                ("cpu_cores", "container_cpu_usage_seconds_total"),
                ("net_rx_bytes_per_s", "container_network_receive_bytes_total"),
                ("net_tx_bytes_per_s", "container_network_transmit_bytes_total"),
            )
        }
        quantiles = self._quantiles(current, ts_s)

        services = set(total) | set().union(*gauges.values(), *rates.values(), quantiles)
        out: dict[str, Values] = {}
        for service in services:
            values: Values = {}
            if service in total:
                all_rps = total[service]
                values["request_rate_rps"] = all_rps
                values["throughput_rps"] = all_rps - errors.get(service, 0.0)
                values["error_ratio"] = errors.get(service, 0.0) / all_rps if all_rps > 0 else None
            for column, per_service in (*gauges.items(), *rates.items()):
                if service in per_service:
                    values[column] = per_service[service]
            values.update(quantiles.get(service, {}))
            out[service] = values
        self._entry_offered_rate(current, ts_s, out)
        return out

    def _quantiles(self, current: list[Series], ts_s: float) -> dict[str, Values]:
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for s, rate in self._rates(current, "http_request_duration_seconds_bucket", ts_s):
            service = _service_of(s)
            if service is not None and "le" in s.labels:
                buckets[service][float(s.labels["le"])] += rate
        out: dict[str, Values] = {}
        for service, by_le in buckets.items():
            pairs = list(by_le.items())
            out[service] = {
                column: _finite(histogram_quantile(q, pairs))
                for column, q in (
                    ("latency_p50_s", 0.5),
                    ("latency_p95_s", 0.95),
                    ("latency_p99_s", 0.99),
                )
            }
        return out

    def _entry_offered_rate(self, current: list[Series], ts_s: float, out: dict) -> None:
        """The entry's request rate is the load generator's offered rate, when exported."""
        offered = self._rates(current, "loadgen_requests_total", ts_s)
        if self.entry_service and offered:
            out.setdefault(self.entry_service, {})["request_rate_rps"] = sum(r for _, r in offered)

    def _node_values(self, current: list[Series], ts_s: float) -> dict[str, Values]:
        by_node = self._node_of
        idle = self._sum_by(
            (
                (s, r)
                for s, r in self._rates(current, "node_cpu_seconds_total", ts_s)
                if s.labels.get("mode") == "idle"
            ),
            by_node,
        )
        cpus = {
            node: len({s.labels.get("cpu") for s in current if self._is_idle_cpu(s, node)})
            for node in idle
        }
        total = self._sum_by(
            ((s, s.value) for s in current if s.name == "node_memory_MemTotal_bytes"), by_node
        )
        available = self._sum_by(
            ((s, s.value) for s in current if s.name == "node_memory_MemAvailable_bytes"), by_node
        )
        rx, tx = (
            self._sum_by(
                (
                    (s, r)
                    for s, r in self._rates(current, metric, ts_s)
                    if s.labels.get("device") != "lo"
                ),
                by_node,
            )
            for metric in ("node_network_receive_bytes_total", "node_network_transmit_bytes_total")
        )
        out: dict[str, Values] = defaultdict(dict)
        for node, idle_s in idle.items():
            out[node]["cpu_utilization"] = 1.0 - idle_s / cpus[node] if cpus[node] else None
        for node, total_bytes in total.items():
            if node in available and total_bytes > 0:
                out[node]["memory_utilization"] = 1.0 - available[node] / total_bytes
        for node, value in rx.items():
            out[node]["net_rx_bytes_per_s"] = value
        for node, value in tx.items():
            out[node]["net_tx_bytes_per_s"] = value
        return dict(out)

    def _node_of(self, s: Series) -> str:
        return s.labels.get("node") or self.default_node

    def _is_idle_cpu(self, s: Series, node: str) -> bool:
        return (
            s.name == "node_cpu_seconds_total"
            and s.labels.get("mode") == "idle"
            and self._node_of(s) == node
        )


def _service_of(s: Series) -> str | None:
    return s.labels.get("service") or s.labels.get("deployment")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
