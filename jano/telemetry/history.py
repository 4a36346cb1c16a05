"""
The server-side time series behind the dashboard's charts: every
``interval`` seconds one sample (tokens/s, requests and swaps in the
interval, queue depth, requests in flight) goes to the usage store, so a
page opened now, or after a restart, shows the last hour or day at once.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["HistorySampler", "SAMPLE_INTERVAL"]

#: Seconds between samples.
SAMPLE_INTERVAL = 10.0


class SampleSink(Protocol):
    def add_sample(self, at: float, values: Mapping[str, Optional[float]]) -> None: ...


class HistorySampler(Service):
    """
    :param sample: the figures now (``Telemetry.sample``): ``tok_s``,
        ``queue_depth``, ``in_flight`` and the running totals
        ``requests_total`` and ``swaps_total``.
    :param sink: where samples go (the usage store).
    """

    def __init__(self, clock: IReactorTime, sample: Callable[[], Mapping[str, Optional[float]]],
                 sink: SampleSink, interval: float = SAMPLE_INTERVAL) -> None:
        self._clock = clock
        self._sample = sample
        self._sink = sink
        self.interval = interval
        self._last: Optional[Mapping[str, Optional[float]]] = None
        self._loop = LoopingCall(self.take)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._last = self._sample()  # the baseline of the first interval's counts
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
            self.take()  # what happened since the last sample is not lost at a restart

    def take(self) -> None:
        now = self._sample()
        last, self._last = self._last, now

        def increase(key: str) -> Optional[float]:
            a = last.get(key) if last is not None else None
            b = now.get(key)
            return None if a is None or b is None else max(0.0, b - a)

        self._sink.add_sample(self._clock.seconds(), {
            "tok_s": now.get("tok_s"),
            "requests": increase("requests_total"),
            "queue_depth": now.get("queue_depth"),
            "in_flight": now.get("in_flight"),
            "swaps": increase("swaps_total"),
        })
