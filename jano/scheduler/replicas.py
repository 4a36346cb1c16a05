"""
Replicas: one model served by several instances (two GPUs, two hosts), and
which of them each request goes to.

Each replica is a model of its own to the :class:`~jano.scheduler.Scheduler`
(``qwen-chat@host-a``, in its own group, with
:attr:`~jano.records.ModelSpec.serves` naming the model clients ask for), so swaps, memory budgets, TTLs, the
starvation guard, managed servers and health probes work per replica as they
do per model.  :class:`Replicas` sits on top with the scheduler's seam
(``admit``, ``release``, ``snapshot``, ``mark_down``, ``lost``, ``load``,
``unload``, ``drain``): a name without replicas passes straight through; for
one with replicas, admission picks a replica by the rules of
:mod:`jano.scheduler.choice` (loaded and least busy first, else join a load
under way, else the cheapest load; replicas that are down are skipped).  When every replica is refused, admission fails as for a
single model, with :class:`~jano.errors.ModelUnavailable` (503) and the
earliest time one is back.

**Failover.**  A request queued on a replica that becomes unavailable (its
swap fails, it is marked down or lost, a reload removes it) is failed there
by the scheduler, and queued again on the next choice among the replicas it
has not tried.  Each request tries each replica at most once, then fails with
what the last one said (:class:`~jano.errors.QueueFull`, 429, if a full queue
was among the reasons).  Requests already dispatched end as their connection
does (502, or a cut stream), as with one model.

**The wait bound.**  The scheduler bounds a request's wait within its group
(``max_wait`` plus what the starvation guard lets go first).  A request
queued again joins the next replica's queue at its tail, as a new arrival, so
that bound starts over there: a request that fails over ``f`` times waits for
the ``f`` failures plus one group's bound, at most about ``f + 1`` times the
bound of one group (each failure comes within its group's bound plus the
failing swap).  ``Ticket.arrived_at`` stays the arrival at Jano, so the
recorded ``queue_wait`` is the whole wait; ``Ticket.requeued_at`` is when the
last restart was, ``Ticket.failovers`` how many.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Collection, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.errors import Busy, ModelRemoved, ModelUnavailable, QueueFull
from jano.records import (HealthState, ModelSpec, ModelState, SchedulerSnapshot, SwapEvent,
                          Ticket)
from jano.scheduler.choice import UNHEALTHY, aggregate, best, is_loaded, model_health
from jano.scheduler.core import Scheduler
from jano.scheduler.state import Model

__all__ = ["Replicas"]


class _Placement:
    """One request for a model with replicas, from its admission to its ticket (or failure)."""

    __slots__ = ("owner", "model", "arrived_at", "outer", "inner", "tried", "errors", "_sync",
                 "_again")

    def __init__(self, owner: "Replicas", model: str, arrived_at: float) -> None:
        self.owner = owner
        self.model = model
        self.arrived_at = arrived_at
        self.outer: Deferred[Ticket] = Deferred(self._cancel)
        self.inner: Optional[Deferred[Ticket]] = None
        self.tried: list[str] = []
        self.errors: list[Exception] = []
        self._sync = False
        self._again = False

    def next(self) -> None:
        """Queue on the best replica not tried yet; a refusal at once tries the next."""
        owner = self.owner
        while not self.outer.called:
            if self.model not in owner.served:  # a reload made it one model: queue there
                self._as_one_model()
                return
            name = owner.choose(self.model, self.tried)
            if name is None:
                self._give_up()
                return
            self.tried.append(name)
            try:
                d = owner.scheduler.admit(name)
            except KeyError:
                continue
            self.inner = d
            self._sync, self._again = True, False
            d.addCallbacks(self._admitted, self._refused, callbackArgs=(name,),
                           errbackArgs=(name,))
            self._sync = False
            if not self._again:
                return

    def _as_one_model(self) -> None:
        try:
            d = self.owner.scheduler.admit(self.model)
        except KeyError:
            self._give_up()
            return
        self.inner = d
        d.addCallbacks(self._admitted, self._failed, callbackArgs=(self.model,))

    def _failed(self, failure: Failure) -> None:
        self.inner = None
        if not self.outer.called:
            self.outer.errback(failure)

    def _cancel(self, _: Deferred[Ticket]) -> None:
        if self.inner is not None:
            self.inner.cancel()  # its CancelledError fails ``outer`` (see _refused)

    def _admitted(self, ticket: Ticket, name: str) -> None:
        self.inner = None
        if self.outer.called:  # cannot happen (cancelling outer cancels inner); be safe
            self.owner.scheduler.release(ticket)
            return
        if self.errors:
            ticket.failovers = len(self.errors)
        if ticket.arrived_at != self.arrived_at:  # queued again since it came (failover, reload)
            ticket.requeued_at = ticket.arrived_at
            ticket.arrived_at = self.arrived_at
        self.outer.callback(ticket)

    def _refused(self, failure: Failure, name: str) -> None:
        self.inner = None
        if self.outer.called:
            return
        exc = failure.value
        if not isinstance(exc, (ModelUnavailable, QueueFull)):
            self.outer.errback(failure)  # Draining, CancelledError: not the replica's doing
            return
        self.errors.append(exc)
        self.owner.log.info("{model}: replica {replica} refused a request ({cause}); trying "
                            "another", model=self.model, replica=name,
                            cause=getattr(exc, "cause", "queue full"))
        if self._sync:
            self._again = True
        else:
            self.next()

    def _give_up(self) -> None:
        full = [e for e in self.errors if isinstance(e, QueueFull)]
        if full:
            self.outer.errback(Failure(QueueFull(self.model, min(e.retry_after for e in full))))
            return
        last = self.errors[-1] if self.errors else None
        cause, retry_after = self.owner.why_down(self.model)
        if isinstance(last, ModelUnavailable) and not self.owner.down_now(self.model):
            cause, retry_after = self.owner.scrub(self.model, last.cause), last.retry_after
        self.outer.errback(Failure(ModelUnavailable(self.model, cause, retry_after)))


class Replicas:
    """
    The admission and lifecycle seam for models served by replicas, over a
    :class:`Scheduler` that knows each replica as a model of its own.

    :param models: every configured instance (models and replicas), as the
        scheduler has them.
    :param health: each instance's last health state (the health monitor's).
    """

    log = Logger()

    def __init__(self, scheduler: Scheduler, clock: IReactorTime, models: Sequence[ModelSpec],
                 *, health: Callable[[], Mapping[str, HealthState]] = dict) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.health = health
        self._served: dict[str, tuple[str, ...]] = {}
        self._specs: dict[str, ModelSpec] = {}
        self.set_models(models)

    def set_models(self, models: Sequence[ModelSpec]) -> None:
        """
        Adopt a new list of instances; before the scheduler's ``reconfigure``,
        so that the requests of a removed replica fail over to the new ones.
        """
        served: dict[str, list[str]] = {}
        for spec in models:
            if spec.serves is not None:
                served.setdefault(spec.serves, []).append(spec.name)
        self._served = {name: tuple(names) for name, names in served.items()}
        self._specs = {spec.name: spec for spec in models}

    def public_name(self, name: str) -> str:
        """The name clients use for instance ``name`` (its own, unless it is a replica)."""
        spec = self._specs.get(name)
        return spec.public_name if spec is not None else name

    def public_event(self, event: SwapEvent) -> SwapEvent:
        """
        ``event`` under the names clients use (a replica's group still tells
        which replica it was): what telemetry counts.
        """
        to = self.public_name(event.to_model) if event.to_model is not None else None
        was = self.public_name(event.from_model) if event.from_model is not None else None
        evicted = tuple(self.public_name(n) for n in event.evicted)
        if (to, was, evicted) == (event.to_model, event.from_model, event.evicted):
            return event
        return replace(event, to_model=to, from_model=was, evicted=evicted)

    def health_of(self, states: Mapping[str, HealthState]) -> dict[str, HealthState]:
        """``states`` (each instance's) with each model served by replicas added (the best)."""
        out = dict(states)
        for model, names in self._served.items():
            out[model] = model_health(states, names)
        return out

    @property
    def served(self) -> Mapping[str, tuple[str, ...]]:
        """Each model served by replicas, with its replicas' names."""
        return self._served

    def replicas_of(self, model: str) -> tuple[str, ...]:
        """The replicas serving ``model`` (empty: it has none)."""
        return self._served.get(model, ())

    # --- the choice ---------------------------------------------------------------------

    def _live(self, model: str, exclude: Collection[str]) -> list[Model]:
        now = self.clock.seconds()
        out = []
        for name in self._served.get(model, ()):
            m = self.scheduler.record(name)
            if (name in exclude or m is None or m.removed
                    or (m.down_until is not None and now < m.down_until)):
                continue
            out.append(m)
        return out

    def choose(self, model: str, exclude: Collection[str] = ()) -> Optional[str]:
        """
        The replica a request for ``model`` goes to now, skipping ``exclude``
        and the replicas refused; ``None`` when none is left.
        """
        live = self._live(model, exclude)
        if not live:
            return None
        if len(live) > 1 and any(is_loaded(m) for m in live):
            health = self.health()
            healthy = [m for m in live
                       if not (is_loaded(m) and health.get(m.name) in UNHEALTHY)]
            live = healthy or live
        return best(live).name

    def down_now(self, model: str) -> bool:
        """Every replica of ``model`` is refused now."""
        return not self._live(model, ())

    def why_down(self, model: str) -> tuple[str, float]:
        """The cause and retry time of a refusal when every replica of ``model`` is down."""
        now = self.clock.seconds()
        reasons: list[str] = []
        back: list[float] = []
        for name in self._served.get(model, ()):
            m = self.scheduler.record(name)
            if m is not None and m.down_until is not None and now < m.down_until:
                reasons.append(f"{name}: {self.scrub(model, m.down_reason or 'down')}")
                back.append(m.down_until - now)
        if not reasons:
            return "no replica is available", self.scheduler.retry_backoff
        return "every replica is down (" + "; ".join(reasons) + ")", min(back)

    def scrub(self, model: str, cause: str) -> str:
        """``cause`` with each replica's upstream URL replaced by its name (clients see it)."""
        for name in self._served.get(model, ()):
            spec = self._specs.get(name)
            if spec is not None and spec.upstream:
                cause = cause.replace(spec.upstream, name)
        return cause

    def instance_for(self, spec: ModelSpec) -> ModelSpec:
        """Where a request for ``spec`` that needs no admission goes (a GET, say)."""
        if not spec.replicas:
            return spec
        name = self.choose(spec.name) or spec.replicas[0]
        return self._specs.get(name, spec)

    # --- the seam -----------------------------------------------------------------------

    def admit(self, model: str) -> Deferred[Ticket]:
        """
        As :meth:`Scheduler.admit`; for a model with replicas, on the replica
        chosen, and again on another when that one becomes unavailable.
        """
        if model not in self._served:
            return self.scheduler.admit(model).addErrback(self._removed, model,
                                                          self.clock.seconds())
        if self.scheduler.draining:
            return self.scheduler.admit(self._served[model][0])  # fails with Draining
        return self._place(model, self.clock.seconds())

    def _place(self, model: str, arrived_at: float) -> Deferred[Ticket]:
        placement = _Placement(self, model, arrived_at)
        placement.next()
        return placement.outer

    def _removed(self, failure: Failure, model: str,
                 arrived_at: float) -> Deferred[Ticket]:
        """A reload turned ``model`` into replicas while its request waited: queue it on one."""
        failure.trap(ModelRemoved)
        if model not in self._served or self.scheduler.draining:
            return fail(failure)
        return self._place(model, arrived_at)

    def release(self, ticket: Ticket) -> None:
        self.scheduler.release(ticket)

    def mark_down(self, model: str, cause: str, seconds: float) -> None:
        """As :meth:`Scheduler.mark_down`; for a model with replicas, every replica."""
        for name in self._served.get(model, (model,)):
            self.scheduler.mark_down(name, cause, seconds)

    def lost(self, model: str, cause: str, seconds: float) -> None:
        for name in self._served.get(model, (model,)):
            self.scheduler.lost(name, cause, seconds)

    def probed(self, name: str, old: Optional[HealthState], new: HealthState,
               seconds: float) -> None:
        """
        A health probe changed instance ``name``'s state.  A replica that
        answered and now fails its probe is marked down for ``seconds``: its
        queued requests go to the other replicas, new ones skip it.  One
        that answers 200 again is let back at once.  A model without replicas
        is left alone (its requests have nowhere else to go).
        """
        spec = self._specs.get(name)
        if spec is None or spec.serves is None:
            return
        now = self.clock.seconds()
        state = self.scheduler.record(name)
        down = state is not None and state.down_until is not None and state.down_until > now
        if new == "down" and old in ("up", "loading") and not down:
            self.log.warn("{model}: replica {name} failed its health check; its queue goes to "
                          "the other replicas", model=spec.serves, name=name)
            self.scheduler.mark_down(name, f"{spec.serves}: replica {name} failed its health "
                                           "check", seconds)
        elif (new == "up" and down and state is not None
              and (state.down_reason or "").endswith("failed its health check")):
            self.scheduler.clear_down(name)

    def load(self, model: str) -> Deferred[None]:
        """
        As :meth:`Scheduler.load`; for a model with replicas, on the replica a
        request would go to (one where it is loaded or loading already, else
        the cheapest load).
        """
        if model not in self._served:
            return self.scheduler.load(model)
        name = self.choose(model)
        if name is None:
            cause, retry_after = self.why_down(model)
            return fail(ModelUnavailable(model, cause, retry_after))
        return self.scheduler.load(name)

    def unload(self, model: str) -> bool:
        """
        As :meth:`Scheduler.unload`; for a model with replicas, every loaded
        replica.  :class:`Busy` only when none could be unloaded.
        """
        if model not in self._served:
            return self.scheduler.unload(model)
        started = False
        busy: Optional[Busy] = None
        for name in self._served[model]:
            try:
                started = self.scheduler.unload(name) or started
            except Busy as e:
                busy = busy or e
        if busy is not None and not started:
            raise busy
        return started

    def drain(self) -> Deferred[None]:
        return self.scheduler.drain()

    def snapshot(self) -> SchedulerSnapshot:
        """
        The scheduler's snapshot as clients see the models: one entry per
        model, the replicas of one added up (:func:`aggregate`), and each
        replica in ``replicas``.
        """
        snap = self.scheduler.snapshot()
        if not self._served and not any(m.serves is not None for m in snap.models):
            return snap
        models: list[ModelState] = []
        by_model: dict[str, list[ModelState]] = {}
        reps: list[ModelState] = []
        for m in snap.models:
            if m.serves is None:
                models.append(m)
                continue
            reps.append(m)
            if m.serves not in by_model:
                by_model[m.serves] = []
                models.append(m)  # its place; replaced below
            by_model[m.serves].append(m)
        merged = [aggregate(m.serves, by_model[m.serves]) if m.serves is not None else m
                  for m in models]
        return replace(snap, models=tuple(merged), replicas=tuple(reps))
