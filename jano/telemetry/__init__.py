"""
What only the router can see: counters, rings, rolling windows and health.

:class:`Telemetry` is fed by paths that already run (the tee reports a finished
request, the swapper a finished swap, the web layer a rejection) and never runs
a timer of its own.  Everything that describes *now* (queue depth, residency,
health) is read when somebody asks: ``/status`` calls the scheduler's snapshot,
and a Prometheus scrape does the same through a custom collector.

:class:`HealthMonitor` polls each resident model's health URL on a timer and
keeps the last answer.

Conventions kept throughout:

- ``None`` (JSON ``null``) means "not observed"; it is never replaced by 0 in
  ``/status`` or ``/usage``.
- Prometheus ``model`` label values come only from configured model names; a
  model nobody configured is counted under ``model=""``, so a client cannot
  grow the label set by inventing names.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections import deque
from datetime import datetime, timezone
from typing import Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.records import (
    HealthState,
    ModelSpec,
    SchedulerSnapshot,
    SwapEvent,
    UsageRecord,
)

__all__ = [
    "DISCONNECT_PHASES",
    "HealthMonitor",
    "REJECTION_REASONS",
    "SWAP_RESULTS",
    "Telemetry",
    "wants_openmetrics",
]

#: Label values of ``jano_queue_rejections_total{reason}``; anything else is "other".
REJECTION_REASONS: tuple[str, ...] = (
    "queue_full",
    "model_down",
    "draining",
    "unknown_model",
    "bad_request",
    "too_large",
    "unauthorized",
    "other",
)
#: Label values of ``jano_client_disconnects_total{phase}``; anything else is "other".
DISCONNECT_PHASES: tuple[str, ...] = ("queued", "waiting_headers", "streaming", "other")
#: Swaps listed in ``/status`` ``recentSwaps``.
RECENT_SWAPS = 50


def _swap_entry(event: SwapEvent) -> dict[str, object]:
    return {
        "group": event.group,
        "from": event.from_model,
        "to": event.to_model,
        "result": event.result,
        "error": event.error,
        "durationMs": _ms(event.duration),
        "startedAt": _iso(event.started_at),
        "at": _iso(event.started_at + event.duration),
    }


#: Label values of ``jano_model_swaps_total{result}``; anything else is "other".
SWAP_RESULTS: tuple[str, ...] = ("ok", "failed", "timeout", "not_ready")

#: A whole request: from sub-second embeddings to minutes of generation.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: First byte: prompt processing dominates; a long prompt on a slow GPU takes minutes.
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Queue wait: near zero when the model is resident, a swap's length when it is not.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Swaps: half a second (a warm small model) to five minutes (a cold large one).
SWAP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

#: Rolling windows are bounded: past this many entries the oldest are dropped
#: early, so a burst shortens the window instead of growing memory.
_WINDOW_MAX = 10_000
_SWAPS_WINDOW = 3600.0

_UNCONFIGURED = ""


def _iso(t: Optional[float]) -> Optional[str]:
    """ISO 8601 UTC with milliseconds and a ``Z``, or ``None``."""
    if t is None:
        return None
    stamp = datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _ms(seconds: Optional[float]) -> Optional[float]:
    """Seconds to milliseconds, rounded to the microsecond, or ``None``."""
    if seconds is None:
        return None
    return round(seconds * 1000.0, 3)


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


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


class _Count:
    """A counter the request path bumps with one addition (no lock, no label lookup)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Buckets:
    """
    A histogram the request path fills with one ``bisect`` and two additions;
    :meth:`Telemetry._collect` turns it into Prometheus' cumulative buckets.
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


class _ModelSeries:
    """
    One model's per-request series.  Jano's reactor is single-threaded, so
    these are plain numbers, exported at scrape time (prometheus_client's own
    metric objects lock and look up on every update, a tenth of Jano's CPU per
    request).
    """

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
        self.codes: dict[str, _Count] = {}
        self.duration = _Buckets(DURATION_BUCKETS)
        self.ttfb = _Buckets(TTFB_BUCKETS)
        self.queue_wait = _Buckets(QUEUE_WAIT_BUCKETS)
        self.prompt_tokens = _Count()
        self.generation_tokens = _Count()
        self.timed_tokens = _Count()
        self.generation_seconds = _Count()
        self.without_usage = _Count()


#: (metric name, help, _ModelSeries attribute) of the per-model counters.
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


class _ScrapeCollector:
    """Reads the scheduler and health at scrape time; no timer updates gauges."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterable[Metric]:
        return self._telemetry._collect()


