"""Reports: `report.json`, `report.md` and plots from evaluation and validation results.

Inputs are the plain dicts the other modules return:

- evaluations `{env name: {policy name: figures}}` from `research.evaluation.evaluate_suite`
  (figures with a `trace` of one episode, which goes to the plots and not into the JSON);
- an accuracy dict from `research.accuracy.evaluate` (`nrmse.{model,persistence,linear}.h<h>`);
- a plausibility dict from `research.plausibility.check_model` (violation rates).

The predicted-against-true plot is `research.accuracy.plot_trajectories`; the others are here:
replicas and entry latency over time for PPO against the HPA, and error against horizon.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = ("return", "slo_violation_rate", "error_ratio", "mean_replicas", "scaling_actions")
TRACE_POLICIES = ("ppo", "hpa", "tuned_hpa")
COST_REDUCTION_TARGET = 0.10  # PPO's mean replicas at least 10 % below the default HPA's


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def without_traces(value: Any) -> Any:
    """A nested dict with every `trace` entry removed (for JSON reports)."""
    if isinstance(value, Mapping):
        return {k: without_traces(v) for k, v in value.items() if k != "trace"}
    return value


def target_check(figures: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The issue's target in one environment: PPO's mean replicas at least 10 % below the
    default HPA's with no more SLO violations. None when PPO or the HPA was not evaluated."""
    if "ppo" not in figures or "hpa" not in figures:
        return None
    ppo, hpa = figures["ppo"], figures["hpa"]
    reduction = 1.0 - ppo["mean_replicas"] / max(hpa["mean_replicas"], 1e-9)
    no_more_slo = ppo["slo_violation_rate"] <= hpa["slo_violation_rate"]
    out = {
        "replica_reduction_vs_hpa": reduction,
        "slo_violation_rate_ppo": ppo["slo_violation_rate"],
        "slo_violation_rate_hpa": hpa["slo_violation_rate"],
        "met": bool(reduction >= COST_REDUCTION_TARGET - 1e-9 and no_more_slo),
    }
    if "tuned_hpa" in figures:
        tuned = figures["tuned_hpa"]
        out["replica_reduction_vs_tuned_hpa"] = 1.0 - ppo["mean_replicas"] / max(
            tuned["mean_replicas"], 1e-9
        )
        out["slo_violation_rate_tuned_hpa"] = tuned["slo_violation_rate"]
    return out


