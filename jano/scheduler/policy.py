"""
The policy at work: after every change, re-plan what it touched (dispatch,
wait, or start a swap), then carry the decisions out from one loop.

:class:`Policy` holds the scheduler's tables and everything that runs after
a change; :class:`jano.scheduler.Scheduler` adds the seam (``admit``,
``release``, ``snapshot``, ``drain``, ``reconfigure``) and the configuration
on top.  The rules themselves are described in :mod:`jano.scheduler`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional, Union, cast

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.errors import ModelUnavailable
from jano.interfaces import Swapper
from jano.records import SwapEvent, SwapResult, Ticket
from jano.scheduler.state import Group, Model, Waiter, ewma

__all__ = ["Policy", "swap_error"]

_FAILURE_RESULTS: frozenset[str] = frozenset({"failed", "timeout", "not_ready"})


def swap_error(failure: Failure) -> tuple[SwapResult, str]:
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


class Policy:
    """
    The scheduler's tables, the loop, the per-group planning, the starvation
    guard's timers, the waiters' Deferreds and the swaps.

    :param swapper: runs swaps; a public attribute, replaced on reload.
    :param clock: the only source of time and timers.
    :param max_wait: seconds a request may wait before the starvation guard
        stops the resident model from taking newer requests.
    :param retry_backoff: seconds a model stays down after a failed swap.
    :param on_swap: called once with a :class:`SwapEvent` when any swap attempt ends.
    """

    log = Logger()

    def __init__(self, swapper: Swapper, clock: IReactorTime, *, max_wait: float,
                 retry_backoff: float, on_swap: Optional[Callable[[SwapEvent], None]]) -> None:
        self.swapper = swapper
        self.clock = clock
        self.max_wait = max_wait
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

    # --- the loop ------------------------------------------------------------------------------

    def _touch(self, m: Model) -> None:
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
                and all(g.swapping_to is None for g in self._groups.values()))

    def _plan_group(self, g: Group) -> None:
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

    def _dispatch(self, m: Model, g: Optional[Group]) -> None:
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

    # --- swaps ---------------------------------------------------------------------------------

    def _start_swap(self, g: Group, previous: Optional[Model], target: Model, now: float) -> None:
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

    def _swap_ok(self, _: object, g: Group, token: int, previous: Optional[Model],
                 target: Model, started: float) -> None:
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
        g.swap_mean = ewma(g.swap_mean, now - started)
        self.log.info("group {group}: {target} loaded in {duration:.2f}s",
                      group=g.name, target=target.name, duration=now - started)
        self._report(SwapEvent(g.name, previous.name if previous else None, target.name,
                               started, now - started, "ok"))
        self._dirty[g] = None
        self._run()

    def _swap_failed(self, failure: Failure, g: Group, token: int, previous: Optional[Model],
                     target: Model, started: float) -> None:
        if g.swap_token != token or g.swapping_to is not target:
            return
        now = self.clock.seconds()
        result, cause = swap_error(failure)
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
