"""Faults injected on the real testbed by `experiments.collect` (attached to a running testbed):
every fault is in `events` within one interval of the supervisor's record, and no fault is
left active afterwards, whether the collector ends normally, on SIGTERM or is killed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collectors.dataset import read_table
from collectors.faults import recover_fault_journals
from collectors.sink import ParquetSink
from collectors.testbed import ConstantLoad, Testbed, TestbedConfig

ROOT = Path(__file__).resolve().parents[1]
INTERVAL_S = 2.0


@pytest.fixture(scope="module")
def testbed():
    with Testbed(TestbedConfig(load=ConstantLoad(10.0))) as tb:
        yield tb


def _collect(testbed, out: Path, duration_s: float, faults: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.collect",
            f"out={out}",
            f"duration_s={duration_s}",
            f"interval_s={INTERVAL_S}",
            f"source.api_url={testbed.api_url}",
            "faults=scripted",
            f"faults.faults={faults}",
            "flush_rows=4",
            "progress=false",
            f"hydra.run.dir={out.parent / 'hydra'}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _truth(testbed, since_s: float) -> dict[tuple[str, str], dict]:
    return {
        (f["type"], f["target"]): f
        for f in testbed.fault_history()
        if f["started_at"] >= since_s and "ended_at" in f
    }


def _check_events(out: Path, truth: dict) -> None:
    events = (
        read_table(out, "events")
        .collect()
        .filter(read_table(out, "events").collect()["kind"] == "fault")
    )
    assert events.height == len(truth), (events, truth)
    for row in events.iter_rows(named=True):
        real = truth[(row["type"], row["target"])]
        assert abs(row["ts_start"].timestamp() - real["started_at"]) <= INTERVAL_S
        assert abs(row["ts_end"].timestamp() - real["ended_at"]) <= INTERVAL_S


def test_faults_end_on_schedule_and_on_sigterm(testbed, tmp_path):
    out, since_s = tmp_path / "ds", time.time()
    faults = (
        "[{at_s: 1, type: latency, target: payment, severity: 0.5, duration_s: 3},"
        " {at_s: 2, type: cpu_stress, target: catalog, severity: 0.3, duration_s: 120}]"
    )
    proc = _collect(testbed, out, 120, faults)
    try:
        assert _wait(lambda: any(f["type"] == "cpu_stress" for f in testbed.active_faults()), 60)
        assert _wait(lambda: len(_truth(testbed, since_s)) == 1, 20)  # latency ended by itself
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        proc.kill()
    assert testbed.active_faults() == []
    _check_events(out, _truth(testbed, since_s))
    assert read_table(out, "service_metrics").collect().height > 0
    assert not (out / "_faults").exists()


def test_killed_collector_leaves_no_fault_and_its_event_is_recovered(testbed, tmp_path):
    out, since_s = tmp_path / "ds", time.time()
    faults = "[{at_s: 1, type: error, target: checkout, severity: 0.4, duration_s: 6}]"
    proc = _collect(testbed, out, 120, faults)
    try:
        assert _wait(lambda: testbed.active_faults() != [], 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert _wait(lambda: testbed.active_faults() == [], 10)  # expired at its planned end
    with ParquetSink(out) as sink:
        assert recover_fault_journals(out, sink) == 1
    _check_events(out, _truth(testbed, since_s))


def test_run_live_closes_the_loop(testbed):
    from collectors.closed_loop import run_live

    calls = []

    def policy(history):
        calls.append(history["step"].max())
        return {"catalog": 2}

    frame = run_live(testbed, policy, duration_s=6.0, interval_s=2.0)
    try:
        assert frame.height == 3 * len(testbed.services)
        assert calls == [0, 1, 2]
        assert testbed.replicas()["catalog"]["desired"] == 2
    finally:
        testbed.scale("catalog", 1)
