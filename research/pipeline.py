"""The main job: every stage of kubeworld, joined, for one source and the reference environment.

Testbed chain (or Kubernetes, or the imported Nezha data):
    collect -> train the dynamics model -> accuracy and plausibility on held-out data
    -> ClusterEnv -> PPO, tuned HPA -> evaluate in the learned env -> evaluate live (closed loop)
Reference chain:
    reference data -> train the dynamics model -> ClusterEnv -> PPO, tuned HPA
    -> evaluate in the learned env and in the reference env itself (the truth)

Every stage is a `Stages` entry (timed, stored, resumable) writing under the run folder:

    <run>/data/<chain>/              datasets (hive-partitioned Parquet)
    <run>/checkpoints/<chain>/       dynamics model and PPO agent (orbax)
    <run>/stages/<name>.json         each stage's result and duration
    <run>/report.json, report.md, plots/*.png
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from collectors.errors import ConfigError
from research.stages import Stages

log = logging.getLogger(__name__)

CHAINS = ("testbed", "reference")
LIVE_SOURCES = ("testbed",)


def plain(cfg: Any) -> dict:
    """A config node as a resolved plain dict."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event set by SIGINT or SIGTERM while inside; the previous handlers come back after.

    Collection watches the event and ends cleanly (faults rolled back, data flushed, testbed
    stopped); the pipeline then stops before its next stage.
    """
    stop = threading.Event()

    def on_signal(signum, frame):
        log.warning("signal %d: stopping after the current step", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Interrupted(Exception):
    """The pipeline was asked to stop (SIGINT or SIGTERM) between two stages."""


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Runs the configured chains under `run_dir`; returns the report dict it wrote."""
    run_dir = Path(run_dir).absolute()
    chains = list(cfg.chains)
    unknown = set(chains) - set(CHAINS)
    if unknown:
        raise ConfigError(f"chains {sorted(unknown)} not in {list(CHAINS)}")
    stages = Stages(run_dir, resume=bool(cfg.resume))
    log.info("devices: %s", jax.devices())
    log.info("run folder: %s", run_dir)

    results: dict[str, Any] = {}
    with stop_on_signals() as stop:
        if "testbed" in chains:
            results["testbed"] = source_chain(cfg, stages, run_dir, stop)
        if "reference" in chains:
            _check(stop)
            results["reference"] = reference_chain(cfg, stages, run_dir, stop)
    summary = write_report(results, stages.timings_s, run_dir)
    log.info("report written to %s", run_dir / "report.json")
    return summary


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise Interrupted("stopped by a signal")


def source_chain(cfg, stages: Stages, run_dir: Path, stop: threading.Event) -> dict[str, Any]:
    """The chain of the configured source (testbed, kubernetes or nezha)."""
    source = cfg.source.name
    data_dir = run_dir / "data" / source
    ckpt_dir = run_dir / "checkpoints" / source
    if source == "nezha":
        data = stages(f"{source}/import", import_nezha, cfg, data_dir)
    else:
        data = stages(f"{source}/collect", collect, cfg, data_dir, stop)
    _check(stop)
    out: dict[str, Any] = {"data": data}
    out["model"] = stages(f"{source}/model", train_model, cfg, data_dir, ckpt_dir / "model")
    out["accuracy"] = stages(f"{source}/accuracy", model_accuracy, out["model"], data_dir, run_dir)
    _check(stop)
    if source == "nezha":
        return out  # one service graph of ten services: no environment layout to act in
    out["agents"] = stages(
        f"{source}/agents", train_agents, cfg, out["model"], data_dir, ckpt_dir / "agent"
    )
    _check(stop)
    if source in LIVE_SOURCES and cfg.live.enabled:
        out["live"] = stages(
            f"{source}/live", live_evaluation, cfg, out["agents"], run_dir / "data" / "live", stop
        )
    return out


