"""
Per-model request series as plain numbers, exported at scrape time.

Jano's reactor is single-threaded, so a finished request bumps a few floats
and one histogram bucket; prometheus_client's own metric objects lock and look
up labels on every update, a tenth of Jano's CPU per request.
:class:`~jano.telemetry.export.ScrapeCollector` turns these into metric
families when Prometheus asks.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Sequence

from prometheus_client.utils import floatToGoString

__all__ = ["Buckets", "Count", "ModelSeries"]

#: A whole request: from sub-second embeddings to minutes of generation.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: First byte: prompt processing dominates; a long prompt on a slow GPU takes minutes.
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Queue wait: near zero when the model is resident, a swap's length when it is not.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Count:
    """A counter the request path bumps with one addition (no lock, no label lookup)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Buckets:
    """
    A histogram the request path fills with one ``bisect`` and two additions;
    the scrape turns it into Prometheus' cumulative buckets.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            total += n
            out.append((floatToGoString(bound), float(total)))
        return out


class ModelSeries:
    """One model's per-request series: status codes, three histograms, token counters."""

    __slots__ = (
        "codes",
        "duration",
        "ttfb",
        "queue_wait",
        "prompt_tokens",
        "generation_tokens",
        "timed_tokens",
        "generation_seconds",
        "without_usage",
    )

    def __init__(self) -> None:
        #: By (status code, caller label).
        self.codes: dict[tuple[str, str], Count] = {}
        self.duration = Buckets(DURATION_BUCKETS)
        self.ttfb = Buckets(TTFB_BUCKETS)
        self.queue_wait = Buckets(QUEUE_WAIT_BUCKETS)
        self.prompt_tokens = Count()
        self.generation_tokens = Count()
        self.timed_tokens = Count()
        self.generation_seconds = Count()
        self.without_usage = Count()
