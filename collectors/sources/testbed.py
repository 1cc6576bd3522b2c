"""Cluster state and actions of the local testbed, through its supervisor's HTTP API.

The supervisor plays the Kubernetes API's part: `GET /replicas`, `POST /scale`, `GET /services`,
and the fault hooks `POST /faults`, `DELETE /faults/<id>`, `GET /faults`. Talking HTTP (rather
than to a `Testbed` object) lets the collector run in another process than the testbed.
"""

from __future__ import annotations

from typing import Any

import requests

from collectors.errors import SourceError
from collectors.sources.base import Cluster, Sample, Source


class TestbedCluster(Cluster):
    """The testbed supervisor at `api_url` (e.g. `Testbed.api_url`)."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, api_url: str, session: requests.Session | None = None, timeout_s=2.0):
        self.api_url = api_url.rstrip("/")
        self.session = session or requests.Session()
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One JSON call to the supervisor; SourceError naming the call when it fails."""
        url = f"{self.api_url}{path}"
        try:
            response = self.session.request(method, url, json=body, timeout=self.timeout_s)
        except requests.RequestException as err:
            raise SourceError(f"testbed supervisor {method} {url}: unreachable: {err}") from err
        if response.status_code >= 400:
            raise SourceError(
                f"testbed supervisor {method} {url}: HTTP {response.status_code} "
                f"{response.text[:200]}"
            )
        return response.json() if response.content else None

    def describe(self) -> dict:
        """`GET /services`: services (entry first), entry, call graph, scrape targets."""
        return self.request("GET", "/services")

    def sd_groups(self) -> list[dict]:
        """`GET /sd`: scrape targets as Prometheus service-discovery groups, with labels."""
        return self.request("GET", "/sd")

    def replicas(self) -> dict[str, dict[str, int]]:
        """Per service: {"desired": int, "ready": int}."""
        answer = self.request("GET", "/replicas")
        answer = answer.get("replicas", answer)
        return {
            s: {"desired": int(v["desired"]), "ready": int(v["ready"])} for s, v in answer.items()
        }

    def scale(self, service: str, replicas: int) -> None:
        """Set the desired replicas of `service`."""
        self.request("POST", "/scale", {"service": service, "replicas": int(replicas)})

    def inject(self, fault_type: str, target: str, severity: float, duration_s: float) -> str:
        """Start a fault; the supervisor expires it by itself after `duration_s`."""
        answer = self.request(
            "POST",
            "/faults",
            {"type": fault_type, "target": target, "severity": severity, "duration_s": duration_s},
        )
        return str(answer["id"])

    def rollback(self, fault_id: str) -> None:
        """End a fault now."""
        self.request("DELETE", f"/faults/{fault_id}")

    def active_faults(self) -> list[dict]:
        """The faults active now, as the supervisor describes them."""
        answer = self.request("GET", "/faults")
        return answer.get("faults", answer) if isinstance(answer, dict) else answer


class TestbedSource(Source):
    """Replica columns from the supervisor (desired and ready per service)."""

    __test__ = False
    name = "testbed"

    def __init__(self, cluster: TestbedCluster):
        self.cluster = cluster

    def sample(self, ts_s: float) -> Sample:
        """`replicas_desired` and `replicas_ready` per service."""
        return Sample(
            services={
                s: {"replicas_desired": float(v["desired"]), "replicas_ready": float(v["ready"])}
                for s, v in self.cluster.replicas().items()
            }
        )