class Telemetry:
    """
    Jano's observations, and the ``/status``, ``/usage`` and ``/metrics`` views.

    Recording methods are called on the request path: each does O(1)
    amortised work and allocates nothing beyond what the caller hands in
    (plus one small tuple for a backend-timed generation).

    :param clock: the source of ``seconds()`` for every timestamp.
    :param models: the configured models; they alone may be label values.
    :param version: reported as ``version`` and ``jano_build_info``.
    :param snapshot: the scheduler's state right now.
    :param health: each model's last health state right now.
    :param usage_ring: how many finished requests ``/usage`` remembers.
    :param window: seconds covered by ``recentGenTokS``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        models: Sequence[ModelSpec],
        *,
        version: str,
        snapshot: Callable[[], SchedulerSnapshot],
        health: Callable[[], Mapping[str, HealthState]],
        usage_ring: int = 1000,
        window: float = 60.0,
    ) -> None:
        if usage_ring < 1:
            raise ValueError(f"usage_ring must be at least 1, not {usage_ring!r}")
        if window <= 0:
            raise ValueError(f"window must be positive, not {window!r}")
        self._clock = clock
        self._version = version
        self._snapshot = snapshot
        self._health = health
        self._window = window
        self._started_at = clock.seconds()
        self._ids = itertools.count(1)

        self._ring: deque[UsageRecord] = deque(maxlen=usage_ring)
        # (finished at, label model, completion tokens, backend generation seconds)
        self._generation: deque[tuple[float, str, int, float]] = deque(maxlen=_WINDOW_MAX)
        # (started at, group) of finished swap attempts
        self._swap_starts: deque[tuple[float, str]] = deque(maxlen=_WINDOW_MAX)
        self._last_swap: Optional[SwapEvent] = None
        #: The dashboard's swap timeline: the newest swaps, newest last.
        self._recent_swaps: deque[SwapEvent] = deque(maxlen=RECENT_SWAPS)

        self._requests_total = 0
        self._served_total = 0
        self._without_usage_total = 0
        self._completion_tokens_total = 0
        self._prompt_tokens_total = 0

        self._registry = CollectorRegistry()
        registry = self._registry
        self._swaps = Counter(
            "jano_model_swaps_total",
            "Swap attempts that ended, by target model and result.",
            ["to_model", "result"],
            registry=registry,
        )
        self._swap_duration = Histogram(
            "jano_model_swap_duration_seconds",
            "Duration of swap attempts, by target model and result.",
            ["to_model", "result"],
            buckets=SWAP_BUCKETS,
            registry=registry,
        )
        self._disconnects = Counter(
            "jano_client_disconnects_total",
            "Clients that went away, by the phase their request was in.",
            ["model", "phase"],
            registry=registry,
        )
        self._rejections = Counter(
            "jano_queue_rejections_total",
            "Requests Jano answered itself with an error, by reason.",
            ["reason"],
            registry=registry,
        )
        # Fixed label sets resolved once, so recording never formats a label.
        self._rejection_children: dict[str, Counter] = {
            reason: self._rejections.labels(reason) for reason in REJECTION_REASONS
        }

        self._series: dict[str, _ModelSeries] = {}
        self._disconnect_children: dict[str, dict[str, Counter]] = {}
        self._models: tuple[ModelSpec, ...] = ()
        self._names: frozenset[str] = frozenset()
        self.set_models(models)
        registry.register(_ScrapeCollector(self))

    # -- configuration -----------------------------------------------------

    def set_models(self, models: Sequence[ModelSpec]) -> None:
        """
        Adopt a new model list (config reload).

        New models get their series at once.  Series of removed models stay
        (counters keep their totals and stop moving); from now on a record
        naming a removed model counts under ``model=""``.
        """
        self._models = tuple(models)
        self._names = frozenset(m.name for m in self._models)
        for spec in self._models:
            self._series_for(spec.name)
            self._disconnects_for(spec.name)
            if not spec.always_on:
                for result in SWAP_RESULTS:
                    self._swaps.labels(spec.name, result)
                    self._swap_duration.labels(spec.name, result)

    def _label(self, model: Optional[str]) -> str:
        return model if model is not None and model in self._names else _UNCONFIGURED

    def _series_for(self, label: str) -> _ModelSeries:
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = _ModelSeries()
        return series

    def _disconnects_for(self, label: str) -> dict[str, Counter]:
        children = self._disconnect_children.get(label)
        if children is None:
            children = self._disconnect_children[label] = {
                phase: self._disconnects.labels(label, phase) for phase in DISCONNECT_PHASES
            }
        return children

    # -- recording ---------------------------------------------------------

    def next_request_id(self) -> int:
        """A new id for a request, unique for this process (1, 2, 3...)."""
        return next(self._ids)

    def request_finished(self, record: UsageRecord) -> None:
        """
        Count one finished request (whatever its outcome) and keep it for ``/usage``.

        Token counts enter the totals only when the backend reported them.
        Completion tokens enter the tokens-per-second figures only when the
        backend also reported a positive generation time
        (``usage.timed_by == "backend"``): Jano's own stream timing includes
        network and client delays and would make the ratio dishonest.
        """
        self._ring.append(record)
        label = self._label(record.model)
        series = self._series_for(label)

        code = "0" if record.status is None else str(record.status)
        count = series.codes.get(code)
        if count is None:
            count = series.codes[code] = _Count()
        count.value += 1
        self._requests_total += 1
        if record.outcome == "completed":
            self._served_total += 1

        if record.duration is not None:
            series.duration.observe(record.duration)
        if record.ttfb is not None:
            series.ttfb.observe(record.ttfb)
        if record.queue_wait is not None:
            series.queue_wait.observe(record.queue_wait)

        usage = record.usage
        if usage is None:
            if record.outcome == "completed":
                self._without_usage_total += 1
                series.without_usage.inc()
            return
        prompt = usage.prompt_tokens
        if prompt is not None and prompt >= 0:
            self._prompt_tokens_total += prompt
            series.prompt_tokens.inc(prompt)
        tokens = usage.completion_tokens
        if tokens is None or tokens < 0:
            return
        self._completion_tokens_total += tokens
        series.generation_tokens.inc(tokens)
        generation_ms = usage.generation_ms
        if usage.timed_by == "backend" and generation_ms is not None and generation_ms > 0:
            seconds = generation_ms / 1000.0
            series.timed_tokens.inc(tokens)
            series.generation_seconds.inc(seconds)
            now = self._clock.seconds()
            self._expire_generation(now)
            self._generation.append((now, label, tokens, seconds))

    def swap_finished(self, event: SwapEvent) -> None:
        """Count one ended swap attempt, whatever its result."""
        label = self._label(event.to_model)
        result = event.result if event.result in SWAP_RESULTS else "other"
        self._swaps.labels(label, result).inc()
        if event.duration >= 0:
            self._swap_duration.labels(label, result).observe(event.duration)
        self._last_swap = event
        self._recent_swaps.append(event)
        self._expire_swaps(self._clock.seconds())
        self._swap_starts.append((event.started_at, event.group))

    def queue_rejected(self, reason: str) -> None:
        """Count a request Jano refused itself; unknown reasons count as "other"."""
        child = self._rejection_children.get(reason)
        if child is None:
            child = self._rejection_children["other"]
        child.inc()

    def client_disconnected(self, model: Optional[str], phase: str) -> None:
        """
        Count a client that went away.

        :param phase: ``"queued"``, ``"waiting_headers"`` or ``"streaming"``;
            anything else counts as ``"other"``.
        """
        children = self._disconnects_for(self._label(model))
        child = children.get(phase)
        if child is None:
            child = children["other"]
        child.inc()

    # -- rolling windows ---------------------------------------------------

    def _expire_generation(self, now: float) -> None:
        cutoff = now - self._window
        window = self._generation
        while window and window[0][0] <= cutoff:
            window.popleft()

    def _expire_swaps(self, now: float) -> None:
        # Events arrive when swaps *end*, so start times are only roughly
        # ordered: this drops the expired head and readers filter the rest.
        cutoff = now - _SWAPS_WINDOW
        starts = self._swap_starts
        while starts and starts[0][0] <= cutoff:
            starts.popleft()

    def _recent_gen_tok_s(self, now: float) -> tuple[Optional[float], dict[str, float]]:
        self._expire_generation(now)
        tokens = 0
        seconds = 0.0
        per_model: dict[str, list[float]] = {}
        for _, label, n, s in self._generation:
            tokens += n
            seconds += s
            if label != _UNCONFIGURED:
                sums = per_model.setdefault(label, [0.0, 0.0])
                sums[0] += n
                sums[1] += s
        overall = round(tokens / seconds, 3) if seconds > 0 else None
        by_model = {name: round(n / s, 3) for name, (n, s) in per_model.items() if s > 0}
        return overall, by_model

    def _swaps_last_hour(self, now: float, snap: SchedulerSnapshot) -> int:
        self._expire_swaps(now)
        cutoff = now - _SWAPS_WINDOW
        count = sum(1 for started, _ in self._swap_starts if started > cutoff)
        for group in snap.groups:
            started = group.swap_started_at
            if (
                group.swapping_to is not None
                and started is not None
                and started > cutoff
                and (started, group.name) not in self._swap_starts
            ):
                count += 1
        return count

    # -- views -------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The ``/status`` document: JSON-ready, camelCase, ``null`` when unobserved."""
        now = self._clock.seconds()
        snap = self._snapshot()
        health = self._health()

        groups: dict[str, object] = {}
        for group in snap.groups:
            swap: Optional[dict[str, object]] = None
            if group.swapping_to is not None:
                swap = {"to": group.swapping_to, "since": _iso(group.swap_started_at)}
            groups[group.name] = {
                "resident": group.resident,
                "loadedAt": _iso(group.loaded_at),
                "swapInProgress": swap,
            }
        main = next((g for g in snap.groups if g.name == "default"), None)
        if main is None and snap.groups:
            main = snap.groups[0]

        queue_by_model = {m.name: m.queued for m in snap.models}
        in_flight_by_model = {m.name: m.in_flight for m in snap.models}
        oldest = min(
            (m.oldest_queued_at for m in snap.models if m.oldest_queued_at is not None),
            default=None,
        )
        models_down = {
            m.name: {"until": _iso(m.down_until), "reason": m.down_reason}
            for m in snap.models
            if m.down_until is not None and m.down_until > now
        }

        last = self._last_swap
        last_swap = _swap_entry(last) if last is not None else None
        recent, recent_by_model = self._recent_gen_tok_s(now)

        return {
            "version": self._version,
            "startedAt": _iso(self._started_at),
            "uptimeSeconds": round(max(0.0, now - self._started_at), 3),
            "currentModel": main.resident if main is not None else None,
            "currentModelLoadedAt": _iso(main.loaded_at) if main is not None else None,
            "groups": groups,
            "queueDepth": sum(queue_by_model.values()),
            "queueDepthByModel": queue_by_model,
            "inFlight": sum(in_flight_by_model.values()),
            "inFlightByModel": in_flight_by_model,
            "oldestWaitingMs": _ms(max(0.0, now - oldest)) if oldest is not None else None,
            "lastSwapDurationMs": _ms(last.duration) if last is not None else None,
            "lastSwap": last_swap,
            "recentSwaps": [_swap_entry(e) for e in reversed(self._recent_swaps)],
            "swapsLastHour": self._swaps_last_hour(now, snap),
            "recentGenTokS": recent,
            "recentGenTokSByModel": recent_by_model,
            "recentWindowSeconds": self._window,
            "requestsTotal": self._requests_total,
            "requestsServedTotal": self._served_total,
            "requestsWithoutUsageTotal": self._without_usage_total,
            "tokensGeneratedTotal": self._completion_tokens_total,
            "promptTokensTotal": self._prompt_tokens_total,
            "backendHealth": dict(health),
            "draining": snap.draining,
            "modelsDown": models_down,
        }

    def usage(self, limit: int) -> list[dict[str, object]]:
        """
        The newest ``limit`` finished requests, newest first, JSON-ready.

        Paths lose their query string here: queries can carry user text.
        """
        if limit <= 0:
            return []
        return [_usage_entry(r) for r in itertools.islice(reversed(self._ring), limit)]

    @property
    def registry(self) -> CollectorRegistry:
        """Jano's own registry (never the process-global one)."""
        return self._registry

    def metrics(self, accept: Optional[str]) -> tuple[str, bytes]:
        """
        Render the registry for a scrape.

        :param accept: the request's Accept header, if any.
        :return: ``(content type, body)``: OpenMetrics 1.0 when the scraper
            prefers ``application/openmetrics-text``, else the classic text format.
        """
        if wants_openmetrics(accept):
            body: bytes = openmetrics.generate_latest(self._registry)
            return openmetrics.CONTENT_TYPE_LATEST, body
        return CONTENT_TYPE_LATEST, generate_latest(self._registry)

    def _collect(self) -> Iterable[Metric]:
        now = self._clock.seconds()
        build = InfoMetricFamily("jano_build", "Jano's version.", labels=["version"])
        build.add_metric([self._version], {})
        yield build
        yield GaugeMetricFamily(
            "jano_uptime_seconds",
            "Seconds since Jano's telemetry started.",
            value=max(0.0, now - self._started_at),
        )
        try:
            snap = self._snapshot()
        except Exception:
            self.log.failure("Scheduler snapshot failed during a scrape")
        else:
            yield from self._snapshot_families(snap, now)
        yield from self._series_families()
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
            for spec in self._models:
                up.add_metric([spec.name], 1.0 if health.get(spec.name) == "up" else 0.0)
            yield up

    def _series_families(self) -> Iterable[Metric]:
        series = self._series
        requests = CounterMetricFamily(
            "jano_requests", "Requests finished, by model and HTTP status sent (0: none was sent).",
            labels=["model", "code"])
        for label, one in series.items():
            for code, count in one.codes.items():
                requests.add_metric([label, code], count.value)
        yield requests
        for name, text, attr in _SERIES_COUNTERS:
            family = CounterMetricFamily(name, text, labels=["model"])
            for label, one in series.items():
                family.add_metric([label], getattr(one, attr).value)
            yield family
        for name, text, attr in _SERIES_HISTOGRAMS:
            hist = HistogramMetricFamily(name, text, labels=["model"])
            for label, one in series.items():
                buckets: _Buckets = getattr(one, attr)
                hist.add_metric([label], buckets.cumulative(), sum_value=buckets.sum)
            yield hist

    def _snapshot_families(self, snap: SchedulerSnapshot, now: float) -> Iterable[Metric]:
        depth: dict[str, float] = {name: 0.0 for name in self._configured_names()}
        in_flight = dict(depth)
        loaded = dict(depth)
        down = dict(depth)
        oldest: Optional[float] = None
        for m in snap.models:
            label = self._label(m.name)
            depth[label] = depth.get(label, 0.0) + m.queued
            in_flight[label] = in_flight.get(label, 0.0) + m.in_flight
            if label != _UNCONFIGURED:
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
        yield _labelled("jano_model_down", "1 while the model fails fast after a failed swap.", down)

    def _configured_names(self) -> list[str]:
        return [spec.name for spec in self._models]