def plot_policy_traces(
    figures: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = ""
) -> Path | None:
    """Total replicas and entry p95 latency over one episode, PPO against the HPAs."""
    names = [n for n in TRACE_POLICIES if n in figures and "trace" in figures[n]]
    if not names:
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for name in names:
        trace = figures[name]["trace"]
        top.plot(trace["replicas_total"], label=name)
        bottom.plot(trace["latency_p95_s"], label=name)
    top.set_ylabel("total replicas")
    bottom.set_ylabel("entry p95 latency (s)")
    bottom.set_xlabel("step")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_error_vs_horizon(accuracy: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """nRMSE against the prediction horizon for the model and both baselines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, by_horizon in accuracy["nrmse"].items():
        points = sorted((int(h.lstrip("h")), v) for h, v in by_horizon.items())
        ax.plot([h for h, _ in points], [v for _, v in points], "o-", label=name)
    ax.set_xlabel("horizon (steps)")
    ax.set_ylabel("nRMSE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def policy_table(figures: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table of the `FIGURES` of every policy."""
    lines = ["| policy | " + " | ".join(FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for name, values in figures.items():
        cells = [_number(values.get(k, float("nan"))) for k in FIGURES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _mapping_table(title: str, values: Mapping[str, Any]) -> list[str]:
    lines = [f"### {title}", "", "| key | value |", "|---|---|"]
    for key, value in values.items():
        if not isinstance(value, Mapping | list):
            lines.append(f"| {key} | {_number(value)} |")
    return lines + [""]


def _accuracy_lines(accuracy: Mapping[str, Any]) -> list[str]:
    horizons = sorted({h for v in accuracy["nrmse"].values() for h in v}, key=lambda h: int(h[1:]))
    lines = ["| predictor | " + " | ".join(horizons) + " |", "|---" * (len(horizons) + 1) + "|"]
    for name, by_h in accuracy["nrmse"].items():
        lines.append(f"| {name} | " + " | ".join(_number(by_h.get(h)) for h in horizons) + " |")
    extra = {k: v for k, v in accuracy.items() if k in ("coverage90", "bound_violations")}
    return lines + [""] + [f"- {k}: {_number(v)}" for k, v in extra.items()]


def section_markdown(name: str, section: Mapping[str, Any], plots: list[str]) -> list[str]:
    """Markdown of one section: evaluations, targets, accuracy, plausibility, the rest."""
    lines = [f"## {name}", ""]
    for env_name, figures in section.get("evaluation", {}).items():
        lines += [f"### policies in the {env_name} environment", ""]
        lines += policy_table(figures) + [""]
        check = target_check(figures)
        if check is not None:
            lines += _mapping_table(f"target in the {env_name} environment", check)
    if "accuracy" in section:
        lines += ["### accuracy (nRMSE by horizon)", ""] + _accuracy_lines(section["accuracy"])
        lines.append("")
    if "plausibility" in section:
        lines += _mapping_table("plausibility (violation rates)", section["plausibility"])
    for key, value in section.items():
        if key not in ("evaluation", "accuracy", "plausibility") and isinstance(value, Mapping):
            lines += _mapping_table(key, value)
    lines += [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return lines + [""]


def section_plots(name: str, section: Mapping[str, Any], plots_dir: Path) -> list[str]:
    """The plots of one section (policy traces per environment, error against horizon)."""
    paths = []
    for env_name, figures in section.get("evaluation", {}).items():
        path = plot_policy_traces(
            figures, plots_dir / f"{name}_{env_name}_replicas_latency.png", f"{name}: {env_name}"
        )
        if path is not None:
            paths.append(str(path))
    if "accuracy" in section and "nrmse" in section["accuracy"]:
        path = plot_error_vs_horizon(
            section["accuracy"], plots_dir / f"{name}_error_vs_horizon.png", name
        )
        paths.append(str(path))
    return paths


def write_report(
    sections: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    extra: Mapping[str, Any] | None = None,
    title: str = "kubeworld report",
) -> dict[str, Any]:
    """Writes `report.json`, `report.md` and `plots/*.png` for named sections.

    A section may hold `evaluation` ({env: {policy: figures}}), `accuracy`, `plausibility` and
    any other dicts of figures. Returns the JSON written (traces left out, targets added).
    """
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    report: dict[str, Any] = {"sections": {}, **dict(extra or {})}
    md = [f"# {title}", ""]
    for name, section in sections.items():
        plots = section_plots(name, section, plots_dir)
        md += section_markdown(name, section, plots)
        clean = without_traces(section)
        targets = {
            env_name: target_check(figures)
            for env_name, figures in section.get("evaluation", {}).items()
        }
        clean["targets"] = {k: v for k, v in targets.items() if v is not None}
        clean["plots"] = plots
        report["sections"][name] = clean
    if extra:
        md += _mapping_table("run", {k: v for k, v in extra.items() if not isinstance(v, Mapping)})
        for key, value in extra.items():
            if isinstance(value, Mapping):
                md += _mapping_table(key, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def pipeline_report(
    results: Mapping[str, Mapping[str, Any]],
    timings_s: Mapping[str, float],
    run_dir: str | Path,
    cfg: Mapping[str, Any],
) -> dict[str, Any]:
    """The pipeline's report: one section per chain (`results[chain]` holds the stages'
    dicts, e.g. data, model, accuracy, plausibility, evaluation), the stage timings and the
    resolved config. Writes under `run_dir`; returns the JSON written."""
    extra = {"timings_s": dict(timings_s), "config": dict(cfg)}
    return write_report(results, run_dir, extra, title="kubeworld pipeline report")
