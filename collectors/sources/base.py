"""The interface every source of metrics and cluster state implements.

A `Source` is read once per step and answers a `Sample`: per service and per node, the columns
it knows (see `collectors.schema`), each a float or None when it could not be read. A source
that cannot be reached at all raises `SourceError`; the collector then records the step's
values as null and retries the source with back-off (`Backoff`).

A `Cluster` is the action side: desired replicas per service, and the scale subresource.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Values = dict[str, float | None]


@dataclass
class Sample:
    """What one source read at one step.

    `services` maps service -> column -> value; `nodes` maps node -> column -> value. A column
    absent from a mapping means this source does not provide it; None means it tried and failed.
    `missing` lists human-readable names of what could not be read (for the warning log).
    """

    services: dict[str, Values] = field(default_factory=dict)
    nodes: dict[str, Values] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


class Source(ABC):
    """A metrics or state source read once per step."""

    name: str = "source"

    @abstractmethod
    def sample(self, ts_s: float) -> Sample:
        """Read every column this source provides at wall time `ts_s` (epoch seconds).

        Raises `SourceError` when the source cannot be reached at all.
        """

    def close(self) -> None:
        """Release connections; the default has none to release."""
        return None


class Cluster(ABC):
    """Cluster state and the replica action (testbed supervisor or Kubernetes API)."""

    @abstractmethod
    def replicas(self) -> dict[str, dict[str, int]]:
        """Per service: {"desired": int, "ready": int}."""

    @abstractmethod
    def scale(self, service: str, replicas: int) -> None:
        """Set the desired replica count of `service`; raises `SourceError` on failure."""


class Backoff:
    """Exponential back-off for a source that failed: skip it until its next try time.

    After `n` consecutive failures the next try is `base_s * 2**(n-1)` seconds later, at most
    `max_s`. A success resets it.
    """

    def __init__(self, base_s: float, max_s: float):
        self.base_s = base_s
        self.max_s = max_s
        self.failures = 0
        self.next_try_s = float("-inf")

    def ready(self, now_s: float) -> bool:
        """Whether the source should be tried at `now_s`."""
        return now_s >= self.next_try_s

    def failed(self, now_s: float) -> float:
        """Record a failure at `now_s`; returns the delay until the next try in seconds."""
        self.failures += 1
        delay_s = min(self.max_s, self.base_s * 2 ** (self.failures - 1))
        self.next_try_s = now_s + delay_s
        return delay_s

    def succeeded(self) -> None:
        """Record a success: the next step tries again normally."""
        self.failures = 0
        self.next_try_s = float("-inf")
