"""The server's queue time from its Prometheus metrics, for :mod:`chainserve.measure.bench`: the
``*:request_queue_time_seconds`` histogram (``chainserve:`` or ``vllm:``) scraped before and after a
run; the mean is Δsum / Δcount, percentiles are interpolated inside the buckets as Prometheus'
``histogram_quantile`` does (so they are only as fine as the buckets).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chainserve.analysis.records import Stats

QUEUE_METRIC_SUFFIX = ":request_queue_time_seconds"

#: A histogram scrape: cumulative bucket counts by upper bound (``inf`` last), the count and the sum.
Histogram = tuple[tuple[tuple[float, float], ...], float, float]


async def scrape_queue_histogram(http: httpx.AsyncClient) -> Histogram | None:
    """The server's ``*:request_queue_time_seconds`` histogram (summed over label sets), or ``None``."""
    try:
        response = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    return queue_histogram(response.text) if response.status_code == 200 else None


def queue_histogram(metrics_text: str) -> Histogram | None:
    """Parse Prometheus text for the queue-time histogram (``None`` when absent or unparsable).

    >>> name = "vllm:request_queue_time_seconds"
    >>> queue_histogram(f'# TYPE {name} histogram\\n{name}_bucket{{le="1.0"}} 3\\n{name}_bucket{{le="+Inf"}} 4\\n'
    ...                 f'{name}_count 4\\n{name}_sum 2.5\\n')
    (((1.0, 3.0), (inf, 4.0)), 4.0, 2.5)
    """
    buckets: Counter[float] = Counter()
    count = total = 0.0
    found = False
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.type != "histogram" or not family.name.endswith(QUEUE_METRIC_SUFFIX):
                continue
            found = True
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] += float(sample.value)
                elif sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
    except (ValueError, KeyError):
        return None
    return (tuple(sorted(buckets.items())), count, total) if found else None


def queue_time_stats(before: Histogram | None, after: Histogram | None) -> Stats | None:
    """Queue-time stats of the requests observed between two scrapes (``None``: none, or no histogram)."""
    if after is None:
        return None
    old_buckets = dict(before[0]) if before else {}
    count = after[1] - (before[1] if before else 0.0)
    if count <= 0:
        return None
    buckets = [(le, n - old_buckets.get(le, 0.0)) for le, n in after[0]]
    mean = (after[2] - (before[2] if before else 0.0)) / count
    return Stats(mean, *(histogram_quantile(q, buckets) for q in (0.5, 0.95, 0.99)))


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile``: the ``q`` quantile of cumulative ``(upper bound, count)``
    buckets (``inf`` last), linear inside the bucket that holds it; the highest finite bound when it
    falls in the ``+Inf`` bucket.

    >>> histogram_quantile(0.5, [(1.0, 2.0), (2.0, 4.0), (math.inf, 4.0)])
    1.0
    >>> histogram_quantile(0.75, [(1.0, 2.0), (2.0, 4.0), (math.inf, 4.0)])
    1.5
    """
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = upper, cumulative
    return lower
