"""Collection on the real testbed: PromQL through a real Prometheus against direct scraping,
and a Prometheus killed mid-collection. Needs /usr/bin/prometheus (CI installs it)."""

import threading
import time

import pytest

from collectors.collector import Collector, RunInfo
from collectors.memory import MemoryStore
from collectors.prometheus_server import PrometheusServer, find_prometheus
from collectors.queries import load_queries
from collectors.sources.prometheus import PrometheusSource
from collectors.sources.scrape import ScrapeSource
from collectors.sources.testbed import TestbedCluster, TestbedSource
from collectors.testbed import ConstantLoad, Testbed, TestbedConfig

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        find_prometheus() is None,
        reason="needs the prometheus binary (/usr/bin/prometheus; .ci/run installs it)",
    ),
]

INTERVAL_S = 2.0
WINDOW = "4s"  # two intervals, the default rate window


@pytest.fixture(scope="module")
def testbed():
    with Testbed(TestbedConfig(load=ConstantLoad(20.0))) as tb:
        yield tb


@pytest.fixture(scope="module")
def prometheus(testbed):
    with PrometheusServer(sd_url=testbed.sd_url, scrape_interval_s=1.0) as server:
        yield server


def _sources(testbed, prometheus):
    cluster = TestbedCluster(testbed.api_url)
    queries = load_queries().render(testbed.namespace, WINDOW)
    scrape = ScrapeSource(
        cluster.sd_groups,
        window_s=2 * INTERVAL_S,
        entry_service=testbed.entry_service,
        default_node=testbed.node_name,
    )
    prom = PrometheusSource(prometheus.url, queries, entry_service=testbed.entry_service)
    return cluster, scrape, prom


def test_promql_agrees_with_direct_scraping(testbed, prometheus):
    """Averaged over 6 samples 2 s apart: request rates, throughput, CPU and network rates
    within 30 % (+0.5 rps or +0.02 cores of slack: Prometheus' 1 s scrapes and extrapolation
    see slightly different windows), memory within 10 %, replicas equal, p50 within 50 %."""
    _, scrape, prom = _sources(testbed, prometheus)
    time.sleep(5.0)  # Prometheus needs a few scrapes for rates
    pairs = []
    scrape.sample(time.time())
    for _ in range(6):
        time.sleep(INTERVAL_S)
        now = time.time()
        pairs.append((scrape.sample(now), prom.sample(now)))

    def mean(samples, service, column):
        values = [s.services.get(service, {}).get(column) for s in samples]
        values = [v for v in values if v is not None]
        assert values, f"{service}.{column}: no values"
        return sum(values) / len(values)

    direct, promql = [a for a, _ in pairs], [b for _, b in pairs]
    for service in testbed.services:
        for column, rel, slack in [
            ("request_rate_rps", 0.3, 0.5),
            ("throughput_rps", 0.3, 0.5),
            ("cpu_cores", 0.3, 0.02),
            ("net_rx_bytes_per_s", 0.3, 50.0),
            ("memory_bytes", 0.1, 0.0),
            ("replicas_desired", 0.0, 0.0),
            ("replicas_ready", 0.0, 0.0),
            ("latency_p50_s", 0.5, 0.005),
        ]:
            a, b = mean(direct, service, column), mean(promql, service, column)
            assert abs(a - b) <= rel * max(abs(a), abs(b)) + slack, (service, column, a, b)
    entry = testbed.entry_service
    assert mean(promql, entry, "request_rate_rps") == pytest.approx(20.0, rel=0.3)
    node = testbed.node_name
    assert promql[-1].nodes[node]["memory_utilization"] == pytest.approx(
        direct[-1].nodes[node]["memory_utilization"], abs=0.05
    )


def test_prometheus_killed_mid_collection(testbed, prometheus):
    """The run completes, the steps while Prometheus is down are null (replicas, read from the
    supervisor, are not), and the last steps are whole again."""
    cluster, _, prom = _sources(testbed, prometheus)
    store = MemoryStore()
    run = RunInfo(
        "tb-test-prom-kill",
        "testbed",
        "testbed",
        INTERVAL_S,
        tuple(testbed.services),
        testbed.entry_service,
    )

    def chaos(step, ts_s, rows):
        if step == 3:
            prometheus.kill()
        if step == 5:
            threading.Thread(target=prometheus.start, daemon=True).start()

    collector = Collector(
        run, [TestbedSource(cluster), prom], store=store, on_step=[chaos], backoff_max_s=4.0
    )
    stats = collector.run(n_steps=15)
    frame = store.frame().sort("step", "service")
    assert stats.steps == 15 and stats.source_failures >= 1
    steps = sorted(frame["step"].unique().to_list())
    assert steps == list(range(15))
    rate = {k: frame.filter(frame["step"] == k)["request_rate_rps"].to_list() for k in steps}
    assert any(all(v is None for v in rate[k]) for k in (4, 5, 6)), rate  # the gap is null
    for k in (13, 14):
        whole = frame.filter(frame["step"] == k)
        for column in ("request_rate_rps", "cpu_cores", "memory_bytes", "replicas_ready"):
            assert whole[column].null_count() == 0, (k, column, whole)
    assert frame["replicas_desired"].null_count() == 0
