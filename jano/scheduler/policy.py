"""
The policy at work: after every change, re-plan what it touched (dispatch,
wait, or start a swap), then carry the decisions out from one loop.  Groups
with a memory budget are planned by :mod:`jano.scheduler.budget`.

:class:`Policy` holds the scheduler's tables and everything that runs after
a change; :class:`jano.scheduler.Scheduler` adds the seam (``admit``,
``release``, ``snapshot``, ``drain``, ``reconfigure``) and the configuration
on top.  The rules themselves are described in :mod:`jano.scheduler`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.interfaces import Swapper
from jano.records import SwapEvent, Ticket
from jano.scheduler.budget import BudgetPlanner
from jano.scheduler.state import Group, Model, Waiter, step_ttl_timer
from jano.scheduler.swaps import swap_error

__all__ = ["Policy", "swap_error"]


class Policy(BudgetPlanner):
    """
    The scheduler's tables, the loop, the per-group planning, the starvation
    guard's timers, the waiters' Deferreds and the swaps.

    :param swapper: runs swaps; a public attribute, replaced on reload.
    :param clock: the only source of time and timers.
    :param max_wait: seconds a request may wait before the starvation guard
        stops the resident model from taking newer requests.
    :param retry_backoff: seconds a model stays down after a failed swap.
    :param on_swap: called once with a :class:`SwapEvent` when any swap attempt ends.
    :param collate: seconds a swap away from an idle resident is held back, so
        that requests for the resident arriving meanwhile are served first.
    :param min_residency: seconds after a model was swapped in during which
        an idle gap does not evict it.
    :param ttl: seconds a resident may sit idle (nothing queued or in flight)
        before it is unloaded, for models whose spec sets no ``ttl``; 0: never.
    """

    log = Logger()

    def __init__(self, swapper: Swapper, clock: IReactorTime, *, max_wait: float,
                 retry_backoff: float, on_swap: Optional[Callable[[SwapEvent], None]],
                 collate: float = 0.0, min_residency: float = 0.0, ttl: float = 0.0) -> None:
        self.swapper = swapper
        self.ttl = ttl
        self.clock = clock
        self.max_wait = max_wait
        self.collate = collate
        self.min_residency = min_residency
        self.retry_backoff = retry_backoff
        self.on_swap = on_swap
        self._models: dict[str, Model] = {}
        self._groups: dict[str, Group] = {}
        #: Ticket (by identity) -> the model it holds a slot of.
        self._owner: dict[Ticket, Model] = {}
        self._seq = 0
        self._draining = False
        self._drain_waiters: list[Deferred[None]] = []
        self._dirty: dict[Union[Group, Model], None] = {}
        self._actions: deque[Callable[[], None]] = deque()
        self._running = False
        self.last_dispatch_at: Optional[float] = None

    # --- the loop ------------------------------------------------------------------------------

    def _touch(self, m: Model) -> None:
        """Mark what ``m``'s change may affect for re-evaluation."""
        if not m.removed:
            if m.group is None:
                self._dirty[m] = None
            else:
                self._dirty[m.group] = None
        for g in self._groups.values():
            if g.resident is m or m in g.residents:
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
                    if isinstance(item, Group):
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
                and not any(g.busy for g in self._groups.values()))

    def _plan_group(self, g: Group) -> None:
        """Decide what one group does now: dispatch, wait, or start a swap."""
        if g.budget is not None:
            self.plan_budget(g)
            return
        if g.busy or any(x.in_flight for x in g.residents):
            # (``residents``: left loaded when the group's budget was removed)
            self._set_timer(g, None)
            self._cancel_swap_call(g)
            self._idle(g, None)
            return
        for x in g.residents:
            self._idle_model(x, None)
        g.residents.clear()
        now = self.clock.seconds()
        r = g.resident
        if r is not None and (r.group is not g or r.removed):
            if r.in_flight:
                self._set_timer(g, None)
                self._cancel_swap_call(g)
                self._idle(g, None)
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

        oldest: Optional[Waiter] = None
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
                g.want_since = None
                self._idle(g, None)
                wake = None
                if g.latch is None and oldest is not None:
                    wake = oldest.ticket.arrived_at + self.max_wait
                self._set_timer(g, wake)
                self._cancel_swap_call(g)
                return
        self._set_timer(g, None)
        if oldest is None or self._draining:
            g.want_since = None
            self._cancel_swap_call(g)
            self._idle(g, now if oldest is None and r is not None and not self._draining else None)
            return
        self._idle(g, None)
        hold = self._hold_until(g, oldest, now)
        if hold is not None and now < hold:
            self._swap_turn_at(g, hold)  # collate: the resident may still be asked for
        elif g.swap_ready:
            self._start_swap(g, r, oldest.model, now)
        elif g.swap_call is None:
            g.swap_call = self.clock.callLater(0, self._swap_turn, g)

    def _hold_until(self, g: Group, oldest: Waiter, now: float) -> Optional[float]:
        """
        Until when a swap away from ``g``'s idle resident waits: the collation
        window from the moment the swap was first wanted, and the minimum
        residency of a model swapped in; never past ``max_wait`` of the
        oldest waiter, so the starvation bound is unchanged.
        """
        if g.resident is None:
            return None  # nobody to collate for: the slot is empty or unknown
        if g.want_since is None:
            g.want_since = now
        hold = g.want_since + self.collate
        if self.min_residency and g.loaded_at is not None:
            hold = max(hold, g.loaded_at + self.min_residency)
        return min(hold, oldest.ticket.arrived_at + self.max_wait)

    def ttl_of(self, m: Model) -> float:
        ttl = m.spec.ttl
        return self.ttl if ttl is None else ttl

    def _idle(self, g: Group, now: Optional[float]) -> None:
        """
        The resident is idle with nothing waiting since ``now`` (``None``: it
        is not): keep its TTL timer in step.
        """
        r = g.resident
        ttl = self.ttl_of(r) if r is not None and now is not None else 0.0
        step_ttl_timer(g, ttl, now, self.clock, self._ttl_due, g)

    def _ttl_due(self, g: Group) -> None:
        g.ttl_call = None
        r = g.resident
        if (self._groups.get(g.name) is not g or r is None or r.in_flight or g.busy
                or self._draining or any(m.live for m in g.members)):
            return
        self.start_unload(g, r, "idle")
        self._run()

    def _swap_turn_at(self, g: Group, when: float) -> None:
        call = g.swap_call
        if call is not None and call.active() and call.getTime() == when:
            return
        self._cancel_swap_call(g)
        g.swap_call = self.clock.callLater(max(0.0, when - self.clock.seconds()),
                                           self._swap_turn, g)

    def _dispatch(self, m: Model, g: Optional[Group]) -> None:
        """Hand ``m``'s waiters their tickets while slots are free and the guard allows."""
        now = self.clock.seconds()
        while m.live and m.in_flight < m.spec.max_concurrency:
            w = m.head()
            assert w is not None
            if (g is not None and g.latch is not None and w.key > g.latch
                    and w.seq >= (g.load_seq if g.budget is None else m.load_seq)):
                break  # the starvation guard holds back requests newer than the starving one
            m.queue.popleft()
            m.live -= 1
            t = w.ticket
            t.dispatched_at = now
            t.served_by = m.spec
            wg = w.group
            if wg is None:
                t.waited_for_swap = False
            elif wg is not m.group:
                t.waited_for_swap = True
            elif wg.budget is not None:  # its own model was loaded meanwhile
                t.waited_for_swap = m.loads != w.load_mark
            else:  # the slot changed hands meanwhile
                t.waited_for_swap = wg.swaps_started != w.swap_mark
            m.in_flight += 1
            m.last_used = now
            self.last_dispatch_at = now
            self._owner[t] = m
            w.state = "dispatching"
            self._actions.append(lambda w=w: self._deliver(w))  # type: ignore[misc]

    def _set_timer(self, g: Group, wake: Optional[float]) -> None:
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

    def _cancel_swap_call(self, g: Group) -> None:
        if g.swap_call is not None:
            if g.swap_call.active():
                g.swap_call.cancel()
            g.swap_call = None

    def _swap_turn(self, g: Group) -> None:
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

    def _guard_due(self, g: Group) -> None:
        g.timer = None
        if self._groups.get(g.name) is g:
            self._dirty[g] = None
            self._run()

    # --- waiters -------------------------------------------------------------------------------

    def _deliver(self, w: Waiter) -> None:
        if w.state == "dispatching":
            w.state = "done"
            w.deferred.callback(w.ticket)
        elif w.state == "failing":
            w.state = "done"
            assert w.error is not None
            w.deferred.errback(Failure(w.error))

    def _fail_waiter(self, w: Waiter, error: Exception) -> None:
        """``w`` is already out of its queue; fail its Deferred from the loop."""
        w.state = "failing"
        w.error = error
        self._actions.append(lambda: self._deliver(w))

    def _waiter_cancelled(self, w: Waiter) -> None:
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
