"""
Admission and ordering: which queued request may go to its model next.

One GPU holds one model at a time.  Models that share a GPU form a *swap
group* (:attr:`jano.records.ModelSpec.group`) with one slot; exactly one of
them is *resident* (or nobody knows which, until the first swap).  Every
request waits in its model's FIFO queue until :meth:`Scheduler.admit`'s
Deferred fires with a :class:`Ticket`; the web layer then forwards it and calls
:meth:`Scheduler.release` when it ends.

The policy, per group:

- **Collate.**  While the resident model has waiters it gets them, up to its
  ``max_concurrency``, even ahead of older requests for other models: a burst
  ``A B A B A B`` with ``B`` resident costs one swap, not five.
- **Swap when idle.**  When the resident has nothing waiting and nothing in
  flight and others wait, the slot goes to the model whose oldest request has
  waited longest.
- **Starvation guard.**  Once the oldest request of another model in the group
  has waited ``max_wait``, the guard *engages*: the resident gets no request
  younger than that one, except the backlog it had when it was loaded (so a
  model swapped in always serves what it was swapped in for, and two starving
  models cannot bounce the slot between them without serving anyone).  When
  the resident's in-flight count reaches zero the slot goes, as above, to the
  model with the oldest waiter.  The guard stays engaged until the next swap
  of the group or until no other model waits.  A timer (``callLater``) wakes
  the group exactly when the guard is due; nothing polls.
- **Decide, then look once more.**  A swap starts one reactor turn after it
  is decided (``callLater(0)``), so a burst that arrives within one turn is
  seen whole: ``A B A B A B`` arriving while ``B`` is resident and idle costs
  one swap, not two.
- **Never evict.**  A swap starts only when the previous model has nothing in
  flight, never for a model with no live waiter, and never while another swap
  of the same group runs.  Groups are independent.

A failed swap leaves the slot unknown (the script may already have stopped the
previous model), fails every waiter of the target with
:class:`ModelUnavailable`, and marks the target down for ``retry_backoff``
seconds, during which its admissions fail fast; the group goes on serving the
other models.  After the backoff the next request retries the swap.

``always_on`` models live outside the groups: always resident, only bounded by
``max_concurrency`` and ``max_queue``.

Time comes only from the injected clock.  Waiter Deferreds are fired only from
one loop (:meth:`Scheduler._run`) after the state they depend on is complete,
so callbacks may re-enter ``admit``/``release``/``cancel`` freely.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, Protocol, Sequence, Union, cast

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.records import (
    GroupState,
    ModelSpec,
    ModelState,
    SchedulerSnapshot,
    SwapEvent,
    SwapResult,
)

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "Draining",
    "ModelUnavailable",
    "QueueFull",
    "Scheduler",
    "Swapper",
    "Ticket",
]

#: Retry-After (seconds) for :class:`QueueFull` before any service time was observed.
DEFAULT_RETRY_AFTER = 5.0
#: Bounds of every Retry-After estimate (seconds).
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 600.0
#: Weight of the newest observation in the running means of service and swap times.
EWMA_WEIGHT = 0.2

_FAILURE_RESULTS: frozenset[str] = frozenset({"failed", "timeout", "not_ready"})


class QueueFull(Exception):
    """
    The model's queue already holds ``max_queue`` live waiters.

    :ivar retry_after: seconds after which a retry is likely to be queued,
        estimated from observed service and swap times.
    """

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"queue for model {model!r} is full")
        self.model = model
        self.retry_after = retry_after


class ModelUnavailable(Exception):
    """
    The model cannot be served now: its swap failed, it is still marked down
    after a failed swap, or it was removed from the configuration.

    :ivar cause: one human-readable line (the swap's error).
    :ivar retry_after: seconds until a retry may succeed.
    """

    def __init__(self, model: str, cause: str, retry_after: float) -> None:
        super().__init__(f"model {model!r} is unavailable: {cause}")
        self.model = model
        self.cause = cause
        self.retry_after = retry_after


class Draining(Exception):
    """Jano is shutting down and admits nothing new."""


@dataclass(eq=False)
class Ticket:
    """
    One admitted request.  Hand it back to :meth:`Scheduler.release` exactly
    once, when the forwarded request has ended in any way.

    Compared by identity: two requests with equal fields are still two tickets.
    """

    model: str
    arrived_at: float
    dispatched_at: Optional[float] = None
    #: A swap of the model's group ran (or was running) between arrival and dispatch.
    waited_for_swap: bool = False

    @property
    def queue_wait(self) -> Optional[float]:
        """Seconds between arrival and dispatch; ``None`` until dispatched."""
        if self.dispatched_at is None:
            return None
        return self.dispatched_at - self.arrived_at


class Swapper(Protocol):
    """
    Moves a group's slot from ``previous`` (``None``: unknown) to ``target``.

    The Deferred fires once the target answers; it fails with an exception that
    may carry ``result`` (``"failed"``, ``"timeout"``, ``"not_ready"``) and
    ``cause`` (one line).  Anything else counts as ``"failed"`` with
    ``str(exc)`` as cause.
    """

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec) -> Deferred[None]: ...


# --- internal state ----------------------------------------------------------------------

_WaiterState = Literal["queued", "dispatching", "failing", "done", "cancelled"]
#: Total order of arrivals: arrival time, then admission sequence number.
_Key = tuple[float, int]


class _Waiter:
    """One queued request: its Ticket-to-be and the Deferred the caller holds."""

    __slots__ = ("model", "ticket", "seq", "deferred", "state", "group", "swap_mark", "error")

    def __init__(self, model: _Model, ticket: Ticket, seq: int,
                 group: Optional[_Group]) -> None:
        self.model = model
        self.ticket = ticket
        self.seq = seq
        self.deferred: Deferred[Ticket] = Deferred(self._cancel)
        self.state: _WaiterState = "queued"
        self.group = group
        #: ``group.swaps_started`` at arrival, minus one if a swap was running then.
        self.swap_mark = 0
        if group is not None:
            self.swap_mark = group.swaps_started - (1 if group.swapping_to is not None else 0)
        self.error: Optional[Exception] = None

    @property
    def key(self) -> _Key:
        return (self.ticket.arrived_at, self.seq)

    def _cancel(self, _: Deferred[Ticket]) -> None:
        self.model.scheduler._waiter_cancelled(self)


class _Model:
    """The scheduler's mutable record of one model."""

    __slots__ = ("scheduler", "spec", "queue", "live", "in_flight", "group", "down_until",
                 "down_reason", "removed", "service_mean")

    def __init__(self, scheduler: Scheduler, spec: ModelSpec) -> None:
        self.scheduler = scheduler
        self.spec = spec
        #: FIFO of waiters; cancelled ones stay until they reach the head (lazy removal).
        self.queue: deque[_Waiter] = deque()
        #: Waiters in ``queue`` that are still ``queued``.
        self.live = 0
        self.in_flight = 0
        #: ``None`` for always_on models.
        self.group: Optional[_Group] = None
        self.down_until: Optional[float] = None
        self.down_reason: Optional[str] = None
        #: No longer configured; kept only while requests are in flight.
        self.removed = False
        self.service_mean: Optional[float] = None

    @property
    def name(self) -> str:
        return self.spec.name

    def head(self) -> Optional[_Waiter]:
        """The oldest live waiter, dropping cancelled ones from the front."""
        q = self.queue
        while q and q[0].state != "queued":
            q.popleft()
        return q[0] if q else None

    def forget_cancelled(self) -> None:
        """Keep the deque within a constant factor of the live count (amortised O(1))."""
        if self.live == 0:
            self.queue.clear()
        elif len(self.queue) > 2 * self.live + 16:
            self.queue = deque(w for w in self.queue if w.state == "queued")

    def take_live(self) -> list[_Waiter]:
        """Remove and return every live waiter."""
        waiters = [w for w in self.queue if w.state == "queued"]
        self.queue.clear()
        self.live = 0
        return waiters


class _Group:
    """One swap group's slot."""

    __slots__ = ("name", "members", "resident", "loaded_at", "load_seq", "swapping_to",
                 "swap_started_at", "swap_token", "swaps_started", "latch", "timer",
                 "swap_mean", "swap_call", "swap_ready")

    def __init__(self, name: str) -> None:
        self.name = name
        #: Swappable, configured models of this group, in configuration order.
        self.members: list[_Model] = []
        #: May name a model that left the group (removed, moved, made always_on)
        #: while it still has requests in flight; the slot becomes unknown after.
        self.resident: Optional[_Model] = None
        self.loaded_at: Optional[float] = None
        #: Waiters with a smaller sequence number were queued when the resident
        #: was loaded: its backlog, which the starvation guard never holds back.
        self.load_seq = 0
        self.swapping_to: Optional[_Model] = None
        self.swap_started_at: Optional[float] = None
        self.swap_token = 0
        self.swaps_started = 0
        #: Key of the overdue waiter that engaged the starvation guard.
        self.latch: Optional[_Key] = None
        self.timer: Optional[IDelayedCall] = None
        self.swap_mean: Optional[float] = None
        #: The one-turn delay between deciding a swap and starting it.
        self.swap_call: Optional[IDelayedCall] = None
        self.swap_ready = False


def _ewma(mean: Optional[float], value: float) -> float:
    return value if mean is None else mean + EWMA_WEIGHT * (value - mean)


def _swap_error(failure: Failure) -> tuple[SwapResult, str]:
    """Map a failed swap to ``SwapEvent.result`` and one line of cause."""
    exc = failure.value
    raw = getattr(exc, "result", "failed")
    result = cast(SwapResult, raw if raw in _FAILURE_RESULTS else "failed")
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, str) or not cause:
        if isinstance(exc, CancelledError):
            cause = "swap cancelled"
        else:
            cause = str(exc) or type(exc).__name__
    return result, cause


