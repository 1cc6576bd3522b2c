"""Exploration policies for collection, so that the data covers the action space.

An explorer sees each step's service rows (as the collector wrote them) and proposes target
replicas for some services; `ExplorationHook` feeds the proposals to a `ReplicaActuator`, which
clamps them to the bounds and records every change in `events`.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from collectors.actuator import ReplicaActuator
from collectors.errors import ConfigError

Rows = list[dict[str, Any]]


class Explorer(ABC):
    """Proposes target replicas from the newest step's rows."""

    @abstractmethod
    def propose(self, step: int, rows: Rows) -> dict[str, int]:
        """Service -> target replicas for the services to change now (may be empty)."""


def _desired(rows: Rows) -> dict[str, int | None]:
    return {r["service"]: r.get("replicas_desired") for r in rows}


class NoExplorer(Explorer):
    """Never changes replicas."""

    def propose(self, step: int, rows: Rows) -> dict[str, int]:
        return {}


class RandomWalk(Explorer):
    """Each service moves by a random non-zero delta in [-max_delta, max_delta], reflected at
    the bounds, after dwelling a random number of steps in [dwell_min, dwell_max]."""

    def __init__(
        self,
        services: Sequence[str],
        min_replicas: int,
        max_replicas: int,
        dwell_steps: tuple[int, int],
        max_delta: int = 1,
        seed: int = 0,
    ):
        if dwell_steps[0] < 1 or dwell_steps[1] < dwell_steps[0]:
            raise ConfigError(f"random_walk: dwell_steps {dwell_steps} must be 1 <= lo <= hi")
        self.services = list(services)
        self.bounds = (min_replicas, max_replicas)
        self.dwell_steps = dwell_steps
        self.max_delta = max_delta
        self.rng = random.Random(seed)
        self.next_move = {s: self.rng.randint(*dwell_steps) for s in self.services}
        self.target: dict[str, int] = {}

    def propose(self, step: int, rows: Rows) -> dict[str, int]:
        desired = _desired(rows)
        out = {}
        for service in self.services:
            current = self.target.get(service, desired.get(service))
            if current is None or step < self.next_move[service]:
                continue
            self.next_move[service] = step + self.rng.randint(*self.dwell_steps)
            out[service] = self.target[service] = self._move(int(current))
        return out

    def _move(self, current: int) -> int:
        lo, hi = self.bounds
        delta = self.rng.choice([d for d in range(-self.max_delta, self.max_delta + 1) if d])
        target = current + delta
        if target < lo or target > hi:
            target = current - delta
        return max(lo, min(hi, target))


class HpaWithNoise(Explorer):
    """The Kubernetes HPA rule on CPU with noise added to its answer.

    Every `sync_steps` steps: utilisation = cpu_cores / (ready replicas * cpu_request_cores);
    desired = ceil(current * utilisation / target_utilization), unchanged within `tolerance`;
    then Gaussian noise of `noise_sd` replicas is added and rounded.
    """

    def __init__(
        self,
        services: Sequence[str],
        target_utilization: float,
        cpu_request_cores: float,
        noise_sd: float,
        sync_steps: int = 1,
        tolerance: float = 0.1,
        seed: int = 0,
    ):
        self.services = list(services)
        self.target_utilization = target_utilization
        self.cpu_request_cores = cpu_request_cores
        self.noise_sd = noise_sd
        self.sync_steps = sync_steps
        self.tolerance = tolerance
        self.rng = random.Random(seed)

    def propose(self, step: int, rows: Rows) -> dict[str, int]:
        if step % self.sync_steps:
            return {}
        out = {}
        for row in rows:
            if row["service"] not in self.services:
                continue
            current, ready, cpu = row["replicas_desired"], row["replicas_ready"], row["cpu_cores"]
            if current is None or cpu is None or not ready:
                continue
            ratio = cpu / (ready * self.cpu_request_cores) / self.target_utilization
            desired = current if abs(ratio - 1) <= self.tolerance else math.ceil(current * ratio)
            out[row["service"]] = round(desired + self.rng.gauss(0.0, self.noise_sd))
        return out


class StepSchedule(Explorer):
    """Fixed targets at fixed steps: `schedule` is [(step, {service: replicas}), ...]."""

    def __init__(self, schedule: Sequence[tuple[int, Mapping[str, int]]]):
        self.schedule = {int(step): dict(targets) for step, targets in schedule}

    def propose(self, step: int, rows: Rows) -> dict[str, int]:
        return dict(self.schedule.get(step, {}))


class ExplorationHook:
    """A collector `on_step` hook: explorer proposal -> actuator (changes land in `events`)."""

    def __init__(self, explorer: Explorer, actuator: ReplicaActuator):
        self.explorer = explorer
        self.actuator = actuator
        self.__name__ = type(explorer).__name__

    def __call__(self, step: int, ts_s: float, rows: Rows) -> None:
        targets = self.explorer.propose(step, rows)
        self.actuator.apply(targets, _desired(rows))


def make_explorer(cfg: Mapping[str, Any], services: Sequence[str], bounds: tuple[int, int]):
    """An explorer from its config (`conf/explorer/*.yaml`, key `name`)."""
    name = cfg.get("name", "none")
    if name == "none":
        return NoExplorer()
    if name == "random_walk":
        return RandomWalk(
            services, *bounds, tuple(cfg["dwell_steps"]), cfg["max_delta"], cfg.get("seed", 0)
        )
    if name == "hpa_noise":
        return HpaWithNoise(
            services,
            cfg["target_utilization"],
            cfg["cpu_request_cores"],
            cfg["noise_sd"],
            cfg["sync_steps"],
            cfg["tolerance"],
            cfg.get("seed", 0),
        )
    if name == "steps":
        return StepSchedule([(s["at_step"], s["replicas"]) for s in cfg["schedule"]])
    raise ConfigError(
        f"explorer.name {name!r} not in ['none', 'random_walk', 'hpa_noise', 'steps']"
    )
