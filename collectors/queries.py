"""Which PromQL gives which column: loaded from `conf/source/queries/<name>.yaml`.

Templates take `$namespace` and `$window` (a PromQL duration such as `4s`); other `$` signs
(label_replace's `$1`) are left alone. Service queries answer one series per value of
`service_label`, node queries one per value of `node_label`, entry queries a single series.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from omegaconf import OmegaConf

from collectors.errors import ConfigError
from collectors.schema import METRIC_COLUMNS, NODE_METRIC_COLUMNS, REPLICA_COLUMNS

QUERIES_DIR = Path(__file__).resolve().parents[1] / "conf" / "source" / "queries"
SERVICE_COLUMNS = (*REPLICA_COLUMNS, *METRIC_COLUMNS)


@dataclass(frozen=True)
class QuerySet:
    """PromQL templates per column: `service`, `node` and `entry` (entry service only)."""

    service: dict[str, str]
    node: dict[str, str] = field(default_factory=dict)
    entry: dict[str, str] = field(default_factory=dict)
    service_label: str = "service"
    node_label: str = "node"

    def __post_init__(self):
        for group, allowed in (
            ("service", SERVICE_COLUMNS),
            ("entry", SERVICE_COLUMNS),
            ("node", NODE_METRIC_COLUMNS),
        ):
            unknown = sorted(set(getattr(self, group)) - set(allowed))
            if unknown:
                raise ConfigError(
                    f"queries.{group}: unknown column(s) {unknown}; allowed are {list(allowed)}"
                )

    def render(self, namespace: str, window: str) -> QuerySet:
        """A copy with `$namespace` and `$window` substituted in every template."""

        def sub(group: Mapping[str, str]) -> dict[str, str]:
            return {
                column: Template(text).safe_substitute(namespace=namespace, window=window)
                for column, text in group.items()
            }

        return QuerySet(
            sub(self.service), sub(self.node), sub(self.entry), self.service_label, self.node_label
        )

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> QuerySet:
        """Build from a mapping with keys service, node, entry, service_label, node_label."""
        data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        known = {"service", "node", "entry", "service_label", "node_label"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"queries: unknown key(s) {unknown}; allowed are {sorted(known)}")
        return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()})


def load_queries(name_or_path: str | Path = "default") -> QuerySet:
    """Load a query set by name (a file in `conf/source/queries/`) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = QUERIES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"query set {str(name_or_path)!r}: no file {path}")
    return QuerySet.from_mapping(OmegaConf.load(path))


def promql_duration(seconds: float) -> str:
    """A PromQL duration for `seconds`, in whole milliseconds (e.g. 4.0 -> '4000ms')."""
    return f"{max(1, round(seconds * 1000))}ms"
