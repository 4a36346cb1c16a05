"""
What the request path feeds: counters, the ``/usage`` ring and rolling windows.

:class:`Recorder` is told about finished requests, swaps, rejections and
disconnects by paths that already run, and never runs a timer of its own.
:mod:`jano.telemetry.views` and :mod:`jano.telemetry.export` read its state;
only the recorder writes it.

Prometheus ``model`` label values come only from configured model names; a
model nobody configured is counted under ``model=""``, so a client cannot grow
the label set by inventing names.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet.interfaces import IReactorTime

from jano.records import ModelSpec, SchedulerSnapshot, SwapEvent, UsageRecord
from jano.telemetry.series import Count, ModelSeries

__all__ = [
    "DISCONNECT_PHASES",
    "RECENT_SWAPS",
    "REJECTION_REASONS",
    "SWAP_RESULTS",
    "UNCONFIGURED",
    "Recorder",
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
    "caller_queue_full",
    "caller_rate_limited",
    "other",
)
#: Label values of ``jano_client_disconnects_total{phase}``; anything else is "other".
DISCONNECT_PHASES: tuple[str, ...] = ("queued", "waiting_headers", "streaming", "other")
#: Label values of ``jano_model_swaps_total{result}``; anything else is "other".
SWAP_RESULTS: tuple[str, ...] = ("ok", "failed", "timeout", "not_ready")
#: Swaps listed in ``/status`` ``recentSwaps``.
RECENT_SWAPS = 50
#: The ``model`` label of everything about a model nobody configured.
UNCONFIGURED = ""

#: Swaps: half a second (a warm small model) to five minutes (a cold large one).
SWAP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

#: Rolling windows are bounded: past this many entries the oldest are dropped
#: early, so a burst shortens the window instead of growing memory.
_WINDOW_MAX = 10_000
_SWAPS_WINDOW = 3600.0


class Recorder:
    """
    Jano's observations: totals, per-model series, the ``/usage`` ring, the
    swap history and the rolling windows behind ``/status``.

    Recording methods are called on the request path: each does O(1)
    amortised work and allocates nothing beyond what the caller hands in
    (plus one small tuple for a backend-timed generation).  The event
    counters (swaps, rejections, disconnects) are prometheus_client metrics
    on `registry`; the per-request series are plain numbers read at scrape
    time.

    :param clock: the source of ``seconds()`` for every timestamp.
    :param models: the configured models; they alone may be label values.
    :param registry: where the event counters are registered.
    :param usage_ring: how many finished requests ``/usage`` remembers.
    :param window: seconds covered by ``recentGenTokS``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        models: Sequence[ModelSpec],
        registry: CollectorRegistry,
        *,
        usage_ring: int = 1000,
        window: float = 60.0,
        reload_threshold: float = 0.5,
    ) -> None:
        #: Seconds of backend load time on a request that caused no swap that
        #: count as a hidden reload.
        self.reload_threshold = reload_threshold
        if usage_ring < 1:
            raise ValueError(f"usage_ring must be at least 1, not {usage_ring!r}")
        if window <= 0:
            raise ValueError(f"window must be positive, not {window!r}")
        self._clock = clock
        self.window = window
        self.started_at = clock.seconds()
        self._ids = itertools.count(1)

        #: Finished requests, newest last.
        self.ring: deque[UsageRecord] = deque(maxlen=usage_ring)
        # (finished at, label model, completion tokens, backend generation seconds)
        self._generation: deque[tuple[float, str, int, float]] = deque(maxlen=_WINDOW_MAX)
        # (started at, group) of finished swap attempts
        self._swap_starts: deque[tuple[float, str]] = deque(maxlen=_WINDOW_MAX)
        self.last_swap: Optional[SwapEvent] = None
        #: The dashboard's swap timeline: the newest swaps, newest last.
        self.recent_swaps: deque[SwapEvent] = deque(maxlen=RECENT_SWAPS)

        self.requests_total = 0
        self.swaps_total = 0
        self.served_total = 0
        self.without_usage_total = 0
        self.completion_tokens_total = 0
        self.prompt_tokens_total = 0

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
        self._unloads = Counter(
            "jano_model_unloads_total",
            "Unloads that ended (idle TTL or requested), by model, result and reason.",
            ["model", "result", "reason"],
            registry=registry,
        )
        self._reloads = Counter(
            "jano_backend_reloads_total",
            "The backend reloaded the model on its own: a load time reported on a request that "
            "caused no swap in Jano (a hidden reload).",
            ["model"],
            registry=registry,
        )
        self._stalls = Counter(
            "jano_upstream_stalls_total",
            "Requests ended because the upstream sent no body byte for stall_timeout.",
            ["model"],
            registry=registry,
        )
        # (finished at, seconds) of hidden reloads
        self._reload_times: deque[tuple[float, float]] = deque(maxlen=_WINDOW_MAX)
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

        #: Per-model series by label (configured names and ``UNCONFIGURED``).
        self.series: dict[str, ModelSeries] = {}
        self._disconnect_children: dict[str, dict[str, Counter]] = {}
        self.models: tuple[ModelSpec, ...] = ()
        self._names: frozenset[str] = frozenset()
        self.set_models(models)

    # -- configuration -----------------------------------------------------

    def set_models(self, models: Sequence[ModelSpec]) -> None:
        """
        Adopt a new model list (config reload).

        New models get their series at once.  Series of removed models stay
        (counters keep their totals and stop moving); from now on a record
        naming a removed model counts under ``model=""``.
        """
        self.models = tuple(models)
        self._names = frozenset(m.name for m in self.models)
        if not hasattr(self, "callers"):
            #: Configured caller names: the only values of the ``caller`` label.
            self.callers: frozenset[str] = frozenset()
        for spec in self.models:
            self._series_for(spec.name)
            self._disconnects_for(spec.name)
            self._reloads.labels(spec.name)
            self._stalls.labels(spec.name)
            if not spec.always_on:
                for result in SWAP_RESULTS:
                    self._swaps.labels(spec.name, result)
                    self._swap_duration.labels(spec.name, result)

    def label(self, model: Optional[str]) -> str:
        """The ``model`` label for `model`: its name if configured, else ``""``."""
        return model if model is not None and model in self._names else UNCONFIGURED

    def _series_for(self, label: str) -> ModelSeries:
        series = self.series.get(label)
        if series is None:
            series = self.series[label] = ModelSeries()
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
        self.ring.append(record)
        label = self.label(record.model)
        series = self._series_for(label)

        code = "0" if record.status is None else str(record.status)
        caller = record.caller
        key = (code, caller if caller is not None and caller in self.callers else "")
        count = series.codes.get(key)
        if count is None:
            count = series.codes[key] = Count()
        count.value += 1
        self.requests_total += 1
        if record.outcome == "completed":
            self.served_total += 1
        elif record.outcome == "upstream_stalled":
            self._stalls.labels(label).inc()

        if record.duration is not None:
            series.duration.observe(record.duration)
        if record.ttfb is not None:
            series.ttfb.observe(record.ttfb)
        if record.queue_wait is not None:
            series.queue_wait.observe(record.queue_wait)

        usage = record.usage
        if usage is not None and usage.load_ms is not None and not record.waited_for_swap \
                and usage.load_ms >= self.reload_threshold * 1000.0:
            self._hidden_reload(record, label, usage.load_ms / 1000.0)
        if usage is None:
            if record.outcome == "completed":
                self.without_usage_total += 1
                series.without_usage.inc()
            return
        prompt = usage.prompt_tokens
        if prompt is not None and prompt >= 0:
            self.prompt_tokens_total += prompt
            series.prompt_tokens.inc(prompt)
        tokens = usage.completion_tokens
        if tokens is None or tokens < 0:
            return
        self.completion_tokens_total += tokens
        series.generation_tokens.inc(tokens)
        generation_ms = usage.generation_ms
        if usage.timed_by == "backend" and generation_ms is not None and generation_ms > 0:
            seconds = generation_ms / 1000.0
            series.timed_tokens.inc(tokens)
            series.generation_seconds.inc(seconds)
            now = self._clock.seconds()
            self._expire_generation(now)
            self._generation.append((now, label, tokens, seconds))

    def _hidden_reload(self, record: UsageRecord, label: str, seconds: float) -> None:
        """The backend reported loading the model, though Jano swapped nothing for it."""
        now = self._clock.seconds()
        self._reloads.labels(label).inc()
        while self._reload_times and self._reload_times[0][0] <= now - _SWAPS_WINDOW:
            self._reload_times.popleft()
        self._reload_times.append((now, seconds))
        group = next((m.group for m in self.models if m.name == record.model), "")
        started = now - max(record.duration or 0.0, seconds)  # never ending in the future
        self.recent_swaps.append(SwapEvent(group, record.model, record.model, started, seconds,
                                           "ok", kind="reload", reason="backend"))

    def reloads_last_hour(self, now: float) -> tuple[int, float]:
        """Hidden reloads in the last hour: how many, and the seconds they cost."""
        recent = [s for at, s in self._reload_times if at > now - _SWAPS_WINDOW]
        return len(recent), sum(recent)

    def swap_finished(self, event: SwapEvent) -> None:
        """Count one ended swap attempt (or unload), whatever its result."""
        if event.kind == "unload":
            result = event.result if event.result in SWAP_RESULTS else "other"
            self._unloads.labels(self.label(event.from_model), result,
                                 event.reason or "requested").inc()
            self.recent_swaps.append(event)  # on the timeline, not in the swap rate
            return
        label = self.label(event.to_model)
        result = event.result if event.result in SWAP_RESULTS else "other"
        self._swaps.labels(label, result).inc()
        if event.duration >= 0:
            self._swap_duration.labels(label, result).observe(event.duration)
        self.last_swap = event
        self.swaps_total += 1
        self.recent_swaps.append(event)
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
        children = self._disconnects_for(self.label(model))
        child = children.get(phase)
        if child is None:
            child = children["other"]
        child.inc()

    # -- rolling windows ---------------------------------------------------

    def _expire_generation(self, now: float) -> None:
        cutoff = now - self.window
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

    def recent_gen_tok_s(self, now: float) -> tuple[Optional[float], dict[str, float]]:
        """
        Backend-timed tokens per second over the last ``window`` seconds,
        token-weighted: overall, and by configured model.
        """
        self._expire_generation(now)
        tokens = 0
        seconds = 0.0
        per_model: dict[str, list[float]] = {}
        for _, label, n, s in self._generation:
            tokens += n
            seconds += s
            if label != UNCONFIGURED:
                sums = per_model.setdefault(label, [0.0, 0.0])
                sums[0] += n
                sums[1] += s
        overall = round(tokens / seconds, 3) if seconds > 0 else None
        by_model = {name: round(n / s, 3) for name, (n, s) in per_model.items() if s > 0}
        return overall, by_model

    def swaps_last_hour(self, now: float, snap: SchedulerSnapshot) -> int:
        """Swap attempts started in the last hour, the ones still running included."""
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