def _labelled(name: str, documentation: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["model"])
    for model, value in values.items():
        family.add_metric([model], value)
    return family


def _usage_entry(record: UsageRecord) -> dict[str, object]:
    usage = record.usage
    path = record.path.split("?", 1)[0].split("#", 1)[0]
    entry: dict[str, object] = {
        "id": record.id,
        "model": record.model,
        "method": record.method,
        "path": path,
        "status": record.status,
        "stream": record.stream,
        "arrivedAt": _iso(record.arrived_at),
        "queueWaitMs": _ms(record.queue_wait),
        "waitedForSwap": record.waited_for_swap,
        "ttfbMs": _ms(record.ttfb),
        "durationMs": _ms(record.duration),
        "promptTokens": None,
        "cachedTokens": None,
        "completionTokens": None,
        "genTokS": None,
        "genTokSSource": None,
        "promptTokS": None,
        "usageSource": None,
        "outcome": record.outcome,
    }
    if usage is not None:
        entry["promptTokens"] = usage.prompt_tokens
        entry["cachedTokens"] = usage.cached_tokens
        entry["completionTokens"] = usage.completion_tokens
        entry["genTokS"] = _round(usage.gen_tok_s)
        entry["genTokSSource"] = usage.timed_by if usage.gen_tok_s is not None else None
        entry["promptTokS"] = _round(usage.prompt_tok_s)
        entry["usageSource"] = usage.source
    return entry


