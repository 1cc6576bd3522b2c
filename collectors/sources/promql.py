"""PromQL's `rate` and `histogram_quantile`, computed the way Prometheus 2.x computes them.

Used by the direct scraper, so that values read without a Prometheus server mean the same as
the PromQL queries of `conf/source/queries/`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def extrapolated_rate(
    samples: Sequence[tuple[float, float]], range_start_s: float, range_end_s: float
) -> float | None:
    """`rate(counter[range])` over `samples` [(ts_s, value)] sorted by time, or None.

    As Prometheus does: the increase between the first and last sample, with every decrease
    taken as a counter reset (the value before the reset is added back), extrapolated towards
    the range boundaries by at most half a sample interval unless the gap to the boundary is
    under 1.1 average intervals, never extrapolated below zero at the start, then divided by
    the range. Fewer than two samples gives None (PromQL returns no series).
    """
    if len(samples) < 2:
        return None
    first_ts, first_v = samples[0]
    last_ts, last_v = samples[-1]
    increase = last_v - first_v
    previous = samples[0][1]
    for _, value in samples[1:]:
        if value < previous:
            increase += previous
        previous = value

    sampled_s = last_ts - first_ts
    if sampled_s <= 0:
        return None
    to_start_s = first_ts - range_start_s
    to_end_s = range_end_s - last_ts
    average_gap_s = sampled_s / (len(samples) - 1)
    if increase > 0 and first_v >= 0:
        to_zero_s = sampled_s * (first_v / increase)
        to_start_s = min(to_start_s, to_zero_s)

    threshold_s = average_gap_s * 1.1
    extrapolate_s = sampled_s
    extrapolate_s += to_start_s if to_start_s < threshold_s else average_gap_s / 2
    extrapolate_s += to_end_s if to_end_s < threshold_s else average_gap_s / 2
    return increase * (extrapolate_s / sampled_s) / (range_end_s - range_start_s)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """`histogram_quantile(q, ...)` over cumulative `buckets` [(upper_bound, count)].

    Follows Prometheus: NaN without a +Inf bucket, with fewer than two buckets or with no
    observations; buckets of equal bound are merged and counts forced monotonic; linear
    interpolation inside the bucket holding the rank, the lowest bucket starting at 0 (when its
    bound is positive); a rank in the +Inf bucket answers the highest finite bound.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or not math.isinf(ordered[-1][0]):
        return math.nan
    merged = _coalesce(ordered)
    if len(merged) < 2:
        return math.nan
    observations = merged[-1][1]
    if observations == 0 or math.isnan(observations):
        return math.nan

    rank = q * observations
    b = next(i for i, (_, count) in enumerate(merged) if count >= rank or i == len(merged) - 1)
    if b == len(merged) - 1:
        return merged[-2][0]
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0]
    start, end, count = 0.0, merged[b][0], merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    return start + (end - start) * (rank / count)


def _coalesce(ordered: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge buckets of equal bound (summing counts) and make counts non-decreasing."""
    merged: list[tuple[float, float]] = []
    for bound, count in ordered:
        if merged and merged[-1][0] == bound:
            merged[-1] = (bound, merged[-1][1] + count)
        else:
            merged.append((bound, count))
    running = -math.inf
    for i, (bound, count) in enumerate(merged):
        running = max(running, count)
        merged[i] = (bound, running)
    return merged
