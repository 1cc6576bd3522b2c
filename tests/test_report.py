"""Reports from evaluation and validation dicts; the evaluate entry point on a tiny setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from jaxsim.queueing_env import QueueingEnv
from research import report
from research.agents import ppo

ROOT = Path(__file__).parents[1]


def figures(mean_replicas, slo, steps=6):
    rng = np.random.default_rng(int(mean_replicas))
    return {
        "return": -10.0,
        "slo_violation_rate": slo,
        "error_ratio": 0.01,
        "mean_replicas": mean_replicas,
        "scaling_actions": 3.0,
        "trace": {
            "replicas_total": rng.integers(4, 24, steps).tolist(),
            "latency_p95_s": rng.uniform(0.1, 0.5, steps).tolist(),
        },
    }


def test_target_check_follows_the_issue():
    met = report.target_check({"ppo": figures(9.0, 0.1), "hpa": figures(10.0, 0.1)})
    assert met["met"] and abs(met["replica_reduction_vs_hpa"] - 0.1) < 1e-9
    more_slo = report.target_check({"ppo": figures(5.0, 0.2), "hpa": figures(10.0, 0.1)})
    assert not more_slo["met"]
    too_costly = report.target_check({"ppo": figures(9.5, 0.0), "hpa": figures(10.0, 0.1)})
    assert not too_costly["met"]
    assert report.target_check({"hpa": figures(10.0, 0.1)}) is None


def test_write_report_files_tables_and_plots(tmp_path):
    section = {
        "evaluation": {
            "reference": {
                "ppo": figures(8.0, 0.05),
                "hpa": figures(10.0, 0.1),
                "tuned_hpa": figures(9.0, 0.08),
            }
        },
        "accuracy": {
            "nrmse": {"model": {"h1": 0.2, "h5": 0.4, "h10": 0.5}, "persistence": {"h1": 0.3}},
            "coverage90": 0.88,
            "bound_violations": 0,
        },
        "plausibility": {"bounds": 0.0, "littles_law": 0.02, "n_windows": 10},
    }
    out = report.write_report({"agents": section}, tmp_path, {"seed": 0})
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == json.loads(json.dumps(out))
    agents = written["sections"]["agents"]
    assert "trace" not in agents["evaluation"]["reference"]["ppo"]
    assert agents["targets"]["reference"]["met"] is True
    for path in agents["plots"]:
        assert (tmp_path / "plots" / path.split("/")[-1]).stat().st_size > 1000
    assert len(agents["plots"]) == 2
    md = (tmp_path / "report.md").read_text()
    assert "| ppo | -10 | 0.05 |" in md
    assert "| model | 0.2 | 0.4 | 0.5 |" in md
    assert "littles_law" in md


def test_pipeline_report_keeps_timings_and_config(tmp_path):
    results = {"reference": {"data": {"runs": 2, "steps": 100}}}
    out = report.pipeline_report(results, {"reference/data": 1.5}, tmp_path, {"seed": 3})
    assert out["timings_s"] == {"reference/data": 1.5}
    assert out["sections"]["reference"]["data"]["runs"] == 2
    assert "reference/data" in (tmp_path / "report.md").read_text()


def test_evaluate_entry_point_on_a_tiny_setting(tmp_path):
    # An untrained agent of the reference environment's shapes stands in for a trained one.
    env = QueueingEnv()
    cfg = ppo.PPOConfig(hidden_sizes=(8,))
    obs, _ = env.reset(jax.random.key(0), env.default_params)
    params = ppo.make_network(env, cfg).init(jax.random.key(1), obs[None])
    agent_dir = ppo.save_agent(tmp_path / "agent", params, {"ppo": ppo.config_to_dict(cfg)})

    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        f"agent_dir={agent_dir}",
        "n_episodes=2",
        "env.episode_steps=8",
        "hpa.targets=[0.5,0.7]",
        "wandb=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((run_dir / "report.json").read_text())
    figures_ = written["sections"]["agents"]["evaluation"]["reference"]
    expected = {"ppo", "hpa", "tuned_hpa", "static_min", "static_max", "threshold", "random"}
    assert set(figures_) == expected
    assert figures_["static_max"]["mean_replicas"] > figures_["static_min"]["mean_replicas"]
    assert (run_dir / "plots" / "agents_reference_replicas_latency.png").exists()
    assert "| hpa |" in (run_dir / "report.md").read_text()
