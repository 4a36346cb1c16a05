"""
:class:`Telemetry`: the one object the rest of Jano holds.

It wires a :class:`~jano.telemetry.recorder.Recorder`, the JSON views and the
Prometheus export together around Jano's own registry, and passes each call
to the piece that does the work.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Protocol, Sequence

from prometheus_client import CollectorRegistry
from twisted.internet.interfaces import IReactorTime

from jano.records import HealthState, ModelSpec, SchedulerSnapshot, SwapEvent, UsageRecord
from jano.telemetry.export import ScrapeCollector, render, scheduler_stuck
from jano.telemetry.processes import PhaseRecorder, ProcessCollector, Statuses


class RecordSink(Protocol):
    """The durable usage store, as telemetry feeds it."""

    dropped: int

    def add(self, record: UsageRecord) -> None: ...
from jano.telemetry.recorder import Recorder
from jano.telemetry.views import status_body, usage_body

__all__ = ["Telemetry"]


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
        max_wait: float = math.inf,
        stuck_after: float = math.inf,
        reload_threshold: float = 0.5,
    ) -> None:
        self._clock = clock
        self._version = version
        self._snapshot = snapshot
        self._health = health
        self.max_wait = max_wait
        #: The durable store each finished record also goes to (``None``: memory only).
        self.store: Optional[RecordSink] = None
        #: Seconds with waiters and no dispatch after which the scheduler counts as stuck.
        self.stuck_after = stuck_after
        self._registry = CollectorRegistry()
        self._recorder = Recorder(
            clock, models, self._registry, usage_ring=usage_ring, window=window,
            reload_threshold=reload_threshold,
        )
        self._phases = PhaseRecorder(self._registry, self._recorder.label)
        self._processes: Optional[Statuses] = None
        self._registry.register(ProcessCollector(
            lambda: self._processes() if self._processes is not None else {}))
        self._registry.register(
            ScrapeCollector(
                self._recorder, clock, version=version, snapshot=snapshot, health=health,
                limits=lambda: (self.max_wait, self.stuck_after),
                dropped=lambda: self.store.dropped if self.store is not None else 0,
            )
        )

    # -- configuration -----------------------------------------------------

    def set_callers(self, names: Sequence[str]) -> None:
        """The configured callers: the only values the ``caller`` label takes."""
        self._recorder.callers = frozenset(names)

    @property
    def reload_threshold(self) -> float:
        """Seconds of reported load time that count as a hidden reload."""
        return self._recorder.reload_threshold

    @reload_threshold.setter
    def reload_threshold(self, seconds: float) -> None:
        self._recorder.reload_threshold = seconds

    def set_models(self, models: Sequence[ModelSpec]) -> None:
        """
        Adopt a new model list (config reload).

        New models get their series at once.  Series of removed models stay
        (counters keep their totals and stop moving); from now on a record
        naming a removed model counts under ``model=""``.
        """
        self._recorder.set_models(models)

    # -- recording (the UsageSink and SwapListener seams) ------------------

    def next_request_id(self) -> int:
        """A new id for a request, unique for this process (1, 2, 3...)."""
        return self._recorder.next_request_id()

    def request_finished(self, record: UsageRecord) -> None:
        """
        Count one finished request (whatever its outcome) and keep it for ``/usage``.

        Token counts enter the totals only when the backend reported them, and
        the tokens-per-second figures only when the backend also timed the
        generation (``usage.timed_by == "backend"``).
        """
        self._recorder.request_finished(record)
        if self.store is not None:
            self.store.add(record)

    def swap_finished(self, event: SwapEvent) -> None:
        """Count one ended swap attempt, whatever its result."""
        self._recorder.swap_finished(event)
        self._phases.swap_finished(event)

    def set_processes(self, statuses: Statuses) -> None:
        """Where the managed servers' statuses come from (``/status``, ``/metrics``)."""
        self._processes = statuses

    def queue_rejected(self, reason: str) -> None:
        """Count a request Jano refused itself; unknown reasons count as "other"."""
        self._recorder.queue_rejected(reason)

    def client_disconnected(self, model: Optional[str], phase: str) -> None:
        """
        Count a client that went away.

        :param phase: ``"queued"``, ``"waiting_headers"`` or ``"streaming"``;
            anything else counts as ``"other"``.
        """
        self._recorder.client_disconnected(model, phase)

    # -- views -------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The ``/status`` document: JSON-ready, camelCase, ``null`` when unobserved."""
        now = self._clock.seconds()
        snap = self._snapshot()
        health = self._health()
        body = status_body(self._recorder, version=self._version, now=now, snap=snap,
                           health=health)
        body["schedulerStuck"] = scheduler_stuck(snap, now, self.stuck_after)
        if self._processes is not None:
            body["processes"] = dict(self._processes())
        return body

    def sample(self) -> dict[str, Optional[float]]:
        """
        The figures a history sample keeps: recent backend-timed tokens/s,
        queue depth and requests in flight now, and the running totals of
        requests and swaps (the sampler stores their increase).
        """
        now = self._clock.seconds()
        snap = self._snapshot()
        rec = self._recorder
        return {
            "tok_s": rec.recent_gen_tok_s(now)[0],
            "queue_depth": float(sum(m.queued for m in snap.models)),
            "in_flight": float(sum(m.in_flight for m in snap.models)),
            "requests_total": float(rec.requests_total),
            "swaps_total": float(rec.swaps_total),
        }

    def usage(self, limit: int) -> list[dict[str, object]]:
        """
        The newest ``limit`` finished requests, newest first, JSON-ready.

        Paths lose their query string here: queries can carry user text.
        """
        return usage_body(self._recorder, limit)

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
        return render(self._registry, accept)
