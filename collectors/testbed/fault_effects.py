"""Fault state inside a replica: the faults pushed by the supervisor and their effects.

Kept apart from `faults` so that replicas start without importing the data schema (pyarrow).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

# The fault types a replica applies itself (all of collectors.schema.FAULT_TYPES but pod_kill,
# which the supervisor carries out).
REPLICA_FAULTS: tuple[str, ...] = ("cpu_stress", "memory_leak", "latency", "error", "network_delay")
_STRESS_PERIOD_S = 0.1  # seconds of one busy + idle cycle of cpu_stress (the CFS period)
# Busy share of a cycle at severity 1: a stressor in a pod shares the pod's CPU quota with the
# application, which keeps a share of it; with the whole cycle busy, a replica would not even
# answer its /metrics scrape, which no real stressed pod does.
_STRESS_MAX_DUTY = 0.75
_LEAK_TICK_S = 0.1
_LEAK_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Fault:
    """One injected fault. Times are Unix seconds."""

    id: str
    type: str
    target: str
    severity: float
    duration_s: float
    started_at: float
    deadline: float

    def active(self, now: float) -> bool:
        return now < self.deadline

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _seconds_per_sum_item(n: int = 200_000) -> float:
    t0 = time.perf_counter()
    sum(range(n))
    return max(1e-9, (time.perf_counter() - t0) / n)


class ReplicaFaults:
    """The faults a replica applies, with the threads and tasks that carry their effects."""

    def __init__(self, leak_rate_bytes_per_s: float, leak_max_bytes: float) -> None:
        self._faults: list[Fault] = []
        self._leak_rate = leak_rate_bytes_per_s
        self._leak_max = leak_max_bytes
        self._leaked: list[bytes] = []
        self._stress: threading.Thread | None = None
        self._leak_task: asyncio.Task | None = None

    def set(self, faults: list[Fault]) -> None:
        """Replace the faults (from the supervisor) and start the effects that need a worker."""
        self._faults = [f for f in faults if f.type in REPLICA_FAULTS]
        now = time.time()
        if self.severity("cpu_stress", now) > 0 and not self.stress_running:
            self._stress = threading.Thread(target=self._stress_loop, daemon=True)
            self._stress.start()
        if self.severity("memory_leak", now) > 0 and (
            self._leak_task is None or self._leak_task.done()
        ):
            self._leak_task = asyncio.get_running_loop().create_task(self._leak_loop())

    def severity(self, fault_type: str, now: float | None = None) -> float:
        """Largest severity of the active faults of `fault_type` (0 when none)."""
        now = time.time() if now is None else now
        return max(
            (f.severity for f in self._faults if f.type == fault_type and f.active(now)),
            default=0.0,
        )

    def active(self) -> list[Fault]:
        now = time.time()
        return [f for f in self._faults if f.active(now)]

    @property
    def stress_running(self) -> bool:
        return self._stress is not None and self._stress.is_alive()

    @property
    def leaked_bytes(self) -> int:
        return sum(len(b) for b in self._leaked)

    def _stress_loop(self) -> None:
        # Busy slices run inside one C call (sum over a range), which holds the GIL for the
        # whole slice: the replica's event loop stalls as a pod's does when its CPU quota is
        # used up by a stressor and CFS throttles it.
        per_item_s = _seconds_per_sum_item()
        while (duty := _STRESS_MAX_DUTY * self.severity("cpu_stress")) > 0:
            sum(range(int(duty * _STRESS_PERIOD_S / per_item_s)))
            time.sleep((1.0 - duty) * _STRESS_PERIOD_S)

    async def _leak_loop(self) -> None:
        owed_bytes = 0.0
        try:
            while (sev := self.severity("memory_leak")) > 0:
                owed_bytes += sev * self._leak_rate * _LEAK_TICK_S
                while owed_bytes >= _LEAK_CHUNK_BYTES and self.leaked_bytes < self._leak_max:
                    self._leaked.append(b"\x01" * _LEAK_CHUNK_BYTES)  # touched pages count
                    owed_bytes -= _LEAK_CHUNK_BYTES
                await asyncio.sleep(_LEAK_TICK_S)
        finally:
            self._leaked.clear()
