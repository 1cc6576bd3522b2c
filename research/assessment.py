"""The evaluate job: every policy in the learned and the reference environment, the model's
validation, and the report. `experiments.evaluate` is a thin entry over `assess`.

Settings (conf/evaluate.yaml): `agent_dir` (a saved agent, or null to train one here with the
`agent` settings in `train_in`), `checkpoint` (a dynamics model; null = no learned env),
`dataset` (held-out data for accuracy and plausibility; null = the checkpoint's), `env`
(episode settings shared by both environments), `hpa` (CPU request, default target, targets
searched for the tuned HPA), `n_episodes`, `seed`, `validate_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from collectors.errors import ConfigError
from research import evaluation, report
from research.agents import envs, training

log = logging.getLogger(__name__)


def build_envs(settings: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{"learned": ..., "reference": ...} (learned only with a checkpoint), each (env, params)."""
    env_settings = dict(settings["env"])
    out = {}
    if settings.get("checkpoint"):
        learned = {**env_settings, "name": "learned"}
        out["learned"] = envs.make_env(learned, settings["checkpoint"], seed=int(settings["seed"]))
    out["reference"] = envs.make_env({**env_settings, "name": "reference"})
    return out


def validate_model(checkpoint: str | Path, dataset: str | Path | None, plots_dir: Path) -> dict:
    """Accuracy (with the predicted-against-true plot) and plausibility of a checkpoint."""
    from research import accuracy, plausibility
    from research.checkpoint import load_model

    bundle = load_model(checkpoint)
    dataset = dataset or bundle.meta.get("dataset")
    if dataset is None:
        raise ConfigError(f"checkpoint {checkpoint} names no dataset; set dataset=<folder>")
    result = accuracy.evaluate(bundle, dataset)
    result.pop("nrmse_per_feature", None)
    _, test = accuracy.held_out(bundle, dataset, horizon=10)
    plots_dir.mkdir(parents=True, exist_ok=True)
    accuracy.plot_trajectories(bundle, test, plots_dir / "predicted_vs_true.png")
    return {"accuracy": result, "plausibility": plausibility.check_model(bundle, dataset)}


def assess(settings: Mapping[str, Any], out_dir: str | Path, logger=None) -> dict[str, Any]:
    """Runs the evaluate job and writes report.json, report.md and plots under `out_dir`."""
    out_dir = Path(out_dir)
    seed = int(settings["seed"])
    environments = build_envs(settings)

    agent_dir = settings.get("agent_dir")
    training_summary = None
    if not agent_dir:
        train_in = settings.get("train_in", "learned")
        if train_in not in environments:
            raise ConfigError(f"train_in={train_in!r} but only {sorted(environments)} exist")
        env_settings = {**dict(settings["env"]), "name": train_in}
        training_summary = training.train_agent(
            settings["agent"],
            env_settings,
            out_dir,
            checkpoint=settings.get("checkpoint"),
            seed=seed,
            logger=logger,
        )
        agent_dir = training_summary["agent_dir"]
    first_env = next(iter(environments.values()))[0]
    actor = training.load_actor(agent_dir, first_env)

    hpa_settings = settings["hpa"]
    hpa = evaluation.default_hpa(
        first_env, float(hpa_settings["cpu_request_cores"]), float(hpa_settings["target"])
    )
    compared = evaluation.compare_policies(
        environments,
        hpa,
        jax.random.key(seed + 2),
        int(settings["n_episodes"]),
        actor=actor,
        hpa_targets=tuple(float(t) for t in hpa_settings["targets"]),
    )
    section: dict[str, Any] = {"evaluation": compared["evaluation"]}
    section["tuned_hpa"] = compared["tuned_hpa"]
    if training_summary is not None:
        section["training"] = {k: v for k, v in training_summary.items() if k != "eval"}
    if settings.get("checkpoint") and settings.get("validate_model", True):
        section |= validate_model(
            settings["checkpoint"], settings.get("dataset"), out_dir / "plots"
        )

    if logger is not None:
        for env_name, figures in compared["evaluation"].items():
            for policy, values in figures.items():
                scalars = {k: v for k, v in values.items() if k in report.FIGURES}
                logger.summary({f"eval/{env_name}/{policy}/{k}": v for k, v in scalars.items()})
    extra = {"agent_dir": str(agent_dir), "checkpoint": settings.get("checkpoint")}
    return report.write_report({"agents": section}, out_dir, extra, title="kubeworld evaluation")
