"""Online learning under a workload shift: `python -m experiments.online_shift [out.json]`.

Trains the default model (quick training) on runs of an old regime of `research.synthetic`,
then shifts the regime (more load, less capacity per replica) and calls `research.online.update`
on the new regime's training runs with old windows replayed. Scores the model on held-out runs
of both regimes before and after the update (nRMSE averaged over features, horizons 1, 5, 10)
and writes the figures to JSON: the error on the new regime should fall, the old one stay close.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import yaml

from research import synthetic
from research.accuracy import evaluate, held_out
from research.checkpoint import load_model
from research.online import OnlineConfig, update
from research.train import fit

CONF = Path(__file__).parents[1] / "conf"
HORIZON = 10
SHIFT = {"load_rps": 70.0, "capacity_scale": 0.6}  # the new regime, against synthetic defaults


def scores(bundle, regimes: dict[str, tuple]) -> dict[str, dict]:
    """nRMSE of the model and persistence per regime, from (train, held-out) windows."""
    out = {}
    for name, (train, test) in regimes.items():
        result = evaluate(bundle, test, train_data=train)
        out[name] = {k: result["nrmse"][k] for k in ("model", "persistence")}
    return out


def run(work: Path, n_runs: int = 6, n_steps: int = 600) -> dict:
    """Old and new datasets under `work`, fit, update; returns the figures."""
    synthetic.write_dataset(work / "old", n_runs=n_runs, n_steps=n_steps, seed=10, prefix="old")
    synthetic.write_dataset(
        work / "new", n_runs=n_runs, n_steps=n_steps, seed=11, prefix="new", **SHIFT
    )
    model = yaml.safe_load((CONF / "model" / "default.yaml").read_text())
    train = yaml.safe_load((CONF / "train" / "default.yaml").read_text())
    train |= yaml.safe_load((CONF / "train" / "quick.yaml").read_text())
    train.pop("defaults", None)
    cfg = {"model": model, "train": train, "data_prep": {}}
    bundle = load_model(fit(work / "old", cfg, work / "model"))

    regimes = {name: held_out(bundle, work / name, HORIZON) for name in ("old", "new")}
    before = scores(bundle, regimes)
    online = OnlineConfig(steps=300, horizon=HORIZON)
    updated = update(bundle, regimes["new"][0], replay=regimes["old"][0], cfg=online)
    after = scores(updated, regimes)
    return {"shift": SHIFT, "online": vars(online), "before": before, "after": after}


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("online_shift.json")
    with tempfile.TemporaryDirectory() as work:
        figures = run(Path(work))
    out.write_text(json.dumps(figures, indent=2))
    for when in ("before", "after"):
        for regime, row in figures[when].items():
            model, last = row["model"], row["persistence"]
            print(f"{when:6s} {regime}: model h1 {model['h1']:.3f} h10 {model['h10']:.3f}"
                  f"  (persistence h1 {last['h1']:.3f} h10 {last['h10']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