def reference_chain(cfg, stages: Stages, run_dir: Path, stop: threading.Event) -> dict[str, Any]:
    """The reference chain: data, model and agents from the reference queueing environment,
    then every policy evaluated in the reference environment itself."""
    data_dir = run_dir / "data" / "reference"
    ckpt_dir = run_dir / "checkpoints" / "reference"
    out: dict[str, Any] = {"data": stages("reference/data", reference_data, cfg, data_dir)}
    _check(stop)
    out["model"] = stages("reference/model", train_model, cfg, data_dir, ckpt_dir / "model")
    out["accuracy"] = stages("reference/accuracy", model_accuracy, out["model"], data_dir, run_dir)
    _check(stop)
    out["agents"] = stages(
        "reference/agents", train_agents, cfg, out["model"], data_dir, ckpt_dir / "agent"
    )
    _check(stop)
    out["truth"] = stages("reference/truth", reference_evaluation, cfg, out["agents"], data_dir)
    return out


def dataset_summary(dataset: Path) -> dict[str, Any]:
    """Runs, steps, services and fault events of a dataset (the report's `data` keys)."""
    from collectors.dataset import list_runs, read_table

    runs = list_runs(dataset)
    metrics = read_table(dataset, "service_metrics").select("run_id", "step", "service").collect()
    events = read_table(dataset, "events").collect()
    return {
        "dataset": str(dataset),
        "run_ids": runs["run_id"].to_list(),
        "runs": runs.height,
        "steps": metrics.select("run_id", "step").unique().height,
        "services": metrics["service"].n_unique(),
        "fault_events": events.filter(events["kind"] == "fault").height,
        "scale_events": events.filter(events["kind"] == "scale").height,
    }


def collect(cfg, out: Path, stop: threading.Event) -> dict[str, Any]:
    """Collects one run from the testbed or a Kubernetes cluster into `out`."""
    from collectors.run import collect_kubernetes, collect_testbed

    collect_cfg = {
        **plain(cfg.collect),
        "source": plain(cfg.source),
        "faults": plain(cfg.faults),
        "explorer": plain(cfg.explorer),
        "seed": int(cfg.seed),
    }
    fn = {"testbed": collect_testbed, "kubernetes": collect_kubernetes}[cfg.source.name]
    fn(collect_cfg, out, stop=stop)
    _check(stop)
    return dataset_summary(out)


def import_nezha(cfg, out: Path) -> dict[str, Any]:
    """Imports the public Online Boutique data named by `source.path` into `out`."""
    from collectors.importers import import_nezha_all

    import_nezha_all(cfg.source.path, out, overwrite=True)
    return dataset_summary(out)


def reference_data(cfg, out: Path) -> dict[str, Any]:
    """Simulates the reference queueing environment into an ordinary dataset at `out`."""
    from jaxsim.reference_data import write_reference_dataset

    ref = cfg.reference
    write_reference_dataset(
        out,
        n_runs=int(ref.n_runs),
        steps_per_run=int(ref.steps_per_run),
        seed=int(cfg.seed),
        change_prob=float(ref.change_prob),
        fault_rate_per_step=float(ref.fault_rate_per_step),
    )
    return dataset_summary(out)


def train_model(cfg, dataset: Path, out_dir: Path) -> dict[str, Any]:
    """Trains the dynamics model on `dataset`; returns the checkpoint and its training figures."""
    from research.checkpoint import load_model
    from research.logger import MetricsLogger
    from research.train import fit

    data_prep = plain(cfg.data_prep)
    # metrics the source never measures (e.g. Nezha's error ratio) are masked, not an error
    missing = [*data_prep.get("missing_ok", []), *cfg.source.get("missing_ok", [])]
    section = {
        "model": plain(cfg.model),
        "train": plain(cfg.train),
        "data_prep": {**data_prep, "missing_ok": missing},
    }
    with MetricsLogger(run_dir=out_dir, config=section, use_wandb=bool(cfg.wandb)) as logger:
        checkpoint = fit(dataset, section, out_dir, logger=logger)
    meta = load_model(checkpoint).meta
    return {"checkpoint": str(checkpoint), **meta.get("history", {})}


