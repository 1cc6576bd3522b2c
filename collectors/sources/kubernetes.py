"""Cluster state and the scale action through the Kubernetes API (the official client).

`KubernetesCluster` reads deployments (desired and available replicas), pods and nodes, scales
through the deployments' scale subresource and deletes pods. `KubernetesSource` turns that,
plus the metrics API (metrics.k8s.io) when the cluster serves it, into per-step columns.
Every API failure raises `SourceError` naming the call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity
from urllib3.exceptions import HTTPError

from collectors.errors import SourceError
from collectors.sources.base import Cluster, Sample, Source, Values

log = logging.getLogger(__name__)

METRICS_GROUP, METRICS_VERSION = "metrics.k8s.io", "v1beta1"


def api_client(
    kubeconfig: str | Path | None = None,
    context: str | None = None,
    in_cluster: bool = False,
    host: str | None = None,
) -> client.ApiClient:
    """An ApiClient from the in-cluster service account, a kubeconfig, or a bare `host` URL."""
    configuration = client.Configuration()
    if host:
        configuration.host = host
    elif in_cluster:
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig else None,
            context=context,
            client_configuration=configuration,
        )
    return client.ApiClient(configuration)


class KubernetesCluster(Cluster):
    """Deployments of one namespace as services: state, scale, pods, nodes.

    `services` restricts (and orders) the deployments; None takes every deployment matching
    `label_selector`. `timeout_s` bounds each API call.
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        services: list[str] | None = None,
        label_selector: str | None = None,
        timeout_s: float = 5.0,
    ):
        self.namespace = namespace
        self.label_selector = label_selector
        self.timeout_s = timeout_s
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._services = list(services) if services else None
        self._selectors: dict[str, dict[str, str]] = {}

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, _request_timeout=self.timeout_s, **kwargs)
        except ApiException as err:
            raise SourceError(
                f"kubernetes {what} in namespace {self.namespace!r}: HTTP {err.status} {err.reason}"
            ) from err
        except (HTTPError, OSError) as err:
            raise SourceError(f"kubernetes {what}: unreachable: {err}") from err

    def deployments(self) -> list[client.V1Deployment]:
        """The namespace's deployments that are services, in `services` order when given."""
        kwargs = {"label_selector": self.label_selector} if self.label_selector else {}
        items = self._call(
            "list deployments", self.apps.list_namespaced_deployment, self.namespace, **kwargs
        ).items
        by_name = {d.metadata.name: d for d in items}
        for name, d in by_name.items():
            self._selectors[name] = dict(d.spec.selector.match_labels or {})
        if self._services is None:
            return [by_name[n] for n in sorted(by_name)]
        return [by_name[n] for n in self._services if n in by_name]

    def services(self) -> list[str]:
        """Service (deployment) names."""
        return self._services or [d.metadata.name for d in self.deployments()]

    def replicas(self) -> dict[str, dict[str, int]]:
        """Per deployment: desired (`spec.replicas`) and ready (`status.availableReplicas`)."""
        return {
            d.metadata.name: {
                "desired": int(d.spec.replicas or 0),
                "ready": int(d.status.available_replicas or 0),
            }
            for d in self.deployments()
        }

    def scale(self, service: str, replicas: int) -> None:
        """Patch the deployment's scale subresource to `replicas`."""
        self._call(
            f"scale deployment {service} to {replicas}",
            self.apps.patch_namespaced_deployment_scale,
            service,
            self.namespace,
            {"spec": {"replicas": int(replicas)}},
        )

    def pods(self, service: str | None = None) -> list[client.V1Pod]:
        """Pods of `service` (by its deployment's selector), or of the whole namespace."""
        kwargs = {}
        if service is not None:
            if service not in self._selectors:
                self.deployments()
            labels = self._selectors.get(service)
            if not labels:
                raise SourceError(f"kubernetes: no deployment {service!r} in {self.namespace!r}")
            kwargs["label_selector"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return self._call(
            "list pods", self.core.list_namespaced_pod, self.namespace, **kwargs
        ).items

    def delete_pod(self, name: str, namespace: str | None = None) -> None:
        """Delete one pod (its deployment replaces it)."""
        ns = namespace or self.namespace
        self._call(f"delete pod {ns}/{name}", self.core.delete_namespaced_pod, name, ns)

    def service_of_pod(self, pod: client.V1Pod) -> str | None:
        """The service whose deployment selector matches the pod's labels, if any."""
        labels = pod.metadata.labels or {}
        for service, selector in self._selectors.items():
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                return service
        return None

    def nodes(self) -> list[client.V1Node]:
        """Every node of the cluster."""
        return self._call("list nodes", self.core.list_node).items

    def pod_metrics(self) -> list[dict]:
        """metrics.k8s.io PodMetrics items of the namespace (raises SourceError when absent)."""
        return self._call(
            "metrics API (pods)",
            self.custom.list_namespaced_custom_object,
            METRICS_GROUP,
            METRICS_VERSION,
            self.namespace,
            "pods",
        )["items"]

    def node_metrics(self) -> list[dict]:
        """metrics.k8s.io NodeMetrics items (raises SourceError when absent)."""
        return self._call(
            "metrics API (nodes)",
            self.custom.list_cluster_custom_object,
            METRICS_GROUP,
            METRICS_VERSION,
            "nodes",
        )["items"]


class KubernetesSource(Source):
    """Per-step columns from the Kubernetes API.

    Services: `replicas_desired`, `replicas_ready`, and, from the metrics API, `cpu_cores` and
    `memory_bytes` summed over the service's pods. Nodes: `cpu_utilization` and
    `memory_utilization` as usage over allocatable. A metrics API that answers 404 is taken as
    not installed and not asked again; other metrics API errors null its columns for the step.
    """

    name = "kubernetes"

    def __init__(self, cluster: KubernetesCluster, use_metrics_api: bool = True):
        self.cluster = cluster
        self.use_metrics_api = use_metrics_api

    def sample(self, ts_s: float) -> Sample:
        """Replicas (SourceError when the API fails) and metrics-API columns (null on error)."""
        sample = Sample()
        for service, counts in self.cluster.replicas().items():
            sample.services[service] = {
                "replicas_desired": float(counts["desired"]),
                "replicas_ready": float(counts["ready"]),
            }
        if self.use_metrics_api:
            self._metrics_api(sample)
        return sample

    def _metrics_api(self, sample: Sample) -> None:
        try:
            pod_items = self.cluster.pod_metrics()
            pods = {p.metadata.name: p for p in self.cluster.pods()}
            node_items = self.cluster.node_metrics()
            nodes = {n.metadata.name: n for n in self.cluster.nodes()}
        except SourceError as err:
            if "HTTP 404" in str(err):
                log.warning("metrics API not served; cpu/memory come from other sources only")
                self.use_metrics_api = False
                return
            sample.missing.append(str(err))
            for values in sample.services.values():
                values.update(cpu_cores=None, memory_bytes=None)
            return
        self._pod_usage(sample, pod_items, pods)
        self._node_usage(sample, node_items, nodes)

    def _pod_usage(self, sample: Sample, items: list[dict], pods: dict) -> None:
        usage: dict[str, dict[str, float]] = defaultdict(lambda: {"cpu": 0.0, "memory": 0.0})
        for item in items:
            pod = pods.get(item["metadata"]["name"])
            service = self.cluster.service_of_pod(pod) if pod is not None else None
            if service is None:
                continue
            for container in item.get("containers", []):
                usage[service]["cpu"] += float(parse_quantity(container["usage"]["cpu"]))
                usage[service]["memory"] += float(parse_quantity(container["usage"]["memory"]))
        for service, values in sample.services.items():
            if service in usage:
                values["cpu_cores"] = usage[service]["cpu"]
                values["memory_bytes"] = usage[service]["memory"]

    @staticmethod
    def _node_usage(sample: Sample, items: list[dict], nodes: dict) -> None:
        for item in items:
            node = nodes.get(item["metadata"]["name"])
            if node is None:
                continue
            allocatable = node.status.allocatable or {}
            values: Values = {}
            for column, resource in (("cpu_utilization", "cpu"), ("memory_utilization", "memory")):
                total = float(parse_quantity(allocatable.get(resource, "0")))
                used = float(parse_quantity(item["usage"][resource]))
                values[column] = used / total if total > 0 else None
            sample.nodes[item["metadata"]["name"]] = values
