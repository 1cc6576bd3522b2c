"""Checkpoints of the dynamics model with orbax: parameters plus JSON metadata.

A checkpoint folder holds two orbax items: `params` (the ensemble's network weights, K leading
axis) and `meta` (JSON): the normaliser, the metric and fault orders, the services, the entry
service, the call graph, the sample interval, the `DynamicsConfig` and the training and data
configs. `load_model` rebuilds everything from the folder alone.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from collectors.errors import DataError
from collectors.schema import FAULT_TYPES, METRIC_COLUMNS, SCHEMA_VERSION
from research import model as dyn
from research.normalise import Normaliser


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """Everything needed to run a trained model.

    cfg: static model config. params: {"net", "norm"} as `research.model` takes them.
    services: names in model order (entry first). meta: the checkpoint's metadata.
    """

    cfg: dyn.DynamicsConfig
    params: dict[str, Any]
    services: list[str]
    entry_service: str
    call_graph: list[list[str]]
    interval_s: float
    meta: dict[str, Any]

    @property
    def normaliser(self) -> Normaliser:
        return self.params["norm"]

    def predict(self, window: dyn.StepInput):
        """(mean, scale) (K, B, S, M) normalised for the step after `window` (B, L, ...)."""
        return dyn.predict(self.params, self.cfg, window)

    def with_params(self, params: dict[str, Any]) -> ModelBundle:
        return dataclasses.replace(self, params=params)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(path: str | Path, params: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Writes params {"net", "norm"} and `meta` to the folder `path` (replaced if present)."""
    path = Path(path).absolute()
    if path.exists():
        shutil.rmtree(path)
    meta = {
        **meta,
        "normaliser": params["norm"].to_dict(),
        "metrics": list(METRIC_COLUMNS),
        "fault_types": list(FAULT_TYPES),
        "schema_version": SCHEMA_VERSION,
    }
    _checkpointer().save(
        path,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params["net"]), meta=ocp.args.JsonSave(meta)
        ),
    )
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint folder -> (params {"net", "norm"}, meta)."""
    path = Path(path).absolute()
    if not path.exists():
        raise DataError(f"checkpoint {path}: no such folder")
    ckpt = _checkpointer()
    meta = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if list(meta.get("metrics", [])) != list(METRIC_COLUMNS):
        raise DataError(f"checkpoint {path}: metric order {meta.get('metrics')} differs from ours")
    cfg = dyn.DynamicsConfig.from_dict(meta["model_config"])
    abstract = jax.eval_shape(lambda: dyn.init_params(cfg, jax.random.key(0))["net"])
    net = ckpt.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))[
        "params"
    ]
    return {"net": net, "norm": Normaliser.from_dict(meta["normaliser"])}, meta


def load_model(path: str | Path) -> ModelBundle:
    """A `ModelBundle` rebuilt from the checkpoint folder alone."""
    params, meta = load_checkpoint(path)
    return ModelBundle(
        cfg=dyn.DynamicsConfig.from_dict(meta["model_config"]),
        params=params,
        services=list(meta["services"]),
        entry_service=meta["entry_service"],
        call_graph=[list(edge) for edge in meta.get("call_graph", [])],
        interval_s=float(meta.get("interval_s", 2.0)),
        meta=meta,
    )


def check_services(bundle: ModelBundle, services: list[str], where: str) -> None:
    """Raises `DataError` when `services` (of run or dataset `where`) differ from the model's."""
    if list(services) != list(bundle.services):
        raise DataError(
            f"{where}, column 'service': services {list(services)} differ from the "
            f"checkpoint's {bundle.services}"
        )
