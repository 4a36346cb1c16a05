"""
Swaps and unloads as they run: started by the policy, ended by the swapper's
Deferred, each reported once as a :class:`~jano.records.SwapEvent`.

:class:`SwapRunner` is a base of :class:`jano.scheduler.policy.Policy`; it
uses the policy's tables, loop and timers (declared below) and adds nothing
to decide.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping, Optional, Sequence, Union, cast

from twisted.internet.defer import CancelledError, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.errors import ModelUnavailable
from jano.interfaces import Swapper
from jano.records import SwapEvent, SwapResult
from jano.scheduler.state import Group, Model, Waiter, ewma

__all__ = ["SwapRunner", "swap_error"]

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


def phases_of(value: object) -> tuple[tuple[str, float], ...]:
    """The per-phase seconds a swapper reported (its result, or its error's ``phases``)."""
    if isinstance(value, Failure):
        value = getattr(value.value, "phases", None)
    if isinstance(value, Mapping):
        value = tuple(value.items())
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return tuple((str(k), float(v)) for k, v in value)
    return ()


class SwapRunner:
    """Start, end and report the swaps and unloads the policy decides."""

    log = Logger()
    swapper: Swapper
    clock: IReactorTime
    retry_backoff: float
    on_swap: Optional[Callable[[SwapEvent], None]]
    _seq: int
    _dirty: dict[Union[Group, Model], None]
    _actions: deque[Callable[[], None]]

    def _run(self) -> None:
        raise NotImplementedError

    def _idle(self, g: Group, now: Optional[float]) -> None:
        raise NotImplementedError

    def _cancel_swap_call(self, g: Group) -> None:
        raise NotImplementedError

    def _fail_waiter(self, w: Waiter, error: Exception) -> None:
        raise NotImplementedError

    def _idle_model(self, m: Model, now: Optional[float]) -> None:
        raise NotImplementedError

    def _start_swap(self, g: Group, previous: Optional[Model], target: Model, now: float,
                    evict: Sequence[Model] = ()) -> None:
        """
        Start moving ``g``'s slot from ``previous`` to ``target``; with a
        budget, load ``target`` after stopping ``evict`` (``previous`` is
        its first, or ``None``), which leave the residents now.
        """
        g.want_since = None
        g.swapping_to = target
        g.swap_started_at = now
        g.swaps_started += 1
        g.swap_token += 1
        g.latch = None
        target.loads += 1
        token = g.swap_token
        budget = g.budget is not None
        if budget:
            g.evicting = tuple(evict)
            for e in evict:
                g.residents.remove(e)
                self._idle_model(e, None)
            self.log.info("group {group}: loading {target} ({queued} waiting), evicting {evict}",
                          group=g.name, target=target.name, queued=target.live,
                          evict=", ".join(e.name for e in evict) or "nothing")
        else:
            self.log.info("group {group}: swapping {previous} -> {target} ({queued} waiting)",
                          group=g.name, previous=previous.name if previous else None,
                          target=target.name, queued=target.live)
        evict_specs = tuple(e.spec for e in evict)
        if budget:
            evicted = tuple(e.name for e in evict)
        else:
            evicted = (previous.name,) if previous is not None else ()

        def begin() -> None:
            try:
                if budget:
                    d = self.swapper.swap(g.name, previous.spec if previous else None,
                                          target.spec, evict=evict_specs)
                else:
                    d = self.swapper.swap(g.name, previous.spec if previous else None,
                                          target.spec)
            except Exception:
                d = fail()
            d.addCallbacks(self._swap_ok, self._swap_failed,
                           callbackArgs=(g, token, previous, target, now, evicted),
                           errbackArgs=(g, token, previous, target, now, evicted))

        self._actions.append(begin)

    def _swap_ok(self, outcome: object, g: Group, token: int, previous: Optional[Model],
                 target: Model, started: float, evicted: tuple[str, ...]) -> None:
        if g.swap_token != token or g.swapping_to is not target:
            return
        now = self.clock.seconds()
        g.swapping_to = None
        g.swap_started_at = None
        g.evicting = ()
        if g.budget is not None:
            if target not in g.residents:
                g.residents.append(target)
            target.loaded_at = now
            target.load_seq = self._seq + 1
            target.last_used = now
        else:
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
                               started, now - started, "ok", phases=phases_of(outcome),
                               evicted=evicted))
        self._dirty[g] = None
        self._run()

    def _swap_failed(self, failure: Failure, g: Group, token: int, previous: Optional[Model],
                     target: Model, started: float, evicted: tuple[str, ...]) -> None:
        if g.swap_token != token or g.swapping_to is not target:
            return
        now = self.clock.seconds()
        result, cause = swap_error(failure)
        backoff = getattr(failure.value, "retry_after", None)
        if not isinstance(backoff, (int, float)) or backoff < 0:
            backoff = self.retry_backoff
        g.swapping_to = None
        g.swap_started_at = None
        stopping, g.evicting = g.evicting, ()
        for e in stopping:  # stopped or not, nobody knows: not counted as loaded
            e.loaded_at = None
        if g.budget is None:
            g.resident = None  # the script may have stopped the previous model
            g.loaded_at = None
        g.latch = None
        target.down_until = now + backoff
        target.down_reason = cause
        waiters = target.take_live()
        self.log.warn("group {group}: swap {previous} -> {target} {result} after {duration:.2f}s: "
                      "{cause}; {failed} waiters failed, down for {backoff}s",
                      group=g.name, previous=previous.name if previous else None,
                      target=target.name, result=result, duration=now - started, cause=cause,
                      failed=len(waiters), backoff=backoff)
        self._report(SwapEvent(g.name, previous.name if previous else None, target.name,
                               started, now - started, result, cause,
                               phases=phases_of(failure), evicted=evicted))
        for w in waiters:
            self._fail_waiter(w, ModelUnavailable(target.name, cause, backoff))
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

    def start_unload(self, g: Group, r: Model, reason: str) -> None:
        """
        Unload ``g``'s idle resident ``r``; the slot is empty afterwards (with
        a budget, ``r`` leaves the residents now and the others stay).
        """
        now = self.clock.seconds()
        self._idle(g, None)
        if g.budget is not None:
            g.residents.remove(r)
            self._idle_model(r, None)
        self._cancel_swap_call(g)
        g.want_since = None
        g.unloading = r
        g.swap_started_at = now
        g.swaps_started += 1
        g.swap_token += 1
        token = g.swap_token
        self.log.info("group {group}: unloading {model} ({reason})", group=g.name,
                      model=r.name, reason=reason)

        def begin() -> None:
            try:
                d = self.swapper.unload(g.name, r.spec)
            except Exception:
                d = fail()
            d.addBoth(self._unload_ended, g, token, r, now, reason)

        self._actions.append(begin)

    def _unload_ended(self, outcome: object, g: Group, token: int, r: Model, started: float,
                      reason: str) -> None:
        if g.swap_token != token or g.unloading is not r:
            return
        now = self.clock.seconds()
        g.unloading = None
        g.swap_started_at = None
        r.loaded_at = None
        if r in g.residents:
            g.residents.remove(r)
        if g.budget is None:
            # empty after an unload, unknown after a failed one: no model either way
            g.resident = None
            g.loaded_at = None
            g.latch = None
        if isinstance(outcome, Failure):
            result, cause = swap_error(outcome)
            self.log.warn("group {group}: unloading {model} {result} after {duration:.2f}s: "
                          "{cause}; the slot is unknown", group=g.name, model=r.name,
                          result=result, duration=now - started, cause=cause)
            event = SwapEvent(g.name, r.name, None, started, now - started, result, cause,
                              kind="unload", reason=reason, evicted=(r.name,))
        else:
            self.log.info("group {group}: {model} unloaded in {duration:.2f}s", group=g.name,
                          model=r.name, duration=now - started)
            event = SwapEvent(g.name, r.name, None, started, now - started, "ok",
                              kind="unload", reason=reason, evicted=(r.name,))
        self._report(event)
        self._dirty[g] = None
        self._run()

