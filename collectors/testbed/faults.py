"""Faults of the testbed: validation (supervisor side) and their effect inside a replica.

Every fault has a target service, a severity in [0, 1] and an absolute deadline (Unix time).
The supervisor pushes the faults of a service to its replicas together with their deadlines,
and each replica stops applying a fault at its deadline by itself, so a fault expires even when
the supervisor or whoever injected the fault is gone.

Effects (severity s):
- `pod_kill`: the supervisor SIGKILLs ceil(s * replicas) (at least one) replicas of the target;
  each restarts after the restart back-off, held off at least until the fault's deadline.
- `cpu_stress`: a thread in each target replica burns CPU at duty cycle s, holding the replica's
  GIL in slices of up to 40 ms, so the replica stalls as a throttled pod does and the machine
  loses up to a core per replica.
- `memory_leak`: each target replica allocates s * rate bytes per second (up to a cap), freed at
  the deadline.
- `latency`: each request of the target takes s * `latency_fault_max_s` longer (in a worker).
- `error`: the target answers 500 with probability s.
- `network_delay`: each outgoing call and each response of the target waits
  s * `network_delay_max_s` (egress delay, like netem on the pod's interface).
"""

from __future__ import annotations

import math

from collectors.errors import FaultError
from collectors.schema import FAULT_TYPES
from collectors.testbed.fault_effects import Fault

__all__ = ["Fault", "pods_to_kill", "validate_fault"]


def validate_fault(
    fault_type: str, target: str, severity: float, duration_s: float, services: list[str]
) -> None:
    """Raise FaultError naming the field that is out of its allowed set or range."""
    if fault_type not in FAULT_TYPES:
        raise FaultError(f"fault type {fault_type!r} not in {list(FAULT_TYPES)}")
    if target not in services:
        raise FaultError(f"fault target {target!r} not in services {services}")
    if not (isinstance(severity, int | float) and 0.0 <= severity <= 1.0):
        raise FaultError(f"fault severity {severity!r} outside [0, 1]")
    if not (isinstance(duration_s, int | float) and math.isfinite(duration_s) and duration_s > 0):
        raise FaultError(f"fault duration_s {duration_s!r} must be a positive number")


def pods_to_kill(severity: float, n_pods: int) -> int:
    """How many of `n_pods` a pod_kill of `severity` kills: ceil(severity * n), at least one."""
    return min(n_pods, max(1, math.ceil(severity * n_pods - 1e-9)))
