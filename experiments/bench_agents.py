"""PPO training speed: `python -m experiments.bench_agents [steps] [out.json] [envs]`.

Trains one PPO agent (the default `conf/agent/ppo.yaml` sizes) for `steps` environment steps
in each named environment (comma-separated: reference, learned; the learned one is the default
model size with random weights, the speed of a trained checkpoint of that size) and writes to
JSON per environment: compile seconds, training seconds, environment steps per second without
and with compilation, and the seconds one million steps take at that rate.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
import yaml

from research.agents import envs, ppo, training

log = logging.getLogger(__name__)
AGENT_CONF = Path(__file__).parents[1] / "conf" / "agent" / "ppo.yaml"
ENV_CONF = Path(__file__).parents[1] / "conf" / "env"


def bench(total_steps: int, env_names: list[str]) -> dict:
    """Figures per environment for `total_steps` steps of one seed."""
    agent = yaml.safe_load(AGENT_CONF.read_text()) | {"total_timesteps": total_steps}
    cfg, _ = training.split_agent_settings(agent)
    out = {"devices": [str(d) for d in jax.devices()], "ppo": ppo.config_to_dict(cfg)}
    for name in env_names:
        settings = yaml.safe_load((ENV_CONF / f"{name}.yaml").read_text())
        env, params = envs.make_env(settings)
        _, summary = ppo.train_and_select(env, params, cfg, n_seeds=1)
        summary["seconds_per_million_steps"] = 1e6 / summary["steps_per_s"]
        summary["seconds_per_million_steps_with_compile"] = (
            summary["compile_s"] + summary["seconds_per_million_steps"]
        )
        out[name] = summary
        log.info("%s: %s", name, summary)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 262_144
    path = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("bench_agents.json")
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["reference", "learned"]
    figures = bench(steps, names)
    path.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