def model_accuracy(model: Mapping[str, Any], dataset: Path, run_dir: Path) -> dict[str, Any]:
    """nRMSE against persistence and the linear model, coverage and bound violations."""
    from research.accuracy import evaluate, plot_trajectories
    from research.checkpoint import load_model

    bundle = load_model(model["checkpoint"])
    result = evaluate(bundle, dataset)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_trajectories(bundle, dataset, plots / f"predicted_vs_true_{Path(dataset).name}.png")
    result.pop("nrmse_per_feature", None)
    return result


def _layout(cfg, bundle, chain: str) -> Any:
    """The environment layout of a checkpoint: its services and interval, and the replica
    bounds of the source (the testbed's 1..6 for the reference chain)."""
    from jaxsim.core import Layout

    bounds = cfg.source if chain == cfg.source.name else {}
    return Layout(
        services=tuple(bundle.services),
        entry_service=bundle.entry_service,
        call_graph=tuple(tuple(edge) for edge in bundle.call_graph),
        min_replicas=int(bounds.get("min_replicas", 1)),
        max_replicas=int(bounds.get("max_replicas", 6)),
        interval_s=bundle.interval_s,
    )


def _hpa(cfg, chain: str, interval_s: float):
    from research.agents.heuristics import hpa_params_for

    return hpa_params_for(
        interval_s,
        target_utilisation=float(cfg.eval.hpa_target),
        cpu_request_cores=float(cfg.eval.cpu_request_cores[chain]),
    )


def _ppo_config(cfg) -> tuple[Any, int]:
    from research.agents.ppo import config_from_dict

    agent = plain(cfg.agent)
    n_seeds = int(agent.pop("n_seeds", 1))
    return config_from_dict(agent), n_seeds


def learned_env(cfg, checkpoint: str, dataset: Path, chain: str):
    """`ClusterEnv` of a checkpoint with parameters from the runs of `dataset`."""
    import jax.numpy as jnp

    from jaxsim.cluster_env import ClusterEnv
    from jaxsim.workload import FaultSpec, fault_probs_from_dataset
    from research.checkpoint import load_model
    from research.data import load_runs

    bundle = load_model(checkpoint)
    env = ClusterEnv.from_bundle(
        bundle, _layout(cfg, bundle, chain), window_steps=int(cfg.env.window_steps)
    )
    missing_ok = bundle.meta.get("data_config", {}).get("missing_ok", ())
    runs = load_runs(dataset, services=bundle.services, missing_ok=missing_ok)
    params = env.make_params(
        bundle.params,
        runs,
        n_starts=int(cfg.env.n_starts),
        seed=int(cfg.seed),
        max_steps_in_episode=int(cfg.env.episode_steps),
        reward_weights=jnp.asarray(cfg.env.reward_weights, jnp.float32),
        slo_s=float(cfg.env.slo_s),
        faults=FaultSpec(
            rate_per_step=float(cfg.env.fault_rate_per_step[chain]),
            probs=jnp.asarray(fault_probs_from_dataset(dataset), jnp.float32),
        ),
    )
    return bundle, env, params


