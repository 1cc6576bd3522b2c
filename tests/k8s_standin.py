"""A loopback HTTP stand-in for the Kubernetes API, serving the real JSON shapes.

Enough of the API for the collector: apps/v1 deployments (list, get) and their scale
subresource (get, patch, put), core/v1 pods (list with labelSelector, delete) and nodes (list),
metrics.k8s.io pod and node metrics, and chaos-mesh.org custom objects (create, list, delete).
`fail(status, times, path_contains)` makes the next matching requests answer a `Status` error
(e.g. 500 or 409) to exercise error handling mid-run.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeStandIn:
    """State of the stand-in cluster plus the server. Use as a context manager; `url`."""

    def __init__(self, namespace: str = "shop", services=("frontend", "catalog"), replicas=2):
        self.namespace = namespace
        self.lock = threading.Lock()
        self.deployments = {s: replicas for s in services}
        self.pods: dict[str, dict] = {}
        self.chaos: dict[tuple[str, str], dict] = {}
        self.deleted_pods: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._failures: list[dict] = []
        for s in services:
            for _ in range(replicas):
                self._add_pod(s)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> KubeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, status: int, times: int = 1, path_contains: str = "") -> None:
        """Answer the next `times` requests whose path contains `path_contains` with `status`."""
        with self.lock:
            self._failures.append({"status": status, "times": times, "path": path_contains})

    # -- objects -----------------------------------------------------------------------------

    def _add_pod(self, service: str) -> None:
        name = f"{service}-7d9f8c6b5-{uuid.uuid4().hex[:5]}"
        self.pods[name] = {"service": service, "created": _now()}

    def _meta(self, name: str, **extra) -> dict:
        return {
            "name": name,
            "namespace": self.namespace,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
            "resourceVersion": "1",
            "creationTimestamp": _now(),
            **extra,
        }

    def deployment(self, name: str) -> dict:
        n = self.deployments[name]
        ready = sum(1 for p in self.pods.values() if p["service"] == name)
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self._meta(name, labels={"app": name}),
            "spec": {
                "replicas": n,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": name, "image": f"shop/{name}:1"}]},
                },
            },
            "status": {
                "replicas": n,
                "readyReplicas": min(n, ready),
                "availableReplicas": min(n, ready),
                "updatedReplicas": n,
                "observedGeneration": 1,
            },
        }

    def scale(self, name: str) -> dict:
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": self._meta(name),
            "spec": {"replicas": self.deployments[name]},
            "status": {"replicas": self.deployments[name], "selector": f"app={name}"},
        }

    def pod(self, name: str) -> dict:
        service = self.pods[name]["service"]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": self._meta(name, labels={"app": service, "pod-template-hash": "7d9f8c6b5"}),
            "spec": {"containers": [{"name": service, "image": f"shop/{service}:1"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }

    def node(self) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-1", "uid": "n1", "creationTimestamp": _now()},
            "status": {
                "capacity": {"cpu": "4", "memory": "8Gi"},
                "allocatable": {"cpu": "4", "memory": "8Gi"},
            },
        }

    def pod_metrics(self, name: str) -> dict:
        service = self.pods[name]["service"]
        return {
            "kind": "PodMetrics",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": self._meta(name),
            "timestamp": _now(),
            "window": "15s",
            "containers": [{"name": service, "usage": {"cpu": "250m", "memory": "64Mi"}}],
        }

    def reconcile(self) -> None:
        """Make the pods match the desired replicas (instantly)."""
        for service, n in self.deployments.items():
            mine = [p for p, v in self.pods.items() if v["service"] == service]
            for _ in range(n - len(mine)):
                self._add_pod(service)
            for extra in mine[n:]:
                del self.pods[extra]

    # -- HTTP --------------------------------------------------------------------------------

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _handle(self, method: str) -> None:
                path = urlparse(self.path).path
                query = parse_qs(urlparse(self.path).query)
                with standin.lock:
                    standin.requests.append((method, path))
                    for failure in standin._failures:
                        if failure["times"] > 0 and failure["path"] in path:
                            failure["times"] -= 1
                            reason = {409: "Conflict", 404: "NotFound"}.get(
                                failure["status"], "InternalError"
                            )
                            return self._status(failure["status"], reason, "injected failure")
                    try:
                        status, body = standin.route(method, path, query, self._body)
                    except KeyError as err:
                        return self._status(404, "NotFound", f"{err} not found")
                self._send(status, body)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_PUT(self):
                self._handle("PUT")

            def do_DELETE(self):
                self._handle("DELETE")

        return Handler

    def route(self, method: str, path: str, query: dict, body) -> tuple[int, dict]:
        ns = self.namespace
        apps = f"/apis/apps/v1/namespaces/{ns}/deployments"
        if path == apps and method == "GET":
            items = [self.deployment(d) for d in self.deployments]
            return 200, {"apiVersion": "apps/v1", "kind": "DeploymentList", "items": items}
        if m := re.fullmatch(rf"{apps}/([^/]+)/scale", path):
            name = m.group(1)
            self.deployments[name]  # 404 when unknown
            if method in ("PATCH", "PUT"):
                self.deployments[name] = int(body()["spec"]["replicas"])
                self.reconcile()
            return 200, self.scale(name)
        if m := re.fullmatch(rf"{apps}/([^/]+)", path):
            return 200, self.deployment(m.group(1))
        pods = f"/api/v1/namespaces/{ns}/pods"
        if path == pods and method == "GET":
            selector = dict(
                kv.split("=") for kv in query.get("labelSelector", [""])[0].split(",") if kv
            )
            items = [
                self.pod(p)
                for p in self.pods
                if not selector or self.pods[p]["service"] == selector.get("app")
            ]
            return 200, {"apiVersion": "v1", "kind": "PodList", "items": items}
        if (m := re.fullmatch(rf"{pods}/([^/]+)", path)) and method == "DELETE":
            name = m.group(1)
            pod = self.pod(name)
            del self.pods[name]
            self.deleted_pods.append(name)
            self.reconcile()
            return 200, pod
        if path == "/api/v1/nodes":
            return 200, {"apiVersion": "v1", "kind": "NodeList", "items": [self.node()]}
        if path == f"/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods":
            items = [self.pod_metrics(p) for p in self.pods]
            return 200, {
                "kind": "PodMetricsList",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "items": items,
            }
        if path == "/apis/metrics.k8s.io/v1beta1/nodes":
            item = {
                "kind": "NodeMetrics",
                "metadata": {"name": "node-1"},
                "timestamp": _now(),
                "window": "15s",
                "usage": {"cpu": "1", "memory": "2Gi"},
            }
            return 200, {"kind": "NodeMetricsList", "items": [item]}
        chaos = f"/apis/chaos-mesh.org/v1alpha1/namespaces/{ns}/"
        if path.startswith(chaos):
            return self._chaos(method, path[len(chaos) :].split("/"), body)
        raise KeyError(path)

    def _chaos(self, method: str, parts: list[str], body) -> tuple[int, dict]:
        plural = parts[0]
        if method == "POST" and len(parts) == 1:
            obj = body()
            key = (plural, obj["metadata"]["name"])
            if key in self.chaos:
                return 409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists"}
            obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now())
            self.chaos[key] = obj
            return 201, obj
        if method == "GET" and len(parts) == 1:
            items = [o for (p, _), o in self.chaos.items() if p == plural]
            return 200, {"kind": "List", "items": items}
        if method == "DELETE" and len(parts) == 2:
            obj = self.chaos.pop((plural, parts[1]))
            return 200, obj
        raise KeyError("/".join(parts))
