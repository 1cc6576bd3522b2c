"""The replica actuator: set desired replicas within bounds and record every change in `events`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from collectors.collector import SystemClock, utc
from collectors.errors import ConfigError, KubeworldError
from collectors.schema import EVENT_ORIGINS
from collectors.sources.base import Cluster

log = logging.getLogger(__name__)


class ReplicaActuator:
    """Scale services of `cluster` to targets clamped to [min_replicas, max_replicas].

    Each change becomes an `events` row (kind=scale, type=scale, the origin given, params
    {"from", "to"}, ts_start = ts_end = the moment of the call), written to `sink` and `store`.
    """

    def __init__(
        self,
        cluster: Cluster,
        run_id: str,
        min_replicas: int,
        max_replicas: int,
        sink=None,
        store=None,
        clock=None,
        origin: str = "explorer",
    ):
        if not 1 <= min_replicas <= max_replicas:
            raise ConfigError(f"actuator: bounds [{min_replicas}, {max_replicas}] are invalid")
        if origin not in EVENT_ORIGINS:
            raise ConfigError(f"actuator: origin {origin!r} not in {list(EVENT_ORIGINS)}")
        self.cluster = cluster
        self.run_id = run_id
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.sink = sink
        self.store = store
        self.clock = clock or SystemClock()
        self.origin = origin
        self.events: list[dict[str, Any]] = []

    def clamp(self, replicas: int) -> int:
        """`replicas` within the bounds."""
        return max(self.min_replicas, min(self.max_replicas, int(replicas)))

    def apply(
        self,
        targets: Mapping[str, int],
        current: Mapping[str, int | None] | None = None,
        origin: str | None = None,
    ) -> list[dict[str, Any]]:
        """Scale each service whose clamped target differs from its current desired count.

        `current` maps service -> desired replicas now (read from the cluster when None or
        missing). Returns the event rows written; a failed scale is logged and not recorded.
        """
        if not targets:
            return []
        known = dict(current or {})
        if any(known.get(s) is None for s in targets):
            known.update({s: v["desired"] for s, v in self.cluster.replicas().items()})
        rows = []
        for service, target in targets.items():
            before, after = known.get(service), self.clamp(target)
            if before == after:
                continue
            try:
                self.cluster.scale(service, after)
            except KubeworldError as err:
                log.warning("scale %s %s -> %s failed: %s", service, before, after, err)
                continue
            rows.append(self._event(service, before, after, origin or self.origin))
        if rows:
            self.events.extend(rows)
            if self.store is not None:
                self.store.append("events", rows)
            if self.sink is not None:
                self.sink.write("events", rows)
        return rows

    def _event(self, service: str, before: int | None, after: int, origin: str) -> dict:
        now = utc(self.clock.now())
        log.info("scale %s: %s -> %d (%s)", service, before, after, origin)
        return {
            "run_id": self.run_id,
            "ts_start": now,
            "ts_end": now,
            "kind": "scale",
            "type": "scale",
            "target": service,
            "severity": None,
            "params": json.dumps({"from": before, "to": after}),
            "origin": origin,
        }