def _state_for(code: int) -> HealthState:
    if code == 200:
        return "up"
    if code == 503:
        return "loading"
    return "down"


class HealthMonitor(Service):
    """
    Polls each resident model's health URL every ``interval`` seconds.

    A model that is not its group's resident is ``"unloaded"`` and is not
    probed: its server is not supposed to be running.  A resident model is
    ``"up"`` on 200, ``"loading"`` on 503 (llama-server while it loads),
    ``"down"`` on any other status, failure or timeout, and ``"unknown"``
    until its first answer.  At most one probe per model is in flight; a
    probe still running at the next tick is left alone.

    :param probe: GETs a URL and fires with the HTTP status code.
    :param is_resident: whether a model currently holds its group's slot.
    :param timeout: seconds before a probe is cancelled and the model
        counted ``"down"``; two intervals by default.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        models: Sequence[ModelSpec],
        probe: Callable[[str], Deferred[int]],
        *,
        interval: float = 5.0,
        is_resident: Callable[[ModelSpec], bool],
        timeout: Optional[float] = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._clock = clock
        self._probe = probe
        self._interval = interval
        self._timeout = 2.0 * interval if timeout is None else timeout
        self._is_resident = is_resident
        self._specs: dict[str, ModelSpec] = {}
        self._states: dict[str, HealthState] = {}
        self._in_flight: dict[str, Deferred[int]] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self.set_models(models)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.log.failure("Health loop stopped", f)
        )

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        pending, self._in_flight = self._in_flight, {}
        for d in pending.values():
            d.cancel()
        super().stopService()

    def states(self) -> dict[str, HealthState]:
        """
        Each configured model's last known state, in configuration order,
        reconciled with residency now: a model swapped out since the last
        probe reads ``unloaded``, one swapped in reads ``unknown`` until probed.
        """
        out: dict[str, HealthState] = {}
        for name, state in self._states.items():
            spec = self._specs.get(name)
            try:
                resident = spec is None or self._is_resident(spec)
            except Exception:  # a broken residency check must not break /status
                resident = state != "unloaded"
            if not resident:
                state = "unloaded"
            elif state == "unloaded":
                state = "unknown"
            out[name] = state
        return out

    def observed(self, name: str, state: HealthState) -> None:
        """Record a state learnt elsewhere (a swap that ended with health 200 means ``up``)."""
        if name in self._specs:
            self._set(name, state)

    def set_models(self, models: Sequence[ModelSpec]) -> None:
        """
        Adopt a new model list.  Unchanged models keep their state; new or
        changed ones start ``"unknown"``; probes of changed or removed ones
        are cancelled and their answers ignored.
        """
        new = {spec.name: spec for spec in models}
        for name in list(self._in_flight):
            if new.get(name) != self._specs.get(name):
                self._in_flight.pop(name).cancel()
        self._states = {
            name: self._states.get(name, "unknown") if self._specs.get(name) == spec else "unknown"
            for name, spec in new.items()
        }
        self._specs = new

    def _tick(self) -> None:
        for spec in list(self._specs.values()):
            try:
                self._check(spec)
            except Exception:
                self.log.failure("Health check of {model} failed", model=spec.name)

    def _check(self, spec: ModelSpec) -> None:
        name = spec.name
        if not self._is_resident(spec):
            stale = self._in_flight.pop(name, None)
            if stale is not None:
                stale.cancel()
            self._set(name, "unloaded")
            return
        if name in self._in_flight:
            return
        try:
            d = self._probe(spec.health_url)
        except Exception:
            self.log.failure("Health probe of {model} raised", model=name)
            self._set(name, "down")
            return
        self._in_flight[name] = d
        d.addTimeout(self._timeout, self._clock)
        d.addBoth(self._answered, spec, d)

    def _answered(self, result: int | Failure, spec: ModelSpec, d: Deferred[int]) -> None:
        if self._in_flight.get(spec.name) is not d:
            return None  # cancelled, or the model changed since: not about now
        del self._in_flight[spec.name]
        if isinstance(result, Failure):
            self.log.debug(
                "Health probe of {model} failed: {error}",
                model=spec.name,
                error=result.getErrorMessage(),
            )
            self._set(spec.name, "down")
        else:
            self._set(spec.name, _state_for(result))
        return None

    def _set(self, name: str, state: HealthState) -> None:
        old = self._states.get(name)
        if old != state and name in self._specs:
            self._states[name] = state
            self.log.info("Backend {model} health: {old} -> {new}", model=name, old=old, new=state)
