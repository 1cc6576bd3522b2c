"""The local testbed on real processes: replicas, scaling, faults, metrics, load and shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from collectors.errors import ConfigError, FaultError
from collectors.schema import FAULT_TYPES
from collectors.testbed import (
    JOBS,
    ConstantLoad,
    DiurnalLoad,
    RampLoad,
    ServiceSpec,
    SpikeLoad,
    Testbed,
    TestbedConfig,
    TraceLoad,
    curve_from_spec,
)
from collectors.testbed.fault_effects import REPLICA_FAULTS

NEZHA_FRONTEND = "/work/shared/data/nezha-ob/rca_data/2022-08-23/metric/frontend-*_metric.csv"
FAST = dict(startup_delay_s=1.0, restart_backoff_s=1.0)


def scrape(target: str) -> list:
    """Every sample of one /metrics target."""
    text = requests.get(f"http://{target}/metrics", timeout=5).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def app_sum(tb: Testbed, name: str, **labels: str) -> float:
    """Sum of the samples called `name` with `labels` over every replica."""
    total = 0.0
    for target in tb.scrape_targets()["app"]:
        for s in scrape(target):
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def mean_latency_s(tb: Testbed, service: str, window_s: float) -> float:
    """Mean request latency of `service` over the next `window_s` seconds."""
    sum0 = app_sum(tb, "http_request_duration_seconds_sum", service=service)
    n0 = app_sum(tb, "http_request_duration_seconds_count", service=service)
    time.sleep(window_s)
    sum1 = app_sum(tb, "http_request_duration_seconds_sum", service=service)
    n1 = app_sum(tb, "http_request_duration_seconds_count", service=service)
    assert n1 > n0, f"no {service} request in {window_s}s"
    return (sum1 - sum0) / (n1 - n0)


def loadgen_counts(tb: Testbed) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Requests by code and the cumulative latency buckets (le, count) of the load generator."""
    samples = scrape(tb.scrape_targets()["loadgen"][0])
    codes = {s.labels["code"]: s.value for s in samples if s.name == "loadgen_requests_total"}
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for s in samples
        if s.name == "loadgen_request_duration_seconds_bucket"
    )
    return codes, buckets


def entry_p95_s(tb: Testbed, window_s: float) -> float:
    """Upper bucket bound of the entry's 95th latency percentile over the next `window_s`."""
    _, before = loadgen_counts(tb)
    time.sleep(window_s)
    _, after = loadgen_counts(tb)
    counts = [(le, n1 - n0) for (le, n1), (_, n0) in zip(after, before, strict=True)]
    total = counts[-1][1]
    assert total > 0, "no answered request in the window"
    return next(le for le, n in counts if n >= 0.95 * total)


def replica_states(tb: Testbed, service: str) -> list[dict]:
    return [
        requests.get(f"http://127.0.0.1:{p['port']}/state", timeout=5).json()
        for p in tb.pods()
        if p["service"] == service and p["pid"] is not None and p["port"]
    ]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


def pids_of_testbed(supervisor_pid: int) -> list[int]:
    return [supervisor_pid] + [p.pid for p in psutil.Process(supervisor_pid).children(True)]


