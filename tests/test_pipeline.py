"""The main job end to end on the quick profile, its notebook, and a clean stop mid-collection.

These run `python -m experiments.pipeline` as a user would, in a subprocess, on the real
testbed over loopback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from collectors.dataset import read_table

ROOT = Path(__file__).resolve().parents[1]
AGENT_PLACES = ("learned_env", "testbed", "reference_env")
FIGURES = ("return", "slo_violation_rate", "mean_replicas")

pytestmark = pytest.mark.slow


def pipeline(run_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "experiments.pipeline", "profile=quick",
           f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def running_testbed_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "collectors.testbed" in cmdline:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    proc = pipeline(run_dir)
    assert proc.wait(timeout=900) == 0, "the quick pipeline failed; see its output above"
    return run_dir


def test_quick_pipeline_report_has_every_key_finite(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    assert set(report["data"]) >= {"runs", "steps", "services", "fault_events"}
    assert report["data"]["runs"] >= 1 and report["data"]["services"] == 4
    for predictor in ("model", "persistence", "linear"):
        for horizon in ("h1", "h5", "h10"):
            assert math.isfinite(report["model"]["nrmse"][predictor][horizon])
    assert math.isfinite(report["model"]["coverage90"])
    assert report["model"]["bound_violations"] == 0
    for policy in ("ppo", "hpa", "tuned_hpa"):
        for place in AGENT_PLACES:
            for figure in FIGURES:
                value = report["agents"][policy][place][figure]
                assert math.isfinite(value), (policy, place, figure)
    stages = {f"testbed/{s}" for s in ("collect", "model", "accuracy", "agents", "live")}
    stages |= {f"reference/{s}" for s in ("data", "model", "accuracy", "agents", "truth")}
    assert stages <= set(report["timings_s"])
    assert (quick_run / "report.md").read_text().startswith("# kubeworld pipeline report")
    for plot in report["plots"]:
        assert (quick_run / plot).stat().st_size > 0
    assert not running_testbed_processes()


def test_resume_skips_finished_stages(quick_run):
    before = json.loads((quick_run / "report.json").read_text())["timings_s"]
    proc = pipeline(quick_run, "resume=true")
    assert proc.wait(timeout=300) == 0
    after = json.loads((quick_run / "report.json").read_text())["timings_s"]
    assert after == before  # every stage's stored result and duration came back unchanged


def test_notebook_runs_on_the_quick_output(quick_run):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "pipeline_run.ipynb", as_version=4)
    os.environ["KUBEWORLD_RUN"] = str(quick_run)
    try:
        NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["KUBEWORLD_RUN"]
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 3


def test_interrupt_during_collection_keeps_the_data_and_stops_the_testbed(tmp_path):
    run_dir = tmp_path / "run"
    proc = pipeline(
        run_dir, "collect.duration_s=300", "collect.flush_rows=8", "chains=[testbed]",
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    data = run_dir / "data" / "testbed" / "service_metrics"
    deadline = time.monotonic() + 180
    while not list(data.glob("run_id=*/*.parquet")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no collected file appeared"
        time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    rows = read_table(run_dir / "data" / "testbed", "service_metrics").collect()
    assert rows.height >= 8
    assert rows["step"].max() < 300  # stopped early, not after the configured duration
    assert not (run_dir / "report.json").exists()
    deadline = time.monotonic() + 10
    while running_testbed_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not running_testbed_processes()


def test_two_point_multirun_on_the_quick_profile(tmp_path):
    # Hyperparameters across runs (Hydra multirun), seeds vmapped inside each run; the reference
    # chain alone keeps it short.
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # Hydra's flags go before the overrides: argparse takes no flag after the positionals
    sweep = ["chains=[reference]", "agent.lr=0.001,0.0003", f"hydra.sweep.dir={tmp_path}"]
    cmd = [sys.executable, "-m", "experiments.pipeline", "--multirun", "profile=quick", *sweep]
    assert subprocess.run(cmd, cwd=ROOT, env=env, timeout=900).returncode == 0
    for job, lr in (("0", "0.001"), ("1", "0.0003")):
        overrides = (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        assert f"agent.lr={lr}" in overrides
        report = json.loads((tmp_path / job / "report.json").read_text())
        for policy in ("ppo", "hpa", "tuned_hpa"):
            assert math.isfinite(report["agents"][policy]["reference_env"]["return"])