def train_agents(cfg, model: Mapping[str, Any], dataset: Path, out_dir: Path) -> dict[str, Any]:
    """PPO (seeds vmapped, the best kept) and the tuned HPA, both in the learned environment,
    then every policy evaluated there on the same episodes."""
    from research.agents import ppo
    from research.agents.policies import from_actor, heuristic_suite
    from research.evaluation import evaluate_suite, tune_hpa
    from research.logger import MetricsLogger

    chain = Path(dataset).name
    bundle, env, params = learned_env(cfg, model["checkpoint"], dataset, chain)
    ppo_cfg, n_seeds = _ppo_config(cfg)
    key = jax.random.key(int(cfg.seed))
    train_key, tune_key, eval_key = jax.random.split(key, 3)
    log.info(
        "PPO: %d seeds x %d steps in the learned environment", n_seeds, ppo_cfg.total_timesteps
    )
    with MetricsLogger(run_dir=out_dir, config=plain(cfg.agent), use_wandb=bool(cfg.wandb)) as lg:
        result = ppo.train_seeds(jax.random.split(train_key, n_seeds), env, params, ppo_cfg)
        best, agent_params = ppo.select_seed(result)
        ppo.log_metrics(lg, result.metrics, ppo_cfg, seed=best)
    meta = {
        "ppo": ppo.config_to_dict(ppo_cfg),
        "seed_index": best,
        "checkpoint": model["checkpoint"],
        "window_steps": int(cfg.env.window_steps),
    }
    agent_path = ppo.save_agent(out_dir, agent_params, meta)

    hpa = _hpa(cfg, chain, env.interval_s)
    tuned, search = tune_hpa(
        env, params, hpa, tune_key, targets=tuple(cfg.eval.hpa_targets), n_episodes=16
    )
    policies = {"ppo": from_actor(ppo.make_network(env, ppo_cfg), agent_params)}
    policies.update(heuristic_suite(env, hpa, tuned))
    figures = evaluate_suite(env, params, policies, int(cfg.eval.n_episodes), eval_key)
    return {
        "agent": str(agent_path),
        "chain": chain,
        "seed_returns": np.asarray(result.metrics["train/episode_return"])[:, -5:]
        .mean(axis=1)
        .tolist(),
        "hpa_target": float(hpa.target_utilisation),
        "tuned_hpa_target": float(tuned.target_utilisation),
        "hpa_search": search,
        "learned_env": figures,
    }


def _agent_policy(agents: Mapping[str, Any], env):
    from research.agents import ppo

    params, meta = ppo.load_agent(agents["agent"])
    network = ppo.make_network(env, ppo.config_from_dict(meta["ppo"]))
    return network, params


def live_evaluation(cfg, agents: Mapping[str, Any], out: Path, stop) -> dict[str, Any]:
    """PPO, the HPA and the tuned HPA each run the live testbed in closed loop."""
    from research.agents.heuristics import hpa_params_for
    from research.agents.policies import LiveHPA
    from research.checkpoint import load_model
    from research.live import LiveActor, evaluate_live

    bundle = load_model(load_ppo_meta(agents)["checkpoint"])
    layout = _layout(cfg, bundle, "testbed")
    network, params = _agent_policy(agents, _EnvShape(layout))
    cpu = float(cfg.eval.cpu_request_cores.testbed)
    hpa = hpa_params_for(
        layout.interval_s, target_utilisation=agents["hpa_target"], cpu_request_cores=cpu
    )
    tuned = hpa.replace(target_utilisation=agents["tuned_hpa_target"])
    window = int(cfg.env.window_steps)
    policies = {
        "ppo": lambda: LiveActor(network, params, layout, bundle.normaliser, window),
        "hpa": lambda: LiveHPA(hpa, layout.services),
        "tuned_hpa": lambda: LiveHPA(tuned, layout.services),
    }
    return evaluate_live(
        policies,
        plain(cfg.source),
        layout,
        float(cfg.live.duration_s),
        plain(cfg.live.load),
        plain(cfg.live.faults),
        float(cfg.env.slo_s),
        list(cfg.env.reward_weights),
        out=out,
        stop=stop,
    )


