"""
The stream tee: the upstream body goes to the client chunk by chunk, and its
tail goes to a bounded buffer for token counting.  Nothing else is kept.
"""

from __future__ import annotations

from typing import Callable, Optional, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request

from zope.interface import implementer

from jano.usage import TailBuffer

#: Called once when the body ends: (completed?, first chunk at, last chunk at, bytes).
OnBodyEnd = Callable[[bool, Optional[float], Optional[float], int], None]


@implementer(IPushProducer)
class StreamTee(Protocol):
    """
    ``IResponse.deliverBody`` target that writes each upstream chunk to the
    client as it arrives.

    The tee registers itself as the streaming producer of the client request
    and passes pause/resume on to the upstream transport: when the client's
    socket buffer fills, Twisted pauses the upstream socket, so memory stays
    bounded by the kernel buffers whatever the response size.  A client that
    stays paused for ``stall_timeout`` seconds is given up on (``on_stall``).
    :meth:`abort` drops the upstream connection, which is what makes
    llama-server stop generating.
    """

    def __init__(self, request: Request, tail: Optional[TailBuffer], clock: IReactorTime,
                 on_end: OnBodyEnd, *, stall_timeout: Optional[float] = None,
                 on_stall: Optional[Callable[[], None]] = None) -> None:
        self._request = request
        self._tail = tail
        self._clock = clock
        self._on_end: Optional[OnBodyEnd] = on_end
        self._stall_timeout = stall_timeout
        self._on_stall = on_stall
        self._stall_call: Optional[IDelayedCall] = None
        self.first_at: Optional[float] = None
        self.last_at: Optional[float] = None
        self.bytes = 0
        self._client_gone = False

    @property
    def _upstream(self) -> IPushProducer:
        # deliverBody hands us the upstream connection as a push producer.
        return cast(IPushProducer, self.transport)

    def connectionMade(self) -> None:
        if self._client_gone:
            self._upstream.stopProducing()
        else:
            self._request.registerProducer(self, True)

    # IPushProducer, driven by the client connection's flow control.

    def pauseProducing(self) -> None:
        self._upstream.pauseProducing()
        if self._stall_timeout is not None and self._stall_call is None:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel_stall()
        self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    def _cancel_stall(self) -> None:
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def _stalled(self) -> None:
        self._stall_call = None
        if self._on_stall is not None and not self._client_gone:
            self._on_stall()

    def dataReceived(self, data: bytes) -> None:
        now = self._clock.seconds()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.bytes += len(data)
        if not self._client_gone:
            self._request.write(data)
        if self._tail is not None:
            self._tail.feed(data)

    def abort(self) -> None:
        """The client went away: stop writing and drop the upstream connection."""
        if self._client_gone:
            return
        self._client_gone = True
        self._cancel_stall()
        if self.transport is not None:
            self._unregister()
            self._upstream.stopProducing()

    def stop_upstream(self) -> None:
        """Drop the upstream connection (it went quiet); the end comes through ``connectionLost``."""
        if self.transport is not None:
            self._upstream.stopProducing()

    def _unregister(self) -> None:
        # A request whose connection is gone has no channel left to unregister from.
        if getattr(self._request, "channel", True) is not None:
            self._request.unregisterProducer()

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        self._cancel_stall()
        if not self._client_gone:
            self._unregister()
        # PotentialDataLoss: a body delimited by connection close (HTTP/1.0
        # style); nothing says it was cut short, so it counts as complete.
        completed = reason.check(ResponseDone, PotentialDataLoss) is not None
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(completed, self.first_at, self.last_at, self.bytes)