def all_gone(pids: list[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return not alive


# ---- without processes ----------------------------------------------------------------------


def test_load_curves_follow_their_shape():
    assert ConstantLoad(12).rate_at(100) == 12
    ramp = RampLoad(start_rps=0, end_rps=10, duration_s=10)
    assert [ramp.rate_at(t) for t in (0, 5, 10, 50)] == [0, 5, 10, 10]
    day = DiurnalLoad(mean_rps=10, amplitude_rps=5, period_s=100)
    assert day.rate_at(25) == pytest.approx(15) and day.rate_at(75) == pytest.approx(5)
    spike = SpikeLoad(base_rps=2, spike_rps=30, start_s=10, duration_s=5, period_s=20)
    assert [spike.rate_at(t) for t in (0, 11, 16, 31)] == [2, 30, 2, 30]
    inline = TraceLoad(values=(1, 3, 2), step_s=2, peak_rps=30, loop=False)
    assert [inline.rate_at(t) for t in (0, 1, 2, 100)] == [10, 20, 30, 20]


def test_trace_replays_nezha_workload_scaled_to_peak():
    trace = TraceLoad(path=NEZHA_FRONTEND, step_s=2, peak_rps=40)
    rates = [trace.rate_at(t) for t in range(0, int(trace.duration_s), 2)]
    assert max(rates) == pytest.approx(40) and min(rates) >= 0 and len(set(rates)) > 10


def test_curve_specs_round_trip_and_reject_unknown_kinds():
    for curve in (ConstantLoad(3), RampLoad(), DiurnalLoad(), SpikeLoad(), TraceLoad(values=(1,))):
        assert curve_from_spec(curve.to_dict()) == curve
    with pytest.raises(ConfigError, match="kind"):
        curve_from_spec({"kind": "sawtooth"})


def test_config_round_trips_and_checks_services():
    cfg = TestbedConfig(initial_replicas={"catalog": 2}, load=SpikeLoad())
    again = TestbedConfig.from_dict(cfg.to_dict())
    assert again.services == cfg.services and again.load == cfg.load
    assert cfg.service_names == ["frontend", "catalog", "checkout", "payment"]
    assert cfg.call_graph == [("frontend", "catalog"), ("frontend", "checkout"),
                              ("checkout", "payment")]  # fmt: skip
    with pytest.raises(ConfigError, match="unknown service"):
        TestbedConfig(services=(ServiceSpec("a", calls=("b",)),))
    with pytest.raises(ConfigError, match="outside"):
        TestbedConfig(initial_replicas={"catalog": 9})
    assert set(REPLICA_FAULTS) | {"pod_kill"} == set(FAULT_TYPES)


# ---- one shared testbed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb():
    with Testbed(TestbedConfig(load=ConstantLoad(20), **FAST)) as testbed:
        yield testbed


def test_api_describes_the_application(tb):
    assert tb.services == ["frontend", "catalog", "checkout", "payment"]
    assert tb.entry_service == "frontend" and tb.node_name == "testbed-node"
    assert ("checkout", "payment") in tb.call_graph
    assert tb.replicas() == {s: {"desired": 1, "ready": 1} for s in tb.services}
    targets = tb.scrape_targets()
    assert set(targets) == set(JOBS) and len(targets["app"]) == 4
    sd = tb.sd_targets()
    assert {g["labels"]["job"] for g in sd} == set(JOBS)
    app_labels = [g["labels"] for g in sd if g["labels"]["job"] == "app"]
    assert {lab["service"] for lab in app_labels} == set(tb.services)
    assert all(lab["namespace"] == "testbed" and lab["pod"] for lab in app_labels)


def test_metrics_carry_the_cluster_names(tb):
    time.sleep(2.5)  # some traffic
    targets = tb.scrape_targets()
    names = {job: {s.name for t in targets[job] for s in scrape(t)} for job in targets}
    assert {
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
    } <= names["cadvisor"]
    assert {
        "kube_deployment_spec_replicas",
        "kube_deployment_status_replicas_available",
    } <= names["kube-state-metrics"]
    assert {
        "node_cpu_seconds_total",
        "node_memory_MemTotal_bytes",
        "node_memory_MemAvailable_bytes",
        "node_network_receive_bytes_total",
        "node_network_transmit_bytes_total",
    } <= names["node-exporter"]
    assert {"http_requests_total", "http_request_duration_seconds_bucket"} <= names["app"]
    assert {"loadgen_requests_total", "loadgen_offered_rps"} <= names["loadgen"]
    cadvisor = scrape(targets["cadvisor"][0])
    rx = [s for s in cadvisor if s.name == "container_network_receive_bytes_total"]
    assert {s.labels["container"] for s in rx} == set(tb.services)
    assert all(s.value > 0 and s.labels["namespace"] == "testbed" for s in rx)
    assert app_sum(tb, "http_requests_total", service="payment", code="200") > 0


def test_nothing_listens_beyond_loopback(tb):
    for pid in pids_of_testbed(tb.supervisor_pid):
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip == "127.0.0.1", (pid, conn)


def test_load_curve_changes_at_run_time(tb):
    tb.set_load(RampLoad(start_rps=10, end_rps=30, duration_s=1000))
    assert tb.load == RampLoad(start_rps=10, end_rps=30, duration_s=1000)
    assert 9 < tb.offered_rps() < 12
    tb.set_load({"kind": "constant", "rate_rps": 20})
    assert tb.load == ConstantLoad(20)
    with pytest.raises(ConfigError):
        tb.set_load({"kind": "sawtooth"})


def test_bad_requests_raise_project_errors(tb):
    with pytest.raises(ConfigError, match="outside"):
        tb.scale("catalog", 7)
    with pytest.raises(ConfigError, match="unknown service"):
        tb.scale("cart", 2)
    with pytest.raises(FaultError, match="severity"):
        tb.inject("latency", "catalog", 1.5, 10)
    with pytest.raises(FaultError, match="type"):
        tb.inject("flood", "catalog", 0.5, 10)
    with pytest.raises(FaultError, match="no active fault"):
        tb.rollback("f999-none")


def test_pod_kill_drops_ready_replicas_until_the_back_off(tb):
    tb.inject("pod_kill", "catalog", severity=0.5, duration_s=0.5)
    wait_for(lambda: tb.replicas()["catalog"]["ready"] == 0, 5, "catalog to lose its replica")
    wait_for(lambda: tb.replicas()["catalog"]["ready"] == 1, 15, "catalog to recover")
    assert [p["restarts"] for p in tb.pods() if p["service"] == "catalog"] == [1]


def test_error_injection_raises_error_ratio_to_its_severity(tb):
    fault_id = tb.inject("error", "frontend", severity=0.5, duration_s=60)
    before, _ = loadgen_counts(tb)
    time.sleep(6)
    after, _ = loadgen_counts(tb)
    tb.rollback(fault_id)
    delta = {code: after[code] - before.get(code, 0) for code in after}
    ratio = (sum(delta.values()) - delta.get("200", 0)) / sum(delta.values())
    assert sum(delta.values()) > 50
    assert 0.3 < ratio < 0.7


def test_cpu_stress_raises_latency(tb):
    baseline_s = mean_latency_s(tb, "frontend", 4)
    fault_id = tb.inject("cpu_stress", "frontend", severity=1.0, duration_s=60)
    time.sleep(0.5)
    stressed_s = mean_latency_s(tb, "frontend", 4)
    tb.rollback(fault_id)
    # The frontend mostly waits on its callees; the stressor holds its event loop 75% of each
    # 100 ms period (CFS-like throttling), which adds a few tens of milliseconds per request.
    assert stressed_s > 1.15 * baseline_s and stressed_s - baseline_s > 0.02


def test_rollback_ends_a_fault_early(tb):
    fault_id = tb.inject("latency", "payment", severity=0.5, duration_s=600)
    assert [f["id"] for f in tb.active_faults()] == [fault_id]
    assert [f["type"] for s in replica_states(tb, "payment") for f in s["faults"]] == ["latency"]
    tb.rollback(fault_id)
    assert tb.active_faults() == []
    wait_for(lambda: all(not s["faults"] for s in replica_states(tb, "payment")), 5, "rollback")


def test_every_fault_is_gone_after_its_duration(tb):
    duration_s = 3.0
    for fault_type in FAULT_TYPES:
        target = "payment" if fault_type == "pod_kill" else "checkout"
        tb.inject(fault_type, target, severity=0.8, duration_s=duration_s)
    time.sleep(1.5)
    during = replica_states(tb, "checkout")[0]
    assert {f["type"] for f in during["faults"]} == set(REPLICA_FAULTS)
    assert during["leaked_bytes"] > 0 and during["stress_running"]
    assert len(tb.active_faults()) == len(FAULT_TYPES)

    time.sleep(duration_s)
    assert tb.active_faults() == []
    after = replica_states(tb, "checkout")[0]
    assert after["faults"] == [] and after["leaked_bytes"] == 0 and not after["stress_running"]
    ended = [f for f in tb.fault_history() if f["duration_s"] == duration_s]
    assert len(ended) == len(FAULT_TYPES)
    assert all(f["ended_at"] <= f["deadline"] + 1e-6 for f in ended)
    wait_for(lambda: tb.replicas()["payment"]["ready"] == 1, 15, "payment to recover")


def test_replicas_end_faults_by_themselves_when_the_supervisor_is_frozen(tb):
    urls = [f"http://127.0.0.1:{p['port']}/state" for p in tb.pods() if p["service"] == "catalog"]
    tb.inject("latency", "catalog", severity=0.3, duration_s=1.5)
    os.kill(tb.supervisor_pid, signal.SIGSTOP)
    try:
        during = [requests.get(url, timeout=5).json()["faults"] for url in urls]
        time.sleep(2.0)
        after = [requests.get(url, timeout=5).json()["faults"] for url in urls]
    finally:
        os.kill(tb.supervisor_pid, signal.SIGCONT)
    assert all(len(faults) == 1 for faults in during)
    assert all(faults == [] for faults in after)


# ---- capacity -------------------------------------------------------------------------------


def test_more_replicas_of_a_saturated_service_lower_entry_latency():
    # catalog: 2 workers x 0.1 s = 20 rps per replica, offered 28 rps
    services = (
        ServiceSpec("frontend", workers=64, service_time_s=0.005, cpu_per_request_s=0.0005,
                    queue_limit=512, calls=("catalog", "checkout")),
        ServiceSpec("catalog", workers=2, service_time_s=0.1, queue_limit=40),
        ServiceSpec("checkout", workers=8, service_time_s=0.02, calls=("payment",)),
        ServiceSpec("payment", workers=8, service_time_s=0.02),
    )  # fmt: skip
    cfg = TestbedConfig(services=services, load=ConstantLoad(28), **FAST)
    with Testbed(cfg) as tb:
        time.sleep(3)
        saturated_s = entry_p95_s(tb, 6)
        tb.scale("catalog", 2)
        tb.wait_ready()
        queued = lambda: sum(s["waiting"] for s in replica_states(tb, "catalog"))  # noqa: E731
        wait_for(lambda: queued() <= 8, 20, "the catalog queue to drain (40 when saturated)")
        time.sleep(1)
        scaled_s = entry_p95_s(tb, 5)
    assert saturated_s >= 0.5, saturated_s
    assert scaled_s < 0.5 * saturated_s, (saturated_s, scaled_s)


# ---- nothing survives a stop ----------------------------------------------------------------

OWNER = textwrap.dedent(
    """
    import time
    from collectors.testbed import Testbed, TestbedConfig
    tb = Testbed(TestbedConfig(startup_delay_s=0.5)).start()
    print(tb.supervisor_pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize(
    "how", ["context_exit", "owner_killed", "supervisor_sigkill", "supervisor_sigterm",
            "supervisor_sigint"],
)  # fmt: skip
def test_no_process_survives_a_stop(how):
    if how == "owner_killed":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=root, stdout=subprocess.PIPE)
        pids = pids_of_testbed(int(owner.stdout.readline()))
        owner.kill()
        owner.wait()
    else:
        tb = Testbed(TestbedConfig(startup_delay_s=0.5)).start()
        pids = pids_of_testbed(tb.supervisor_pid)
        signals = {"supervisor_sigkill": signal.SIGKILL, "supervisor_sigterm": signal.SIGTERM,
                   "supervisor_sigint": signal.SIGINT}  # fmt: skip
        if how == "context_exit":
            tb.stop()
        else:
            os.kill(tb.supervisor_pid, signals[how])
    assert len(pids) == 6  # supervisor, 4 replicas, load generator
    wait_for(lambda: all_gone(pids), 15, f"every testbed process to end ({how})")
    if how != "owner_killed" and how != "context_exit":
        tb.stop()


# ---- entry points ---------------------------------------------------------------------------


def test_entry_point_prints_the_endpoints(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.testbed", "run_s=0.5", "testbed.startup_delay_s=0.5",
         "testbed.load=null", f"hydra.run.dir={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "supervisor API   http://127.0.0.1:" in result.stdout
    assert "/metrics cadvisor" in result.stdout
