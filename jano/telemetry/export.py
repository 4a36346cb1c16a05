"""
The Prometheus export, on Jano's own ``CollectorRegistry`` (never the global one).

Everything that describes *now* (queue depth, residency, health) and the
recorder's plain-number series are read at scrape time by
:class:`ScrapeCollector`; no timer updates a gauge.  :func:`render` answers a
scrape in the format the scraper prefers.

The ``model`` label is always a name clients use: a model served by replicas
counts once, its replicas added up.  Each replica has its own
``jano_replica_*`` gauges, labelled ``model`` and ``replica`` (the part of its
name after ``@``: its group, or its place in ``upstreams``); both come from
the configuration only, so the label set stays bounded.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from jano.records import HealthState, SchedulerSnapshot
from jano.telemetry.recorder import UNCONFIGURED, Recorder
from jano.telemetry.series import Buckets

__all__ = ["ScrapeCollector", "render", "wants_openmetrics"]

#: (metric name, help, ModelSeries attribute) of the per-model counters.
_SERIES_COUNTERS = (
    ("jano_prompt_tokens", "Prompt tokens as reported by backends.", "prompt_tokens"),
    ("jano_generation_tokens", "Completion tokens as reported by backends, timed or not.",
     "generation_tokens"),
    ("jano_generation_timed_tokens",
     "Completion tokens of responses whose generation time the backend reported; "
     "pair with jano_generation_seconds_total for tokens per second.", "timed_tokens"),
    ("jano_generation_seconds",
     "Generation time reported by backends (never Jano's own timing).", "generation_seconds"),
    ("jano_requests_without_usage",
     "Completed requests whose response carried no usage Jano could read.", "without_usage"),
)
_SERIES_HISTOGRAMS = (
    ("jano_request_duration_seconds", "Arrival to last byte (or to the end of the attempt).",
     "duration"),
    ("jano_time_to_first_byte_seconds", "Arrival to the first response byte sent to the client.",
     "ttfb"),
    ("jano_queue_wait_seconds", "Time spent queued in Jano, swaps included.", "queue_wait"),
)


def _media_q(accept: str, media_type: str) -> float:
    """
    The highest ``q`` the Accept header gives ``media_type`` (0 when absent).

    Parameters other than ``q`` (``version``, ``escaping``) are ignored.
    """
    best = 0.0
    for part in accept.split(","):
        fields = part.split(";")
        if fields[0].strip().lower() != media_type:
            continue
        q = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        best = max(best, q)
    return best


def wants_openmetrics(accept: Optional[str]) -> bool:
    """
    Whether a scraper's Accept header prefers OpenMetrics to the classic text.

    :param accept: the raw header, or ``None`` when absent.
    :return: true when ``application/openmetrics-text`` is acceptable (q > 0)
        and not ranked below ``text/plain``.
    """
    if not accept:
        return False
    q_open = _media_q(accept, "application/openmetrics-text")
    return q_open > 0.0 and q_open >= _media_q(accept, "text/plain")


def render(registry: CollectorRegistry, accept: Optional[str]) -> tuple[str, bytes]:
    """
    Render `registry` for a scrape.

    :param accept: the request's Accept header, if any.
    :return: ``(content type, body)``: OpenMetrics 1.0 when the scraper
        prefers ``application/openmetrics-text``, else the classic text format.
    """
    if wants_openmetrics(accept):
        body: bytes = openmetrics.generate_latest(registry)
        return openmetrics.CONTENT_TYPE_LATEST, body
    return CONTENT_TYPE_LATEST, generate_latest(registry)


class ScrapeCollector:
    """
    Reads the recorder, the scheduler and health at scrape time.

    A failing snapshot or health read is logged and leaves its families out;
    the rest of the scrape still answers.

    :param recorder: the per-model series and the configured models.
    :param clock: the source of ``seconds()`` for ages and uptime.
    :param version: reported as ``jano_build_info``.
    :param snapshot: the scheduler's state right now.
    :param health: each model's last health state right now.
    """

    log = Logger()

    def __init__(
        self,
        recorder: Recorder,
        clock: IReactorTime,
        *,
        version: str,
        snapshot: Callable[[], SchedulerSnapshot],
        health: Callable[[], Mapping[str, HealthState]],
        limits: Callable[[], tuple[float, float]] = lambda: (math.inf, math.inf),
        dropped: Callable[[], int] = lambda: 0,
    ) -> None:
        self._dropped = dropped
        self._recorder = recorder
        self._clock = clock
        self._version = version
        self._snapshot = snapshot
        self._health = health
        self._limits = limits

    def collect(self) -> Iterable[Metric]:
        now = self._clock.seconds()
        build = InfoMetricFamily("jano_build", "Jano's version.", labels=["version"])
        build.add_metric([self._version], {})
        yield build
        yield GaugeMetricFamily(
            "jano_uptime_seconds",
            "Seconds since Jano's telemetry started.",
            value=max(0.0, now - self._recorder.started_at),
        )
        snap: Optional[SchedulerSnapshot] = None
        try:
            snap = self._snapshot()
        except Exception:
            self.log.failure("Scheduler snapshot failed during a scrape")
        else:
            yield from self._snapshot_families(snap, now)
        yield from self._series_families()
        yield CounterMetricFamily(
            "jano_usage_records_dropped", "Usage records that could not be written to the "
            "durable store (disk full, file locked, queue over its bound).", value=self._dropped())
        try:
            health = self._health()
        except Exception:
            self.log.failure("Health states unavailable during a scrape")
        else:
            up = GaugeMetricFamily(
                "jano_backend_up",
                "1 when the model's last health probe answered 200, else 0 "
                "(down, loading, unloaded, or not probed yet).",
                labels=["model"],
            )
            stalled = GaugeMetricFamily(
                "jano_model_stalled",
                "1 while the model's last requests stalled or got no headers: its requests "
                "fail fast until the cooldown ends.", labels=["model"])
            for spec in self._recorder.models:
                up.add_metric([spec.name], 1.0 if health.get(spec.name) == "up" else 0.0)
                stalled.add_metric([spec.name], 1.0 if health.get(spec.name) == "stalled" else 0.0)
            yield up
            yield stalled
            if snap is not None and snap.replicas:
                yield from self._replica_families(snap, health, now)

    def _replica_families(self, snap: SchedulerSnapshot, health: Mapping[str, HealthState],
                          now: float) -> Iterable[Metric]:
        label = self._recorder.label
        families = {
            "in_flight": GaugeMetricFamily(
                "jano_replica_in_flight", "Requests forwarded to the replica and not yet "
                "finished.", labels=["model", "replica"]),
            "queued": GaugeMetricFamily(
                "jano_replica_queued", "Requests waiting for the replica.",
                labels=["model", "replica"]),
            "resident": GaugeMetricFamily(
                "jano_replica_resident", "1 while the model is loaded on the replica.",
                labels=["model", "replica"]),
            "up": GaugeMetricFamily(
                "jano_replica_up", "1 when the replica's last health probe answered 200.",
                labels=["model", "replica"]),
            "down": GaugeMetricFamily(
                "jano_replica_down", "1 while requests are not sent to the replica (a failed "
                "swap, a crash, a stall, an unreachable server).", labels=["model", "replica"]),
        }
        for r in snap.replicas:
            model = label(r.serves)
            if model == UNCONFIGURED:
                continue  # a replica of a model removed by a reload, with requests in flight
            labels = [model, r.name[len(r.serves or "") + 1:] or r.name]
            down = r.down_until is not None and r.down_until > now
            families["in_flight"].add_metric(labels, float(r.in_flight))
            families["queued"].add_metric(labels, float(r.queued))
            families["resident"].add_metric(labels, 1.0 if r.resident else 0.0)
            families["up"].add_metric(labels, 1.0 if health.get(r.name) == "up" else 0.0)
            families["down"].add_metric(labels, 1.0 if down else 0.0)
        yield from families.values()

    def _series_families(self) -> Iterable[Metric]:
        series = self._recorder.series
        requests = CounterMetricFamily(
            "jano_requests", "Requests finished, by model, HTTP status sent (0: none was sent) "
            "and caller (the named API key; \"\" for none).",
            labels=["model", "code", "caller"])
        for label, one in series.items():
            for (code, caller), count in one.codes.items():
                requests.add_metric([label, code, caller], count.value)
        yield requests
        for name, text, attr in _SERIES_COUNTERS:
            family = CounterMetricFamily(name, text, labels=["model"])
            for label, one in series.items():
                family.add_metric([label], getattr(one, attr).value)
            yield family
        for name, text, attr in _SERIES_HISTOGRAMS:
            hist = HistogramMetricFamily(name, text, labels=["model"])
            for label, one in series.items():
                buckets: Buckets = getattr(one, attr)
                hist.add_metric([label], buckets.cumulative(), sum_value=buckets.sum)
            yield hist

    def _snapshot_families(self, snap: SchedulerSnapshot, now: float) -> Iterable[Metric]:
        recorder = self._recorder
        depth: dict[str, float] = {spec.name: 0.0 for spec in recorder.models}
        in_flight = dict(depth)
        loaded = dict(depth)
        down = dict(depth)
        oldest: Optional[float] = None
        for m in snap.models:
            label = recorder.label(m.name)
            depth[label] = depth.get(label, 0.0) + m.queued
            in_flight[label] = in_flight.get(label, 0.0) + m.in_flight
            if label != UNCONFIGURED:
                loaded[label] = 1.0 if m.resident else 0.0
                down[label] = 1.0 if m.down_until is not None and m.down_until > now else 0.0
            if m.oldest_queued_at is not None and (oldest is None or m.oldest_queued_at < oldest):
                oldest = m.oldest_queued_at

        yield _labelled("jano_queue_depth", "Requests waiting in Jano's queues.", depth)
        yield _labelled("jano_requests_in_flight", "Requests forwarded and not yet finished.", in_flight)
        yield GaugeMetricFamily(
            "jano_queue_oldest_age_seconds",
            "Age of the oldest queued request; 0 when nothing waits.",
            value=max(0.0, now - oldest) if oldest is not None else 0.0,
        )
        yield _labelled("jano_model_loaded", "1 while the model is its group's resident.", loaded)
        yield _labelled("jano_model_down", "1 while the model fails fast after a failed swap "
                        "or while it is stalled.", down)
        budgets = [g for g in snap.groups if g.memory_budget is not None]
        if budgets:  # label values: the configured groups with a budget only
            yield _labelled("jano_group_memory_budget_mib", "A group's memory budget, MiB, as "
                            "configured (groups.<name>.memory); never a measurement.",
                            {g.name: float(g.memory_budget or 0) for g in budgets}, "group")
            yield _labelled("jano_group_memory_used_mib", "The configured memory (models[].memory) "
                            "of the group's residents, MiB; never a measurement.",
                            {g.name: float(g.memory_used or 0) for g in budgets}, "group")
        max_wait, stuck_after = self._limits()
        if math.isfinite(max_wait):
            yield GaugeMetricFamily("jano_scheduler_max_wait_seconds",
                                    "The configured max_wait (the starvation guard).",
                                    value=max_wait)
        yield GaugeMetricFamily(
            "jano_scheduler_stuck",
            "1 when requests wait and nothing was dispatched for longer than max_wait plus the "
            "swap and ready timeouts: should never be 1.",
            value=1.0 if scheduler_stuck(snap, now, stuck_after) else 0.0)


def scheduler_stuck(snap: SchedulerSnapshot, now: float, stuck_after: float) -> bool:
    """
    Whether requests wait and nothing has been dispatched for ``stuck_after``
    seconds: longer than any legitimate wait (``max_wait`` plus a swap that
    takes its whole ``swap_timeout`` and ``ready_timeout``).
    """
    oldest = min((m.oldest_queued_at for m in snap.models if m.oldest_queued_at is not None),
                 default=None)
    if oldest is None or now - oldest <= stuck_after:
        return False
    last = snap.last_dispatch_at
    return last is None or now - last > stuck_after


def _labelled(name: str, documentation: str, values: Mapping[str, float],
              label: str = "model") -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
