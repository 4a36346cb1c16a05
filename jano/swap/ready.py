"""
Wait until a backend answers its health URL with 200: the readiness phase
of every swap, whoever started the server.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from jano.errors import SwapError

__all__ = ["Readiness", "describe_failure", "secs"]


def secs(value: float) -> str:
    """``300.0`` -> ``"300s"``, ``0.5`` -> ``"0.5s"``."""
    return f"{value:g}s"


def describe_failure(failure: Failure) -> str:
    """A short phrase for a probe failure, for the ``not_ready`` message."""
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseNeverReceived and friends
    if reasons and isinstance(reasons[0], Failure):
        return describe_failure(reasons[0])
    message = failure.getErrorMessage().strip()
    name = type(value).__name__
    text = f"{name}: {message}" if message and message != name else name
    return text if len(text) <= 200 else text[:197] + "..."


class Readiness:
    """
    Poll ``url`` with ``probe`` every ``interval`` seconds (from the end of
    one probe to the start of the next) until it answers 200 or ``timeout``
    seconds pass.

    :ivar result: fires ``None`` on a 200; fails with :class:`SwapError`
        (``not_ready``) at the deadline, or with what :meth:`abort` is given.
        Cancelling it stops polling.
    """

    def __init__(self, clock: IReactorTime, probe: Callable[[str], Deferred[int]], url: str, *,
                 timeout: float, interval: float) -> None:
        self._clock = clock
        self._probe = probe
        self.url = url
        self.timeout = timeout
        self.interval = interval
        self.result: Deferred[None] = Deferred(lambda _: self._stop())
        self.last: Optional[str] = None
        #: When the URL first answered at all (any status): the server listens.
        self.first_answer_at: Optional[float] = None
        self._done = False
        self._poll_call: Optional[IDelayedCall] = None
        self._deadline: Optional[IDelayedCall] = None
        self._pending: Optional[Deferred[int]] = None

    def start(self) -> Deferred[None]:
        self._deadline = self._clock.callLater(self.timeout, self._timed_out)
        self._poll()
        return self.result

    def abort(self, error: Exception) -> None:
        """End now with ``error`` (the server being waited for has exited)."""
        if not self._done:
            self._stop()
            self.result.errback(Failure(error))

    def _poll(self) -> None:
        self._poll_call = None
        try:
            d = self._probe(self.url)
        except Exception:
            d = fail()
        self._pending = d
        d.addCallbacks(self._probed, self._probe_failed)

    def _probed(self, status: int) -> None:
        self._pending = None
        if self._done:
            return
        if self.first_answer_at is None:
            self.first_answer_at = self._clock.seconds()
        if status == 200:
            self._stop()
            self.result.callback(None)
            return
        self.last = str(status)
        self._next()

    def _probe_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._done:
            return
        self.last = describe_failure(failure)
        self._next()

    def _next(self) -> None:
        self._poll_call = self._clock.callLater(self.interval, self._poll)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._done:
            return
        self._stop()
        self.result.errback(Failure(SwapError(
            "not_ready", f"backend not ready after {secs(self.timeout)} "
                         f"(last health: {self.last or 'no answer yet'})")))

    def _stop(self) -> None:
        self._done = True
        for call in (self._poll_call, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._poll_call = self._deadline = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.addErrback(lambda f: None)
            pending.cancel()
