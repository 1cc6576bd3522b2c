"""The Kubernetes path through the official client, against a loopback stand-in of the API."""

import threading
import time

import pytest

from collectors.actuator import ReplicaActuator
from collectors.collector import Collector, RunInfo
from collectors.errors import FaultError, SourceError
from collectors.faults import FaultInjector, FaultSpec, Guardrails, KubernetesFaultBackend
from collectors.memory import MemoryStore
from collectors.sources.kubernetes import KubernetesCluster, KubernetesSource, api_client
from tests.k8s_standin import KubeStandIn

NS = "shop"


@pytest.fixture
def standin():
    with KubeStandIn(NS, services=("frontend", "catalog"), replicas=2) as server:
        yield server


@pytest.fixture
def cluster(standin):
    return KubernetesCluster(api_client(host=standin.url), NS, services=["frontend", "catalog"])


def test_state_scale_and_metrics_api(standin, cluster):
    assert cluster.replicas() == {
        "frontend": {"desired": 2, "ready": 2},
        "catalog": {"desired": 2, "ready": 2},
    }
    cluster.scale("catalog", 3)
    assert ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/catalog/scale") in standin.requests
    assert cluster.replicas()["catalog"] == {"desired": 3, "ready": 3}
    assert len(cluster.pods("catalog")) == 3

    sample = KubernetesSource(cluster).sample(time.time())
    assert sample.services["catalog"]["cpu_cores"] == pytest.approx(0.75)  # 3 x 250m
    assert sample.services["frontend"]["memory_bytes"] == 2 * 64 * 2**20
    assert sample.nodes["node-1"]["cpu_utilization"] == pytest.approx(0.25)

    standin.fail(409, path_contains="/scale")
    with pytest.raises(SourceError, match="HTTP 409"):
        cluster.scale("catalog", 1)


def test_collection_survives_an_api_error_mid_run(standin, cluster):
    store = MemoryStore()
    run = RunInfo("k8s-test-0001", "kubernetes", "shop", 0.25, ("frontend", "catalog"), "frontend")
    actuator = ReplicaActuator(cluster, run.run_id, 1, 4, store=store)

    def hook(step, ts_s, rows):
        if step == 3:
            standin.fail(500, times=1, path_contains="/deployments")  # the next read fails
        if step == 6:
            actuator.apply({"frontend": 3})

    collector = Collector(run, [KubernetesSource(cluster)], store=store, on_step=[hook])
    stats = collector.run(n_steps=14)
    frame = store.frame().filter(store.frame()["service"] == "frontend").sort("step")
    desired = frame["replicas_desired"].to_list()
    assert stats.steps == 14 and stats.source_failures == 1
    assert desired[4] is None  # the failed step is null, not dropped
    assert all(v is not None for i, v in enumerate(desired) if i != 4)
    assert desired[-1] == 3 and desired[0] == 2
    assert store.frame("events")["target"].to_list() == ["frontend"]


def test_fault_backend_pod_kill_chaos_objects_and_guardrails(standin, cluster):
    backend = KubernetesFaultBackend(cluster, seed=1)
    protected = sorted(p for p, v in standin.pods.items() if v["service"] == "frontend")[0]
    rails = Guardrails((NS,), max_concurrent=3, protected_pods=(protected,))

    handle, params = backend.inject(FaultSpec(0, "pod_kill", "frontend", 1.0, 5.0), rails)
    assert protected not in params["pods"] and len(params["pods"]) == 1  # never the protected
    assert standin.deleted_pods == params["pods"]

    with pytest.raises(FaultError, match="protected"):
        backend.inject(FaultSpec(0, "cpu_stress", "frontend", 0.5, 5.0), rails)

    injector = FaultInjector(
        backend,
        [
            FaultSpec(0.0, "cpu_stress", "catalog", 0.5, 30.0),
            FaultSpec(0.0, "network_delay", "catalog", 0.5, 30.0),
            FaultSpec(0.0, "error", "catalog", 0.5, 30.0),
        ],
        "k8s-test-0002",
        rails,
        tick_s=0.05,
    )
    injector.start()
    deadline = time.monotonic() + 5
    while len(standin.chaos) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    kinds = sorted(o["kind"] for o in standin.chaos.values())
    assert kinds == ["HTTPChaos", "NetworkChaos", "StressChaos"]
    assert all(o["spec"]["duration"] == "30s" for o in standin.chaos.values())
    assert all(
        o["spec"]["selector"]["labelSelectors"] == {"app": "catalog"}
        for o in standin.chaos.values()
    )

    standin.fail(500, times=1, path_contains="chaos-mesh.org")  # one rollback fails, is retried
    injector.stop()
    assert standin.chaos == {}
    assert sorted(e["type"] for e in injector.events) == ["cpu_stress", "error", "network_delay"]

    with pytest.raises(FaultError, match="allow-list"):
        FaultInjector(backend, [], "r", Guardrails(("other",)))


def test_unreachable_api_is_a_source_error():
    cluster = KubernetesCluster(api_client(host="http://127.0.0.1:9"), NS, timeout_s=0.5)
    with pytest.raises(SourceError, match="unreachable"):
        cluster.replicas()


def test_stop_event_ends_a_run_early(cluster):
    stop = threading.Event()
    run = RunInfo("k8s-test-0003", "kubernetes", "shop", 0.2, ("frontend",), "frontend")
    collector = Collector(run, [KubernetesSource(cluster)], stop_event=stop)
    threading.Timer(0.7, stop.set).start()
    stats = collector.run(n_steps=1000)
    assert 1 <= stats.steps < 20
