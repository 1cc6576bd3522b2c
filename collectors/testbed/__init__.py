"""The local testbed: a small microservice application on loopback, its supervisor (the
cluster's control plane), cluster-style metrics, an open-loop load generator and faults."""

from collectors.testbed.config import (
    JOB_APP,
    JOB_CADVISOR,
    JOB_KUBE_STATE,
    JOB_LOADGEN,
    JOB_NODE,
    JOBS,
    NAMESPACE,
    NODE_NAME,
    ServiceSpec,
    TestbedConfig,
)
from collectors.testbed.load import (
    ConstantLoad,
    DiurnalLoad,
    LoadCurve,
    RampLoad,
    SpikeLoad,
    TraceLoad,
    curve_from_spec,
)


def __getattr__(name: str):
    # `Testbed` is imported on first use, so that the testbed's own processes (which import
    # this package) start without the HTTP client library.
    if name == "Testbed":
        from collectors.testbed.testbed import Testbed

        return Testbed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "JOBS",
    "JOB_APP",
    "JOB_CADVISOR",
    "JOB_KUBE_STATE",
    "JOB_LOADGEN",
    "JOB_NODE",
    "NAMESPACE",
    "NODE_NAME",
    "ConstantLoad",
    "DiurnalLoad",
    "LoadCurve",
    "RampLoad",
    "ServiceSpec",
    "SpikeLoad",
    "Testbed",
    "TestbedConfig",
    "TraceLoad",
    "curve_from_spec",
]
