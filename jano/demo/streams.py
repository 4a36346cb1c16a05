"""
Inference responses that outlive ``render``: a non-streamed answer sent after
the simulated generation time, and a stream written at a pace as a push
producer, so a slow reader pauses the fake and a response of any size never
sits in memory.  Each counts exactly one outcome (completed, disconnected or
aborted) through the ``record`` callable it is given.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from jano.demo.formats import StreamPlan

__all__ = ["DelayedAnswer", "Exchange", "Outcome", "PacedStream"]

Outcome = Literal["completed", "disconnected", "aborted"]

# One producer tick writes at most this much before yielding to the reactor,
# so a fast reader gets big batches and other connections still get turns.
_BATCH_EVENTS = 256
_BATCH_BYTES = 256 * 1024


class Exchange:
    """
    One inference response that outlives ``render``: counts exactly one outcome.

    :param record: called once with the outcome (the server's counters).
    """

    def __init__(self, request: Request, clock: IReactorTime,
                 record: Callable[[Outcome], None]) -> None:
        self._request = request
        self._clock = clock
        self._record = record
        self._ended = False
        self._call: Optional[IDelayedCall] = None
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self._end("disconnected")

    def _end(self, outcome: Outcome) -> None:
        if self._ended:
            return
        self._ended = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._record(outcome)

    def _drop(self) -> None:
        """Close without finishing: what the client sees when a backend dies."""
        self._end("aborted")
        self._request.loseConnection()


class DelayedAnswer(Exchange):
    """A non-streamed answer sent after the simulated generation time (or a drop)."""

    def __init__(self, request: Request, clock: IReactorTime, record: Callable[[Outcome], None],
                 wait: float, payload: Optional[bytes]) -> None:
        super().__init__(request, clock, record)
        self._payload = payload
        self._call = self._clock.callLater(wait, self._fire)

    def _fire(self) -> None:
        self._call = None
        if self._ended:
            return
        if self._payload is None:
            self._drop()
            return
        request = self._request
        request.setHeader(b"content-length", b"%d" % len(self._payload))
        request.write(self._payload)
        self._end("completed")
        request.finish()


@implementer(IPushProducer)
class PacedStream(Exchange):
    """
    Writes a :class:`StreamPlan` to the request as a push producer.

    With no delay, each tick writes a batch and schedules the next with
    ``callLater(0)`` so the reactor gets to send it; with a delay, one chunk per
    tick.  While paused nothing is written and nothing is scheduled:
    ``resumeProducing`` restarts the ticks.

    :param cut: called instead of closing the connection once ``fail_after``
        chunks are out (the stream then counts as aborted and writes no more):
        the server is about to die with the connection still open.
    """

    def __init__(self, request: Request, clock: IReactorTime, record: Callable[[Outcome], None],
                 plan: StreamPlan, delay: float, fail_after: Optional[int],
                 cut: Optional[Callable[[], None]] = None) -> None:
        super().__init__(request, clock, record)
        self._plan = plan
        self._delay = delay
        self._fail_after = fail_after
        self._cut = cut
        self._i = 0
        self._paused = False
        self._next_at = 0.0

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.write(b"")  # the status line and headers go out now
        self._tick()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._ended and self._call is None:
            wait = max(0.0, self._next_at - self._clock.seconds()) if self._delay else 0.0
            self._call = self._clock.callLater(wait, self._tick)

    def stopProducing(self) -> None:
        self._end("disconnected")

    def _tick(self) -> None:
        self._call = None
        if self._ended:
            return
        plan = self._plan
        write = self._request.write
        budget = 1 if self._delay else _BATCH_EVENTS
        sent = 0
        while True:
            if self._paused:
                return  # resumeProducing schedules the next tick
            i = self._i
            if self._fail_after is not None and i >= self._fail_after:
                self._request.unregisterProducer()
                if self._cut is None:
                    self._drop()
                else:
                    self._end("aborted")
                    self._cut()
                return
            if i >= plan.n:
                self._complete()
                return
            if budget == 0 or sent >= _BATCH_BYTES:
                break
            if i == 0 and plan.head:
                write(plan.head)
            data = plan.chunk(i)
            write(data)
            sent += len(data)
            self._i = i + 1
            budget -= 1
        self._next_at = self._clock.seconds() + self._delay
        self._call = self._clock.callLater(self._delay, self._tick)

    def _complete(self) -> None:
        request = self._request
        if self._i == 0 and self._plan.head:  # zero content chunks: the head still goes out
            request.write(self._plan.head)
        for event in self._plan.tail:
            request.write(event)
        request.unregisterProducer()
        self._end("completed")
        request.finish()

