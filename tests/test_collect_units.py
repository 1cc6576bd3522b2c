"""Unit tests of the collection core: PromQL math, the direct scraper, the sampling loop, the
fault injector (fake backend), the actuator and the explorers. No testbed, no network beyond a
loopback HTTP server."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from collectors.actuator import ReplicaActuator
from collectors.collector import Collector, FakeClock, RunInfo
from collectors.errors import ConfigError, FaultError, SourceError
from collectors.explore import HpaWithNoise, RandomWalk, StepSchedule
from collectors.faults import (
    FaultBackend,
    FaultInjector,
    FaultJournal,
    FaultSpec,
    Guardrails,
    random_schedule,
    recover_fault_journals,
)
from collectors.memory import MemoryStore
from collectors.queries import QuerySet, load_queries
from collectors.sink import ParquetSink
from collectors.sources.base import Cluster, Sample, Source
from collectors.sources.promql import extrapolated_rate, histogram_quantile
from collectors.sources.scrape import ScrapeSource

SERVICES = ("frontend", "catalog")


# -- PromQL math -----------------------------------------------------------------------------


def test_rate_without_extrapolation_is_increase_over_range():
    samples = [(0.0, 0.0), (1.0, 10.0), (2.0, 20.0), (3.0, 30.0)]
    assert extrapolated_rate(samples, 0.0, 3.0) == pytest.approx(10.0)


def test_rate_counts_a_reset_as_a_restart_from_zero():
    samples = [(0.0, 10.0), (1.0, 20.0), (2.0, 5.0), (3.0, 15.0)]
    # increase: 10 (to 20) + 5 (restart to 5) + 10 = 25 over 3 s
    assert extrapolated_rate(samples, 0.0, 3.0) == pytest.approx(25.0 / 3.0)


def test_rate_extrapolates_like_prometheus():
    # 2 samples 1 s apart in a 4 s range: start gap 1 s < 1.1 avg (but capped at the zero
    # crossing, 1 s), end gap 2 s >= 1.1 avg -> half an interval: 10 * 2.5 / 1 / 4.
    assert extrapolated_rate([(1.0, 10.0), (2.0, 20.0)], 0.0, 4.0) == pytest.approx(6.25)
    assert extrapolated_rate([(1.0, 10.0)], 0.0, 4.0) is None


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = [(0.1, 10.0), (0.2, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.2)


def test_histogram_quantile_inf_bucket_and_edge_cases():
    assert histogram_quantile(0.9, [(0.1, 10.0), (math.inf, 20.0)]) == pytest.approx(0.1)
    assert math.isnan(histogram_quantile(0.5, [(0.1, 10.0), (0.2, 20.0)]))
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(-1, [(0.1, 1.0), (math.inf, 1.0)]) == -math.inf
    # non-monotonic counts are forced monotonic, equal bounds merged
    assert histogram_quantile(0.5, [(0.1, 10.0), (0.2, 8.0), (math.inf, 20.0)]) == pytest.approx(
        0.1
    )


def test_default_queries_load_and_render():
    queries = load_queries().render("shop", "30s")
    assert 'namespace="shop"' in queries.service["request_rate_rps"]
    assert "[30s]" in queries.service["cpu_cores"]
    assert '"$1"' in queries.service["cpu_cores"]
    with pytest.raises(ConfigError, match="unknown column"):
        QuerySet(service={"latency_p42_s": "up"})


# -- the direct scraper ----------------------------------------------------------------------


class _Exporter(BaseHTTPRequestHandler):
    body = ""

    def do_GET(self):
        data = type(self).body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _exposition(requests_ok, requests_5xx, le_counts, cpu_s, idle_s):
    lines = [
        f'http_requests_total{{service="frontend",code="200"}} {requests_ok}',
        f'http_requests_total{{service="frontend",code="503"}} {requests_5xx}',
        'http_requests_total{service="catalog",code="200"} 7',
    ]
    for le, count in le_counts:
        lines.append(
            f'http_request_duration_seconds_bucket{{service="frontend",le="{le}"}} {count}'
        )
    lines += [
        f'container_cpu_usage_seconds_total{{service="frontend",pod="frontend-a"}} {cpu_s}',
        f'container_cpu_usage_seconds_total{{service="frontend",pod="frontend-b"}} {cpu_s}',
        'container_memory_working_set_bytes{service="frontend",pod="frontend-a"} 100',
        'container_memory_working_set_bytes{service="frontend",pod="frontend-b"} 50',
        'kube_deployment_spec_replicas{deployment="frontend"} 2',
        f'node_cpu_seconds_total{{node="n1",cpu="0",mode="idle"}} {idle_s}',
        f'node_cpu_seconds_total{{node="n1",cpu="1",mode="idle"}} {idle_s}',
        'node_memory_MemTotal_bytes{node="n1"} 1000',
        'node_memory_MemAvailable_bytes{node="n1"} 250',
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def exporter():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_scraper_computes_promql_columns_and_handles_a_reset(exporter):
    source = ScrapeSource({"app": [exporter]}, window_s=2.0)
    buckets0 = [("0.1", 0), ("0.2", 0), ("+Inf", 0)]
    _Exporter.body = _exposition(100, 10, buckets0, 5.0, 10.0)
    first = source.sample(1000.0)
    assert "request_rate_rps" not in first.services.get("frontend", {})  # one sample: no rate

    # +20 ok, +20 5xx in 2 s; cpu +1 s per pod; idle +1 s per cpu; 40 observations.
    buckets1 = [("0.1", 20), ("0.2", 40), ("+Inf", 40)]
    _Exporter.body = _exposition(120, 30, buckets1, 6.0, 11.0)
    s = source.sample(1002.0).services["frontend"]
    assert s["request_rate_rps"] == pytest.approx(20.0)
    assert s["throughput_rps"] == pytest.approx(10.0)
    assert s["error_ratio"] == pytest.approx(0.5)
    assert s["latency_p50_s"] == pytest.approx(0.1)
    assert s["latency_p95_s"] == pytest.approx(0.19)
    assert s["cpu_cores"] == pytest.approx(1.0)
    assert s["memory_bytes"] == 150
    assert s["replicas_desired"] == 2

    # a counter reset (replica restarted): the new value counts from zero
    _Exporter.body = _exposition(4, 0, buckets1, 6.5, 12.0)
    sample = source.sample(1004.0)
    assert sample.services["frontend"]["request_rate_rps"] == pytest.approx(4 / 2.0)
    assert sample.services["catalog"]["error_ratio"] is None  # no requests: null, not 0
    assert sample.nodes["n1"]["cpu_utilization"] == pytest.approx(0.5)
    assert sample.nodes["n1"]["memory_utilization"] == pytest.approx(0.75)


def test_scraper_raises_when_no_target_answers():
    source = ScrapeSource({"app": ["127.0.0.1:9"]}, window_s=2.0, timeout_s=0.2)
    with pytest.raises(SourceError, match="no target answered"):
        source.sample(1.0)


# -- the sampling loop -----------------------------------------------------------------------


class _FakeSource(Source):
    """Values = step count; fails on the given calls; advances the clock on slow calls."""

    name = "fake"

    def __init__(self, clock, fail_calls=(), slow_calls=(), slow_s=0.0):
        self.clock, self.fail_calls, self.slow_calls, self.slow_s = (
            clock,
            set(fail_calls),
            set(slow_calls),
            slow_s,
        )
        self.calls = 0

    def sample(self, ts_s):
        self.calls += 1
        if self.calls in self.slow_calls:
            self.clock.advance(self.slow_s)
        if self.calls in self.fail_calls:
            raise SourceError("fake source down")
        return Sample(
            services={
                s: {"request_rate_rps": float(self.calls), "replicas_desired": 2.0}
                for s in SERVICES
            },
            nodes={"n1": {"cpu_utilization": 0.5}},
        )


def _run(interval_s=2.0):
    return RunInfo("tb-test-0001", "testbed", "unit", interval_s, SERVICES, "frontend")


def test_loop_keeps_schedule_flags_late_steps_and_skips_none():
    clock = FakeClock(1000.0)
    # call 1 is the priming read; call 4 (step 2) takes 3 s, so step 3 starts 1 s late
    source = _FakeSource(clock, slow_calls={4}, slow_s=3.0)
    store = MemoryStore()
    collector = Collector(_run(), [source], store=store, clock=clock)
    stats = collector.run(n_steps=6)
    frame = store.frame()
    assert stats.steps == 6 and stats.late_steps == 1
    assert sorted(set(frame["step"].to_list())) == list(range(6))
    ts = [t.timestamp() for t in frame.filter(frame["service"] == "frontend")["ts"].to_list()]
    assert ts[3] - ts[0] == pytest.approx(3 * 2.0 + 1.0)  # late, not skipped
    assert ts[4] - ts[0] == pytest.approx(4 * 2.0)  # back on schedule: no drift
    assert frame["replicas_desired"].dtype.is_integer()


def test_failed_source_gives_nulls_and_is_retried_with_backoff():
    clock = FakeClock(1000.0)
    source = _FakeSource(clock, fail_calls={3, 4})  # steps 1 and (retry after 2 s) 2 fail
    store = MemoryStore()
    stats = Collector(_run(), [source], store=store, clock=clock).run(n_steps=8)
    front = store.frame().filter(store.frame()["service"] == "frontend")
    values = front["request_rate_rps"].to_list()
    assert values[0] is not None and values[1] is None and values[2] is None
    assert values[3] is None  # back-off doubled to 4 s: step 3 not tried
    assert all(v is not None for v in values[4:])
    assert stats.source_failures == 2
    nodes = store.frame("node_metrics")  # a node once seen keeps its rows, null when unread
    assert nodes.height == 8 and nodes["cpu_utilization"].null_count() == 3


def test_first_source_wins_and_runs_row_is_written(tmp_path):
    clock = FakeClock(1000.0)

    class Replicas(Source):
        name = "replicas"

        def sample(self, ts_s):
            return Sample(
                services={s: {"replicas_desired": 3.0, "replicas_ready": 1.0} for s in SERVICES}
            )

    with ParquetSink(tmp_path / "ds") as sink:
        store = MemoryStore()
        Collector(_run(), [Replicas(), _FakeSource(clock)], store, sink, clock).run(n_steps=2)
    latest = store.latest()
    assert latest["replicas_desired"].to_list() == [3, 3]
    assert latest["request_rate_rps"].to_list() == [3.0, 3.0]
    runs = store.frame("runs")
    assert runs["services"].to_list() == [list(SERVICES)]
    assert (tmp_path / "ds" / "service_metrics").is_dir()


# -- fault injection -------------------------------------------------------------------------


class _FakeBackend(FaultBackend):
    name = "fake"

    def __init__(self, namespace="testbed", fail_rollback=0):
        self.namespace = namespace
        self.active: dict[str, FaultSpec] = {}
        self.injected = 0
        self.fail_rollback = fail_rollback

    def inject(self, spec, guardrails):
        self.injected += 1
        handle = f"f{self.injected}"
        self.active[handle] = spec
        return handle, {"fault_id": handle}

    def rollback(self, handle):
        if self.fail_rollback:
            self.fail_rollback -= 1
            raise FaultError("rollback refused")
        self.active.pop(handle, None)


def _spec(at_s, target="catalog", duration_s=4.0, fault_type="latency"):
    return FaultSpec(at_s=at_s, type=fault_type, target=target, severity=0.5, duration_s=duration_s)


def test_injector_runs_schedule_rolls_back_and_records_true_times():
    clock, backend = FakeClock(1000.0), _FakeBackend()
    schedule = [_spec(1.0), _spec(2.0, "frontend", 10.0), _spec(3.0, "payment")]
    injector = FaultInjector(
        backend, schedule, "tb-x", Guardrails(("testbed",), max_concurrent=2), clock=clock
    )
    injector._t0_s = 1000.0
    for t in [1000.5, 1001.0, 1002.0, 1003.0, 1005.0, 1006.0]:
        injector.tick(t)
    assert backend.injected == 2  # the third exceeded max_concurrent
    assert injector.skipped[0][1].endswith("(max_concurrent)")
    [event] = injector.events
    assert event["target"] == "catalog"
    assert event["ts_start"].timestamp() == pytest.approx(1001.0)
    assert event["ts_end"].timestamp() == pytest.approx(1005.0)
    clock.t = 1006.0
    injector.rollback_all()  # as on SIGTERM
    assert not backend.active and len(injector.events) == 2
    assert injector.events[1]["ts_end"].timestamp() == pytest.approx(1006.0)


def test_guardrails_allow_list_protected_and_dry_run():
    with pytest.raises(FaultError, match="allow-list"):
        FaultInjector(_FakeBackend("prod"), [], "r", Guardrails(("testbed",)))
    backend = _FakeBackend()
    rails = Guardrails(("testbed",), protected_services=("catalog",))
    injector = FaultInjector(backend, [_spec(0.0)], "r", rails, clock=FakeClock(0.0))
    injector._t0_s = 0.0
    injector.tick(0.1)
    assert backend.injected == 0 and "protected" in injector.skipped[0][1]
    dry = FaultInjector(
        backend, [_spec(0.0)], "r", Guardrails(("testbed",), dry_run=True), clock=FakeClock(0.0)
    )
    dry._t0_s = 0.0
    dry.tick(0.1)
    assert backend.injected == 0 and dry.skipped[0][1] == "dry run" and not dry.events


def test_failed_rollback_is_retried_then_recorded_at_planned_end():
    backend = _FakeBackend(fail_rollback=100)
    injector = FaultInjector(
        backend, [_spec(0.0)], "r", Guardrails(("testbed",)), clock=FakeClock()
    )
    injector._t0_s = 0.0
    injector.tick(0.0)
    injector.tick(4.0)
    assert injector.active and not injector.events  # retried later
    injector.tick(10.0)
    assert injector.events[0]["ts_end"].timestamp() == pytest.approx(4.0)


def test_journal_recovers_events_of_a_killed_run(tmp_path):
    dataset = tmp_path / "ds"
    backend = _FakeBackend()
    injector = FaultInjector(
        backend,
        [_spec(0.0, duration_s=5.0), _spec(1.0, "payment", duration_s=1.0)],
        "tb-killed-0001",
        Guardrails(("testbed",)),
        journal=FaultJournal(dataset, "tb-killed-0001"),
        clock=FakeClock(),
    )
    injector._t0_s = 1000.0
    injector.tick(1000.0)
    injector.tick(1001.0)
    injector.tick(1002.0)  # payment ends; catalog still active when the process "dies"
    with ParquetSink(dataset) as sink:
        sink.write("events", injector.events)  # what had reached the sink
        sink.flush()
        assert recover_fault_journals(dataset, sink) == 1
    from collectors.dataset import read_table

    events = read_table(dataset, "events").collect().sort("ts_start")
    assert events["target"].to_list() == ["catalog", "payment"]
    ends = [t.timestamp() for t in events["ts_end"].to_list()]
    assert ends == pytest.approx([1005.0, 1002.0])  # planned end; logged rollback
    assert not (dataset / "_faults" / "tb-killed-0001.jsonl").exists()


def test_random_schedule_is_seeded_and_within_ranges():
    kwargs = dict(
        horizon_s=600,
        targets=["a", "b"],
        rates_per_min={"latency": 2.0, "pod_kill": 0.5},
        duration_s=(5, 20),
        severity=(0.2, 0.8),
    )
    one, two = random_schedule(seed=1, **kwargs), random_schedule(seed=1, **kwargs)
    assert one == two and len(one) > 5
    assert all(5 <= f.duration_s <= 20 and 0.2 <= f.severity <= 0.8 for f in one)
    assert all(f.at_s + f.duration_s < 600 for f in one)
    with pytest.raises(ConfigError):
        random_schedule(seed=1, **{**kwargs, "rates_per_min": {"meteor": 1.0}})


# -- actuator and explorers ------------------------------------------------------------------


class _FakeCluster(Cluster):
    def __init__(self):
        self.desired = {s: 2 for s in SERVICES}

    def replicas(self):
        return {s: {"desired": n, "ready": n} for s, n in self.desired.items()}

    def scale(self, service, replicas):
        self.desired[service] = replicas


def test_actuator_clamps_and_records_scale_events():
    cluster, store = _FakeCluster(), MemoryStore()
    actuator = ReplicaActuator(cluster, "tb-a", 1, 6, store=store, clock=FakeClock())
    rows = actuator.apply({"frontend": 9, "catalog": 2})
    assert cluster.desired == {"frontend": 6, "catalog": 2}
    assert len(rows) == 1 and json.loads(rows[0]["params"]) == {"from": 2, "to": 6}
    events = store.frame("events")
    assert events["kind"].to_list() == ["scale"] and events["origin"].to_list() == ["explorer"]


def test_random_walk_stays_in_bounds_and_covers_them():
    walk = RandomWalk(SERVICES, 1, 6, dwell_steps=(1, 2), seed=3)
    seen = set()
    rows = [{"service": s, "replicas_desired": 2} for s in SERVICES]
    for step in range(400):
        for n in walk.propose(step, rows).values():
            assert 1 <= n <= 6
            seen.add(n)
    assert seen == set(range(1, 7))


def test_hpa_with_noise_follows_the_hpa_rule():
    hpa = HpaWithNoise(["frontend"], 0.5, cpu_request_cores=0.1, noise_sd=0.0)
    rows = [{"service": "frontend", "replicas_desired": 2, "replicas_ready": 2, "cpu_cores": 0.2}]
    assert hpa.propose(0, rows) == {"frontend": 4}  # utilisation 1.0 vs 0.5 -> double
    assert StepSchedule([(3, {"catalog": 4})]).propose(3, rows) == {"catalog": 4}