class Scheduler:
    """
    Per-model FIFO queues, per-group slots, the collation policy and the
    starvation guard (see the module docstring).

    :param models: every configured model.
    :param swapper: runs swaps; a public attribute, replaced on reload.
    :param clock: the only source of time and timers.
    :param max_wait: seconds a request may wait before the starvation guard
        stops the resident model from taking newer requests.
    :param max_queue: live waiters per model before :class:`QueueFull`.
    :param retry_backoff: seconds a model stays down after a failed swap.
    :param initial: group name to the model known to be resident at start-up.
    :param on_swap: called once with a :class:`SwapEvent` when any swap attempt ends.
    """

    log = Logger()

    def __init__(self, models: Sequence[ModelSpec], swapper: Swapper, clock: IReactorTime, *,
                 max_wait: float = 120.0, max_queue: int = 256, retry_backoff: float = 5.0,
                 initial: Optional[Mapping[str, str]] = None,
                 on_swap: Optional[Callable[[SwapEvent], None]] = None) -> None:
        self.swapper = swapper
        self.clock = clock
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.retry_backoff = retry_backoff
        self.on_swap = on_swap
        self._models: dict[str, _Model] = {}
        self._groups: dict[str, _Group] = {}
        #: Removed models that still have requests in flight.
        self._retired: dict[str, _Model] = {}
        #: Ticket (by identity) -> the model it holds a slot of.
        self._owner: dict[Ticket, _Model] = {}
        self._seq = 0
        self._draining = False
        self._drain_waiters: list[Deferred[None]] = []
        self._dirty: dict[Union[_Group, _Model], None] = {}
        self._actions: deque[Callable[[], None]] = deque()
        self._running = False
        self._install(models)
        for group_name, model_name in (initial or {}).items():
            m = self._models.get(model_name)
            if m is None or m.group is None:
                self.log.warn("initial model {model} for group {group} is not a swappable "
                              "configured model; the slot stays unknown",
                              model=model_name, group=group_name)
                continue
            if m.group.name != group_name and group_name:
                self.log.warn("initial model {model} is in group {actual}, not {group}",
                              model=model_name, actual=m.group.name, group=group_name)
            m.group.resident = m

    # --- the seam --------------------------------------------------------------------------

    def admit(self, model: str) -> Deferred[Ticket]:
        """
        Queue a request for ``model``.

        :raises KeyError: when ``model`` is not configured.
        :return: fires with a :class:`Ticket` when the request may be forwarded;
            fails with :class:`QueueFull`, :class:`ModelUnavailable` or
            :class:`Draining`.  Cancel it when the client goes away.
        """
        m = self._models[model]
        if self._draining:
            return fail(Draining("Jano is shutting down"))
        now = self.clock.seconds()
        if m.down_until is not None:
            if now < m.down_until:
                return fail(ModelUnavailable(model, m.down_reason or "swap failed",
                                             m.down_until - now))
            m.down_until = None
            m.down_reason = None
        if m.live >= self.max_queue:
            retry_after = self._retry_after(m)
            self.log.info("queue for {model} is full ({queued} waiting): retry after {retry_after:.0f}s",
                          model=model, queued=m.live, retry_after=retry_after)
            return fail(QueueFull(model, retry_after))
        self._seq += 1
        w = _Waiter(m, Ticket(model, now), self._seq, m.group)
        m.queue.append(w)
        m.live += 1
        self._touch(m)
        self._run()
        return w.deferred

    def release(self, ticket: Ticket) -> None:
        """The forwarded request ended (any way): free its slot and re-evaluate."""
        m = self._owner.pop(ticket, None)
        if m is None:
            self.log.warn("release of a ticket for {model} that is not in flight (released twice?)",
                          model=ticket.model)
            return
        m.in_flight -= 1
        if ticket.dispatched_at is not None:
            m.service_mean = _ewma(m.service_mean, self.clock.seconds() - ticket.dispatched_at)
        if m.removed and m.in_flight == 0:
            self._retired.pop(m.name, None)
        self._touch(m)
        self._run()

    def snapshot(self) -> SchedulerSnapshot:
        """Everything telemetry shows about queues, slots and swaps, right now."""
        now = self.clock.seconds()
        residents = {id(g.resident) for g in self._groups.values() if g.resident is not None}
        models = [self._model_state(m, now, residents) for m in self._models.values()]
        models += [self._model_state(m, now, residents) for m in self._retired.values()]
        groups = tuple(
            GroupState(
                name=g.name,
                resident=g.resident.name if g.resident is not None else None,
                loaded_at=g.loaded_at,
                swapping_to=g.swapping_to.name if g.swapping_to is not None else None,
                swap_started_at=g.swap_started_at,
            )
            for g in self._groups.values()
        )
        return SchedulerSnapshot(at=now, models=tuple(models), groups=groups,
                                 draining=self._draining)

    def drain(self) -> Deferred[None]:
        """
        Stop admitting and start no new swap; fail every queued waiter with
        :class:`Draining`.

        :return: fires when nothing is in flight and no swap runs.  Cancelling
            it only stops the wait.
        """
        if not self._draining:
            self._draining = True
            failed = 0
            for m in self._models.values():
                for w in m.take_live():
                    self._fail_waiter(w, Draining("Jano is shutting down"))
                    failed += 1
            for g in self._groups.values():
                g.latch = None
                self._set_timer(g, None)
                self._cancel_swap_call(g)
            self.log.info("draining: {failed} queued requests refused, {in_flight} in flight",
                          failed=failed, in_flight=len(self._owner))

        def forget(d: Deferred[None]) -> None:
            if d in self._drain_waiters:
                self._drain_waiters.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._drain_waiters.append(d)
        self._run()
        return d

    def reconfigure(self, models: Sequence[ModelSpec], *, max_wait: float, max_queue: int) -> None:
        """
        Apply a reloaded configuration.  Queued and in-flight requests of models
        that still exist are kept; waiters of removed models fail with
        :class:`ModelUnavailable`.  A model that leaves its group (removed,
        moved, made always_on) while resident keeps the slot until its
        in-flight requests end; the slot is unknown after that.
        """
        self.max_wait = max_wait
        self.max_queue = max_queue
        wanted = {spec.name for spec in models}
        for name in [n for n in self._models if n not in wanted]:
            m = self._models.pop(name)
            m.removed = True
            for w in m.take_live():
                self._fail_waiter(w, ModelUnavailable(name, "model removed from configuration",
                                                      self.retry_backoff))
            if m.in_flight:
                self._retired[name] = m
            self.log.info("model {model} removed from configuration ({in_flight} in flight)",
                          model=name, in_flight=m.in_flight)
        self._install(models)
        for g in self._groups.values():
            self._dirty[g] = None
        for m in self._models.values():
            self._touch(m)
        self._run()

    # --- configuration -------------------------------------------------------------------------

    def _install(self, specs: Sequence[ModelSpec]) -> None:
        """(Re)build the name and group tables from ``specs``, keeping existing records."""
        ordered: dict[str, _Model] = {}
        for spec in specs:
            m = self._models.get(spec.name)
            if m is None:
                m = self._retired.pop(spec.name, None)
                if m is not None:
                    m.removed = False
                else:
                    m = _Model(self, spec)
            m.spec = spec
            if spec.always_on:
                m.group = None
            else:
                g = self._groups.get(spec.group)
                if g is None:
                    g = self._groups[spec.group] = _Group(spec.group)
                m.group = g
            ordered[spec.name] = m
        self._models = ordered
        for g in self._groups.values():
            g.members = [m for m in ordered.values() if m.group is g]
        for name in [n for n, g in self._groups.items()
                     if not g.members and g.resident is None and g.swapping_to is None]:
            g = self._groups.pop(name)
            self._set_timer(g, None)
            self._cancel_swap_call(g)

    # --- the loop ------------------------------------------------------------------------------

    def _touch(self, m: _Model) -> None:
        """Mark what ``m``'s change may affect for re-evaluation."""
        if not m.removed:
            if m.group is None:
                self._dirty[m] = None
            else:
                self._dirty[m.group] = None
        for g in self._groups.values():
            if g.resident is m:
                self._dirty[g] = None

    def _run(self) -> None:
        """
        Re-plan dirty groups, then run the resulting actions (firing Deferreds,
        starting swaps), until nothing is left.  Re-entrant calls return at once;
        the outer loop picks up what they marked.
        """
        if self._running:
            return
        self._running = True
        try:
            while True:
                if self._dirty:
                    item = next(iter(self._dirty))
                    del self._dirty[item]
                    if isinstance(item, _Group):
                        self._plan_group(item)
                    elif not item.removed:
                        self._dispatch(item, None)
                elif self._actions:
                    self._actions.popleft()()
                elif self._drained():
                    waiters, self._drain_waiters = self._drain_waiters, []
                    self.log.info("drained: nothing in flight, no swap running")
                    for d in waiters:
                        self._actions.append(lambda d=d: d.callback(None))  # type: ignore[misc]
                else:
                    break
        finally:
            self._running = False

    def _drained(self) -> bool:
        return (self._draining and bool(self._drain_waiters) and not self._owner
                and all(g.swapping_to is None for g in self._groups.values()))

    def _plan_group(self, g: _Group) -> None:
        """Decide what one group does now: dispatch, wait, or start a swap."""
        if g.swapping_to is not None:
            self._set_timer(g, None)
            self._cancel_swap_call(g)
            return
        now = self.clock.seconds()
        r = g.resident
        if r is not None and (r.group is not g or r.removed):
            if r.in_flight:
                self._set_timer(g, None)
                self._cancel_swap_call(g)
                return  # it still runs requests: never evict it
            self.log.info("group {group}: {model} left the group; slot is now unknown",
                          group=g.name, model=r.name)
            g.resident = None
            g.loaded_at = None
            g.latch = None
            r = None
            if not g.members:
                self._groups.pop(g.name, None)
                self._set_timer(g, None)
                self._cancel_swap_call(g)
                return

        oldest: Optional[_Waiter] = None
        for m in g.members:
            if m is not r and m.live:
                h = m.head()
                if h is not None and (oldest is None or h.key < oldest.key):
                    oldest = h
        if oldest is None:
            g.latch = None
        elif (r is not None and g.latch is None
              and now >= oldest.ticket.arrived_at + self.max_wait):
            g.latch = oldest.key
            self.log.info("group {group}: starvation guard engaged for {model} (waiting "
                          "{waited:.1f}s); {resident} takes no newer requests",
                          group=g.name, model=oldest.model.name,
                          waited=now - oldest.ticket.arrived_at, resident=r.name)

        if r is not None:
            self._dispatch(r, g)
            if r.in_flight:
                wake = None
                if g.latch is None and oldest is not None:
                    wake = oldest.ticket.arrived_at + self.max_wait
                self._set_timer(g, wake)
                self._cancel_swap_call(g)
                return
        self._set_timer(g, None)
        if oldest is None or self._draining:
            self._cancel_swap_call(g)
            return
        if g.swap_ready:
            self._start_swap(g, r, oldest.model, now)
        elif g.swap_call is None:
            g.swap_call = self.clock.callLater(0, self._swap_turn, g)

    def _dispatch(self, m: _Model, g: Optional[_Group]) -> None:
        """Hand ``m``'s waiters their tickets while slots are free and the guard allows."""
        now = self.clock.seconds()
        while m.live and m.in_flight < m.spec.max_concurrency:
            w = m.head()
            assert w is not None
            if (g is not None and g.latch is not None and w.key > g.latch
                    and w.seq >= g.load_seq):
                break  # the starvation guard holds back requests newer than the starving one
            m.queue.popleft()
            m.live -= 1
            t = w.ticket
            t.dispatched_at = now
            wg = w.group
            t.waited_for_swap = wg is not None and (wg is not m.group
                                                   or wg.swaps_started != w.swap_mark)
            m.in_flight += 1
            self._owner[t] = m
            w.state = "dispatching"
            self._actions.append(lambda w=w: self._deliver(w))  # type: ignore[misc]

    def _set_timer(self, g: _Group, wake: Optional[float]) -> None:
        """Make ``g``'s guard timer fire at ``wake`` (``None``: not at all)."""
        if wake is not None and not math.isfinite(wake):
            wake = None
        t = g.timer
        if t is not None and t.active():
            if wake is not None and t.getTime() == wake:
                return
            t.cancel()
        g.timer = None
        if wake is not None:
            g.timer = self.clock.callLater(max(0.0, wake - self.clock.seconds()),
                                           self._guard_due, g)

    def _cancel_swap_call(self, g: _Group) -> None:
        if g.swap_call is not None:
            if g.swap_call.active():
                g.swap_call.cancel()
            g.swap_call = None

    def _swap_turn(self, g: _Group) -> None:
        """One turn after a swap was decided: decide again, and start it if still wanted."""
        g.swap_call = None
        if self._groups.get(g.name) is not g:
            return
        g.swap_ready = True
        try:
            self._dirty[g] = None
            self._run()
        finally:
            g.swap_ready = False

    def _guard_due(self, g: _Group) -> None:
        g.timer = None
        if self._groups.get(g.name) is g:
            self._dirty[g] = None
            self._run()

    # --- waiters -------------------------------------------------------------------------------

    def _deliver(self, w: _Waiter) -> None:
        if w.state == "dispatching":
            w.state = "done"
            w.deferred.callback(w.ticket)
        elif w.state == "failing":
            w.state = "done"
            assert w.error is not None
            w.deferred.errback(Failure(w.error))

    def _fail_waiter(self, w: _Waiter, error: Exception) -> None:
        """``w`` is already out of its queue; fail its Deferred from the loop."""
        w.state = "failing"
        w.error = error
        self._actions.append(lambda: self._deliver(w))

    def _waiter_cancelled(self, w: _Waiter) -> None:
        """The caller cancelled ``w``'s Deferred (client gone while queued)."""
        m = w.model
        if w.state == "queued":
            w.state = "cancelled"
            m.live -= 1
            m.forget_cancelled()
        elif w.state == "dispatching":
            # Dispatched in this loop turn but not yet delivered: give the slot back.
            w.state = "cancelled"
            self._owner.pop(w.ticket, None)
            m.in_flight -= 1
            w.ticket.dispatched_at = None
        elif w.state == "failing":
            w.state = "cancelled"
            return
        else:
            return
        self._touch(m)
        self._run()

    # --- swaps ---------------------------------------------------------------------------------

    def _start_swap(self, g: _Group, previous: Optional[_Model], target: _Model, now: float) -> None:
        g.swapping_to = target
        g.swap_started_at = now
        g.swaps_started += 1
        g.swap_token += 1
        g.latch = None
        token = g.swap_token
        self.log.info("group {group}: swapping {previous} -> {target} ({queued} waiting)",
                      group=g.name, previous=previous.name if previous else None,
                      target=target.name, queued=target.live)

        def begin() -> None:
            try:
                d = self.swapper.swap(g.name, previous.spec if previous else None, target.spec)
            except Exception:
                d = fail()
            d.addCallbacks(self._swap_ok, self._swap_failed,
                           callbackArgs=(g, token, previous, target, now),
                           errbackArgs=(g, token, previous, target, now))

        self._actions.append(begin)

    def _swap_ok(self, _: object, g: _Group, token: int, previous: Optional[_Model],
                 target: _Model, started: float) -> None:
        if g.swap_token != token or g.swapping_to is not target:
            return
        now = self.clock.seconds()
        g.swapping_to = None
        g.swap_started_at = None
        g.resident = target
        g.loaded_at = now
        g.load_seq = self._seq + 1
        target.down_until = None
        target.down_reason = None
        g.latch = None
        g.swap_mean = _ewma(g.swap_mean, now - started)
        self.log.info("group {group}: {target} loaded in {duration:.2f}s",
                      group=g.name, target=target.name, duration=now - started)
        self._report(SwapEvent(g.name, previous.name if previous else None, target.name,
                               started, now - started, "ok"))
        self._dirty[g] = None
        self._run()

    def _swap_failed(self, failure: Failure, g: _Group, token: int, previous: Optional[_Model],
                     target: _Model, started: float) -> None:
        if g.swap_token != token or g.swapping_to is not target:
            return
        now = self.clock.seconds()
        result, cause = _swap_error(failure)
        g.swapping_to = None
        g.swap_started_at = None
        g.resident = None
        g.loaded_at = None
        g.latch = None
        target.down_until = now + self.retry_backoff
        target.down_reason = cause
        waiters = target.take_live()
        self.log.warn("group {group}: swap {previous} -> {target} {result} after {duration:.2f}s: "
                      "{cause}; {failed} waiters failed, down for {backoff}s",
                      group=g.name, previous=previous.name if previous else None,
                      target=target.name, result=result, duration=now - started, cause=cause,
                      failed=len(waiters), backoff=self.retry_backoff)
        self._report(SwapEvent(g.name, previous.name if previous else None, target.name,
                               started, now - started, result, cause))
        for w in waiters:
            self._fail_waiter(w, ModelUnavailable(target.name, cause, self.retry_backoff))
        self._dirty[g] = None
        self._run()

    def _report(self, event: SwapEvent) -> None:
        if self.on_swap is None:
            return
        on_swap = self.on_swap

        def report() -> None:
            try:
                on_swap(event)
            except Exception:
                self.log.failure("on_swap failed for {group}", group=event.group)

        self._actions.append(report)

    # --- views ---------------------------------------------------------------------------------

    def _retry_after(self, m: _Model) -> float:
        """
        Seconds until a full queue has likely room again: the queue's work at
        the observed mean service time spread over ``max_concurrency`` slots,
        plus the observed mean swap time when the model is not resident.
        :data:`DEFAULT_RETRY_AFTER` until a service time was observed; clamped
        to [:data:`RETRY_AFTER_MIN`, :data:`RETRY_AFTER_MAX`].
        """
        if m.service_mean is None:
            return DEFAULT_RETRY_AFTER
        estimate = m.live * m.service_mean / max(1, m.spec.max_concurrency)
        g = m.group
        if g is not None and g.resident is not m:
            estimate += g.swap_mean if g.swap_mean is not None else DEFAULT_RETRY_AFTER
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, estimate))

    def _model_state(self, m: _Model, now: float, residents: set[int]) -> ModelState:
        down = m.down_until is not None and now < m.down_until
        head = m.head()
        spec = m.spec
        return ModelState(
            name=spec.name,
            group=spec.group,
            always_on=spec.always_on,
            queued=m.live,
            in_flight=m.in_flight,
            oldest_queued_at=head.ticket.arrived_at if head is not None else None,
            resident=(spec.always_on and not m.removed) or id(m) in residents,
            down_until=m.down_until if down else None,
            down_reason=m.down_reason if down else None,
        )

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{g.name}={g.resident.name if g.resident else None}"
            + (f"->{g.swapping_to.name}" if g.swapping_to else "")
            for g in self._groups.values())
        return f"<Scheduler {groups} queued={sum(m.live for m in self._models.values())}>"