def reference_evaluation(cfg, agents: Mapping[str, Any], dataset: Path) -> dict[str, Any]:
    """Every policy of the reference chain in the reference queueing environment (the truth),
    on workload traces the model never saw."""
    import jax.numpy as jnp

    from jaxsim.queueing_env import QueueingEnv
    from jaxsim.workload import FaultSpec, synthetic_traces
    from research.agents.policies import from_actor, heuristic_suite
    from research.checkpoint import load_model
    from research.evaluation import evaluate_suite

    bundle = load_model(load_ppo_meta(agents)["checkpoint"])
    layout = _layout(cfg, bundle, "reference")
    env = QueueingEnv(layout, window_steps=int(cfg.env.window_steps))
    steps = int(cfg.env.episode_steps)
    params = env.make_params(
        traces=jnp.asarray(synthetic_traces(int(cfg.seed) + 1, 16, 4 * steps)),
        faults=FaultSpec(rate_per_step=float(cfg.env.fault_rate_per_step.reference)),
        normaliser=bundle.normaliser,
        reward_weights=jnp.asarray(cfg.env.reward_weights, jnp.float32)[:4],
        slo_s=float(cfg.env.slo_s),
        max_steps_in_episode=steps,
    )
    network, agent_params = _agent_policy(agents, env)
    hpa = _hpa(cfg, "reference", layout.interval_s)
    tuned = hpa.replace(target_utilisation=agents["tuned_hpa_target"])
    policies = {"ppo": from_actor(network, agent_params)}
    policies.update(heuristic_suite(env, hpa, tuned))
    key = jax.random.key(int(cfg.seed) + 2)
    return {"reference_env": evaluate_suite(env, params, policies, int(cfg.eval.n_episodes), key)}


def load_ppo_meta(agents: Mapping[str, Any]) -> dict[str, Any]:
    import json

    return json.loads((Path(agents["agent"]) / "meta.json").read_text())


class _EnvShape:
    """The static attributes `ppo.make_network` reads, for building a network without an env."""

    def __init__(self, layout):
        self.services, self.max_delta = layout.services, layout.max_delta


def finite(values: Mapping[str, Any]) -> bool:
    """Whether every number in a nested mapping is finite."""
    for value in values.values():
        if isinstance(value, Mapping):
            if not finite(value):
                return False
        elif isinstance(value, int | float) and not np.isfinite(value):
            return False
    return True


AGENT_FIGURES = ("return", "slo_violation_rate", "error_ratio", "mean_replicas", "scaling_actions")
PLACES = {"learned_env": "learned environment", "testbed": "live testbed",
          "reference_env": "reference environment (truth)",
          "reference_learned_env": "learned model of the reference environment"}  # fmt: skip


def build_report(results: Mapping[str, Any], timings_s: Mapping[str, float]) -> dict[str, Any]:
    """The report dict: `data` and `model` of the source chain, `agents.<policy>.<place>`,
    the reference chain's data and model, and `timings_s` per stage."""
    report: dict[str, Any] = {"agents": {}, "timings_s": dict(timings_s)}
    source = results.get("testbed") or {}
    reference = results.get("reference") or {}

    def figures(by_policy: Mapping[str, Any], place: str) -> None:
        for policy, values in by_policy.items():
            entry = report["agents"].setdefault(policy, {})
            entry[place] = {k: values[k] for k in AGENT_FIGURES if k in values}

    for key, chain in (("data", source), ("reference_data", reference)):
        if chain.get("data"):
            report[key] = {
                k: chain["data"][k] for k in ("runs", "steps", "services", "fault_events")
            }
    for key, chain in (("model", source), ("reference_model", reference)):
        if chain.get("accuracy"):
            acc = chain["accuracy"]
            report[key] = {
                "nrmse": acc["nrmse"],
                "coverage90": acc["coverage90"],
                "bound_violations": acc["bound_violations"],
                **({"plausibility": acc["plausibility"]} if "plausibility" in acc else {}),
            }
    if source.get("agents"):
        figures(source["agents"]["learned_env"], "learned_env")
        report["tuned_hpa_target"] = source["agents"]["tuned_hpa_target"]
    if source.get("live"):
        figures(source["live"], "testbed")
    if reference.get("agents"):
        figures(reference["agents"]["learned_env"], "reference_learned_env")
    if reference.get("truth"):
        figures(reference["truth"]["reference_env"], "reference_env")
    return report


