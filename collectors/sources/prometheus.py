"""Metrics from a Prometheus server over its HTTP API (prometheus-api-client).

Each column is one instant query (`collectors.queries.QuerySet`) evaluated at the step's time.
An unreachable server raises `SourceError` (the collector nulls the step and backs off); a
query the server rejects nulls only its column.
"""

from __future__ import annotations

import logging
import math

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from collectors.errors import SourceError
from collectors.queries import QuerySet
from collectors.sources.base import Sample, Source

log = logging.getLogger(__name__)


class PrometheusSource(Source):
    """Read the columns of `queries` (already rendered) from the Prometheus at `url`.

    `entry_service` receives the `entry` queries' answers, which override its service values
    when they answer. `timeout_s` bounds each query; no retries inside a step.
    """

    name = "prometheus"

    def __init__(
        self,
        url: str,
        queries: QuerySet,
        entry_service: str | None = None,
        session: requests.Session | None = None,
        timeout_s: float = 2.0,
    ):
        self.url = url.rstrip("/")
        self.queries = queries
        self.entry_service = entry_service
        self.timeout_s = timeout_s
        self.client = PrometheusConnect(
            url=self.url, session=session or requests.Session(), retry=Retry(total=0)
        )

    def sample(self, ts_s: float) -> Sample:
        """Evaluate every query at `ts_s`; SourceError when the server cannot be reached."""
        sample = Sample()
        label = self.queries.service_label
        for column, query in self.queries.service.items():
            for key, value in self._query(column, query, ts_s, label, sample).items():
                sample.services.setdefault(key, {})[column] = value
        for column, query in self.queries.node.items():
            for key, value in self._query(
                column, query, ts_s, self.queries.node_label, sample
            ).items():
                sample.nodes.setdefault(key, {})[column] = value
        if self.entry_service:
            entry = sample.services.setdefault(self.entry_service, {})
            for column, query in self.queries.entry.items():
                answers = self._query(column, query, ts_s, None, sample)
                if answers:
                    entry[column] = next(iter(answers.values()))
        return sample

    def _query(
        self, column: str, query: str, ts_s: float, label: str | None, sample: Sample
    ) -> dict[str, float | None]:
        """One instant query -> {label value: number or None (NaN/Inf)}."""
        try:
            result = self.client.custom_query(
                query, params={"time": f"{ts_s:.3f}"}, timeout=self.timeout_s
            )
        except requests.RequestException as err:
            raise SourceError(f"prometheus {self.url}: unreachable for {column}: {err}") from err
        except PrometheusApiClientException as err:
            sample.missing.append(f"{column}: {err}")
            return {}
        answers: dict[str, float | None] = {}
        for series in result:
            key = series["metric"].get(label, "") if label else ""
            if label and not key:
                continue
            answers[key] = _number(series["value"][1])
        return answers


def _number(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None
