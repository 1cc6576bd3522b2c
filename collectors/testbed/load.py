"""Rate curves of the open-loop load generator.

A curve maps seconds since it was set to an offered request rate (requests per second). Each
kind is a frozen dataclass; `curve_from_spec` builds one from a dict with a `kind` field, so
Hydra configs and the supervisor's JSON API describe curves as data.
"""

from __future__ import annotations

import csv
import glob
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from collectors.errors import ConfigError, DataError

NEZHA_WORKLOAD_COLUMN = "PodWorkload(Ops)"


class _Curve:
    """Shared behaviour of the curve dataclasses."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The dict spec (with `kind`) that `curve_from_spec` reads back."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class ConstantLoad(_Curve):
    """The same rate all the time."""

    kind: ClassVar[str] = "constant"
    rate_rps: float = 20.0

    def rate_at(self, t_s: float) -> float:
        return max(0.0, self.rate_rps)


@dataclass(frozen=True)
class RampLoad(_Curve):
    """A linear ramp from `start_rps` to `end_rps` over `duration_s`, then `end_rps`."""

    kind: ClassVar[str] = "ramp"
    start_rps: float = 5.0
    end_rps: float = 40.0
    duration_s: float = 60.0

    def rate_at(self, t_s: float) -> float:
        frac = min(1.0, max(0.0, t_s / self.duration_s)) if self.duration_s > 0 else 1.0
        return max(0.0, self.start_rps + frac * (self.end_rps - self.start_rps))


@dataclass(frozen=True)
class DiurnalLoad(_Curve):
    """A sinusoid: `mean_rps + amplitude_rps * sin(2 pi (t + phase_s) / period_s)`."""

    kind: ClassVar[str] = "diurnal"
    mean_rps: float = 20.0
    amplitude_rps: float = 15.0
    period_s: float = 300.0
    phase_s: float = 0.0

    def rate_at(self, t_s: float) -> float:
        angle = 2.0 * math.pi * (t_s + self.phase_s) / self.period_s
        return max(0.0, self.mean_rps + self.amplitude_rps * math.sin(angle))


@dataclass(frozen=True)
class SpikeLoad(_Curve):
    """`base_rps`, then `spike_rps` for `duration_s` from `start_s` (every `period_s` if > 0)."""

    kind: ClassVar[str] = "spike"
    base_rps: float = 10.0
    spike_rps: float = 50.0
    start_s: float = 30.0
    duration_s: float = 20.0
    period_s: float = 0.0

    def rate_at(self, t_s: float) -> float:
        local = t_s - self.start_s
        if self.period_s > 0 and local >= 0:
            local = local % self.period_s
        in_spike = 0.0 <= local < self.duration_s
        return max(0.0, self.spike_rps if in_spike else self.base_rps)


@dataclass(frozen=True)
class TraceLoad(_Curve):
    """A replayed trace, linearly interpolated, scaled so that its peak is `peak_rps`.

    The trace is `values`, or the column `column` of the CSV files matching `path` (a glob,
    files concatenated in sorted order; e.g. the Nezha `frontend-*_metric.csv` files). Each
    sample lasts `step_s` seconds of replay; the trace repeats when `loop` is true.
    """

    kind: ClassVar[str] = "trace"
    path: str | None = None
    column: str = NEZHA_WORKLOAD_COLUMN
    values: tuple[float, ...] = ()
    step_s: float = 2.0
    peak_rps: float = 40.0
    loop: bool = True
    _scaled: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = tuple(float(v) for v in self.values) if self.values else self._read()
        if not raw:
            raise ConfigError("TraceLoad: the trace is empty (give `values` or `path`)")
        if self.step_s <= 0:
            raise ConfigError(f"TraceLoad.step_s must be > 0, got {self.step_s}")
        peak = max(raw)
        scale = self.peak_rps / peak if peak > 0 else 0.0
        object.__setattr__(self, "_scaled", tuple(max(0.0, v * scale) for v in raw))

    def _read(self) -> tuple[float, ...]:
        if self.path is None:
            return ()
        files = sorted(glob.glob(str(Path(self.path).expanduser())))
        if not files:
            raise DataError(f"TraceLoad: no file matches {self.path!r}")
        out: list[float] = []
        for name in files:
            out.extend(_read_column(name, self.column))
        return tuple(out)

    @property
    def duration_s(self) -> float:
        return len(self._scaled) * self.step_s

    def rate_at(self, t_s: float) -> float:
        n = len(self._scaled)
        pos = max(0.0, t_s) / self.step_s
        if self.loop:
            pos = pos % n
        elif pos >= n - 1:
            return self._scaled[-1]
        i = int(pos)
        frac = pos - i
        nxt = self._scaled[(i + 1) % n] if (self.loop or i + 1 < n) else self._scaled[i]
        return (1.0 - frac) * self._scaled[i] + frac * nxt

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "_scaled"}
        out["values"] = list(self.values)
        out["kind"] = self.kind
        return out


LoadCurve = ConstantLoad | RampLoad | DiurnalLoad | SpikeLoad | TraceLoad
CURVE_KINDS: dict[str, type] = {
    c.kind: c for c in (ConstantLoad, RampLoad, DiurnalLoad, SpikeLoad, TraceLoad)
}


def _read_column(path: str, column: str) -> list[float]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise DataError(f"TraceLoad: {path} has no column {column!r}")
            return [float(row[column]) for row in reader if row[column] not in ("", None)]
    except (OSError, ValueError) as exc:
        raise DataError(f"TraceLoad: cannot read column {column!r} of {path}: {exc}") from exc


def curve_from_spec(spec: LoadCurve | dict[str, Any]) -> LoadCurve:
    """A curve from a curve or from a dict `{"kind": ..., <parameters>}`."""
    if isinstance(spec, tuple(CURVE_KINDS.values())):
        return spec
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"load curve spec needs a 'kind' in {sorted(CURVE_KINDS)}: {spec!r}")
    params = {k: v for k, v in spec.items() if k != "kind"}
    cls = CURVE_KINDS.get(spec["kind"])
    if cls is None:
        raise ConfigError(f"load curve kind {spec['kind']!r} not in {sorted(CURVE_KINDS)}")
    if "values" in params:
        params["values"] = tuple(params["values"] or ())
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"load curve {spec['kind']!r}: {exc}") from exc
