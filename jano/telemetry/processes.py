"""
The model servers Jano runs, as metrics: up, crashes, restarts, back-off,
and each swap's phases (stop, start, ready, script).

The statuses come from a callable (the supervisor's table, as ``/status``
shows it under ``processes``), so telemetry imports nothing of the swap
stage.  Label values are configured model names and a fixed phase list only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jano.records import SwapEvent

__all__ = ["PHASES", "ProcessCollector", "PhaseRecorder"]

#: The values of the ``phase`` label.
PHASES = ("stop", "start", "ready", "script")

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
            float("inf"))

Statuses = Callable[[], Mapping[str, Mapping[str, Any]]]


class PhaseRecorder:
    """``jano_model_swap_phase_seconds{model,phase}``: where a swap's time went."""

    def __init__(self, registry: CollectorRegistry, label: Callable[[str], str]) -> None:
        self._label = label
        self._histogram = Histogram(
            "jano_model_swap_phase_seconds",
            "Seconds each phase of a successful swap took, by target model: stop (the old "
            "server exited), start (spawn until it answers at all), ready (until health 200), "
            "script (the swap script ran).",
            ["model", "phase"], registry=registry, buckets=_BUCKETS)

    def swap_finished(self, event: SwapEvent) -> None:
        if event.kind != "swap" or event.result != "ok" or event.to_model is None:
            return
        label = self._label(event.to_model)
        for phase, seconds in event.phases:
            if phase in PHASES and seconds >= 0:
                self._histogram.labels(label, phase).observe(seconds)


class ProcessCollector:
    """Per managed model: ``jano_model_process_up``, crashes, restarts, back-off."""

    def __init__(self, statuses: Statuses) -> None:
        self._statuses = statuses

    def collect(self) -> Iterable[Metric]:
        statuses = self._statuses()
        if not statuses:
            return
        up = GaugeMetricFamily(
            "jano_model_process_up", "1 while the model server Jano runs is up and was ready, "
            "else 0 (stopped, starting, stopping, crashed).", labels=["model"])
        crashes = CounterMetricFamily(
            "jano_model_process_crashes", "Times the model server Jano runs exited on its own "
            "or failed to start.", labels=["model"])
        restarts = CounterMetricFamily(
            "jano_model_process_restarts", "Times the model server Jano runs was started again "
            "after its first start.", labels=["model"])
        backoff = GaugeMetricFamily(
            "jano_model_process_backoff_seconds", "Seconds until the crashed model server may be "
            "started again (0: now).", labels=["model"])
        in_a_row = GaugeMetricFamily(
            "jano_model_process_crashes_in_a_row", "Crashes since the model server last ran "
            "stably; the back-off doubles with each.", labels=["model"])
        for name, status in statuses.items():
            up.add_metric([name], 1.0 if status.get("state") == "running" else 0.0)
            crashes.add_metric([name], float(status.get("crashes", 0)))
            restarts.add_metric([name], float(status.get("restarts", 0)))
            backoff.add_metric([name], float(status.get("retry_in") or 0.0))
            in_a_row.add_metric([name], float(status.get("crashes_in_a_row", 0)))
        yield from (up, crashes, restarts, backoff, in_a_row)