def write_report(results: Mapping[str, Any], timings_s: Mapping[str, float], run_dir: Path):
    """Writes report.json, report.md and the plots under `run_dir`; returns the report."""
    import json
    import os

    report = build_report(results, timings_s)
    plots = plot_report(results, report, run_dir / "plots")
    report["plots"] = [str(p.relative_to(run_dir)) for p in plots]
    for name, text in (
        ("report.json", json.dumps(report, indent=2)),
        ("report.md", report_markdown(report)),
    ):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    return report


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = ["# kubeworld pipeline report", ""]
    for key, title in (("data", "Data (source chain)"), ("reference_data", "Data (reference)")):
        if key in report:
            lines += [f"## {title}", "", "| runs | steps | services | fault events |",
                      "| ---: | ---: | ---: | ---: |",
                      "| {runs} | {steps} | {services} | {fault_events} |".format(**report[key]),
                      ""]  # fmt: skip
    titles = {
        "model": "Dynamics model (source chain, held-out runs)",
        "reference_model": "Dynamics model (reference data, held-out runs)",
    }
    for key, title in titles.items():
        if key not in report:
            continue
        m = report[key]
        lines += [f"## {title}", "", "nRMSE averaged over features:", "",
                  "| predictor | h1 | h5 | h10 |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for name, row in m["nrmse"].items():
            lines.append(f"| {name} | {row['h1']:.3f} | {row['h5']:.3f} | {row['h10']:.3f} |")
        lines += ["", f"Coverage of the 90% interval: {m['coverage90']:.3f}; "
                  f"bound violations: {m['bound_violations']}.", ""]  # fmt: skip
        if "plausibility" in m:
            lines += ["Plausibility violation rates: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in m["plausibility"].items()
                                  if isinstance(v, int | float)), ""]  # fmt: skip
    places = sorted({p for fig in report["agents"].values() for p in fig}, key=list(PLACES).index)
    for place in places:
        lines += [f"## Policies in the {PLACES[place]}", "",
                  "| policy | return | SLO violations | error ratio | mean replicas | scalings |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for policy, fig in report["agents"].items():
            if place in fig:
                f = fig[place]
                lines.append(
                    f"| {policy} | {f['return']:.2f} | {100 * f['slo_violation_rate']:.1f}% | "
                    f"{f.get('error_ratio', float('nan')):.4f} | {f['mean_replicas']:.2f} | "
                    f"{f.get('scaling_actions', float('nan')):.1f} |"
                )
        lines.append("")
    lines += ["## Timings", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


def plot_report(results: Mapping[str, Any], report: Mapping[str, Any], out: Path) -> list[Path]:
    """Replicas and entry p95 over one episode for PPO against the HPAs (one figure per place
    with traces), and nRMSE against horizon for the model and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    traces = {
        "learned_env": (results.get("testbed") or {}).get("agents", {}).get("learned_env"),
        "testbed": (results.get("testbed") or {}).get("live"),
        "reference_env": ((results.get("reference") or {}).get("truth") or {}).get("reference_env"),
    }
    for place, by_policy in traces.items():
        if not by_policy:
            continue
        fig, (ax_r, ax_l) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for name in ("ppo", "hpa", "tuned_hpa"):
            if name in by_policy and "trace" in by_policy[name]:
                trace = by_policy[name]["trace"]
                ax_r.plot(trace["replicas_total"], label=name)
                ax_l.plot(trace["latency_p95_s"], label=name)
        ax_r.set_ylabel("replicas (all services)")
        ax_l.set_ylabel("entry p95 latency, s")
        ax_l.set_xlabel("step")
        ax_r.legend()
        ax_r.set_title(f"PPO against the HPA: {PLACES[place]}")
        path = out / f"policies_{place}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for key in ("model", "reference_model"):
        if key not in report:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, row in report[key]["nrmse"].items():
            ax.plot([1, 5, 10], [row["h1"], row["h5"], row["h10"]], marker="o", label=name)
        ax.set_xlabel("horizon, steps")
        ax.set_ylabel("nRMSE (mean over features)")
        ax.set_title(f"Error against horizon ({key.replace('_', ' ')})")
        ax.legend()
        path = out / f"error_vs_horizon_{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
