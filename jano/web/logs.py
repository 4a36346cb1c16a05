"""
``/logs/<model>``: a managed model server's recent output, as plain text.

The page is the model's :class:`~jano.swap.logring.LogRing` as it is now;
``?follow=1`` keeps the response open and writes each new line as it comes
(chunked ``text/plain``, one line per write).  Lines are shown as the server
printed them, with no timestamps added.  Stderr is not marked (llama-server
writes its whole log there, so a mark would be on nearly every line and say
nothing); the few lines Jano adds itself (started, exited) read
``[jano] ...`` so they cannot pass for the server's.

A follower never buffers: while the client is not reading (its connection
paused us), new lines are only counted, and on resume one line
``[jano: N lines skipped while the client was not reading]`` says so.  A
client paused for ``stall_timeout`` seconds is dropped.  Memory per follower
is a counter, whatever the server prints.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from jano.forward.forwarder import abort_client
from jano.swap.logring import Entry, LogRing, render
from jano.web import params

__all__ = ["MAX_TAIL", "parse_tail", "logs_page", "follow_logs", "LogFollowers"]

#: The largest ``?tail=`` accepted.
MAX_TAIL = 10000


def parse_tail(request: Request) -> Optional[int]:
    """
    ``?tail=N`` (1 to :data:`MAX_TAIL`), or ``None`` when absent.

    :raises ValueError: a bad value, with a message naming the parameter.
    """
    return params.whole(request.args or {}, "tail", 1, MAX_TAIL)


def _plain(request: Request) -> None:
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    # Browsers otherwise hold back the first bytes of a text/plain stream to sniff them.
    request.setHeader(b"x-content-type-options", b"nosniff")


def _line(text: str) -> bytes:
    # Surrogates (from a surrogateescape decode) must not break the response.
    return (text + "\n").encode("utf-8", "replace")


def logs_page(request: Request, ring: LogRing, tail: Optional[int]) -> bytes:
    """The lines held now (the last ``tail`` when given), one per line."""
    _plain(request)
    return ring.text(tail).encode("utf-8", "replace")


def skipped_note(n: int) -> str:
    """The line a follower reads after a pause that cost it ``n`` lines."""
    return f"[jano: {n} line{'' if n == 1 else 's'} skipped while the client was not reading]"


@implementer(IPushProducer)
class LogFollow:
    """
    One open ``?follow=1`` response: the client connection's push producer
    (it pauses and resumes us), subscribed to the ring until it ends.

    It ends when the client leaves, when :attr:`done` is cancelled (Klein
    cancels the route's Deferred when the client leaves), or on :meth:`close`
    (Jano stops); :attr:`done` then fires with ``None``, never with a failure.
    """

    log = Logger()

    def __init__(self, request: Request, ring: LogRing, clock: IReactorTime,
                 stall_timeout: Optional[float],
                 on_end: Callable[["LogFollow"], None] = lambda f: None) -> None:
        self.request = request
        self.ring = ring
        self.done: Deferred[None] = Deferred(lambda _: self.close())
        self.paused = False
        #: Lines not written during the current pause.
        self.skipped = 0
        self.ended = False
        self._stopped = False
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._stall: Optional[IDelayedCall] = None
        self._on_end = on_end
        self._unfollow: Callable[[], None] = lambda: None

    def start(self, tail: Optional[int]) -> Deferred[None]:
        """Write the headers and the last ``tail`` lines (``None``: all), then follow."""
        request = self.request
        request.notifyFinish().addErrback(self._client_lost)  # fails at once if already gone
        if self.ended:
            return self.done
        _plain(request)
        request.setHeader(b"x-accel-buffering", b"no")  # a reverse proxy in front: no buffering
        request.registerProducer(self, True)
        request.write(b"")  # the headers go now, even if the server is quiet
        for entry in self.ring.lines(tail):
            self._deliver(entry)
        if not self.ended:
            self._unfollow = self.ring.follow(self._deliver)
        return self.done

    def _deliver(self, entry: Entry) -> None:
        if self.ended:
            return
        if self.paused:
            self.skipped += 1
            return
        self.request.write(_line(render(entry)))

    # IPushProducer, driven by the client connection's flow control.

    def pauseProducing(self) -> None:
        self.paused = True
        if self._stall_timeout is not None and self._stall is None and not self.ended:
            self._stall = self._clock.callLater(self._stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self.paused = False
        self._cancel_stall()
        if self.skipped and not self.ended:
            n, self.skipped = self.skipped, 0
            self.request.write(_line(skipped_note(n)))

    def stopProducing(self) -> None:
        # The transport is going away (its connectionLost follows, which fires
        # :attr:`done`): stop writing, and do not finish a response nobody reads.
        self._stopped = True
        self._halt()

    def _stalled(self) -> None:
        self._stall = None
        self.log.warn("a /logs follower read nothing for {t:g}s; dropping it", t=self._stall_timeout)
        abort_client(self.request)  # its connectionLost ends this follow

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    # --- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """End the response cleanly (last chunk sent) if the client is still there."""
        self._end(finish=True)

    def _client_lost(self, failure: Failure) -> None:
        self._end(finish=False)

    def _halt(self) -> None:
        """Write nothing more: unsubscribe, forget the stall timer, leave the registry."""
        if self.ended:
            return
        self.ended = True
        self._unfollow()
        self._cancel_stall()
        self._on_end(self)

    def _end(self, finish: bool) -> None:
        self._halt()
        request = self.request
        # A request whose connection is gone has no channel left.
        if finish and not self._stopped and getattr(request, "channel", None) is not None:
            request.unregisterProducer()
            if not request.finished:
                request.finish()
        if not self.done.called:
            self.done.callback(None)


class LogFollowers:
    """
    The open follow responses, so that Jano can end them all when it stops
    (or those of one ring, when its model goes away).
    """

    def __init__(self) -> None:
        self._open: set[LogFollow] = set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, follow: LogFollow) -> None:
        self._open.add(follow)

    def discard(self, follow: LogFollow) -> None:
        self._open.discard(follow)

    def close_all(self, ring: Optional[LogRing] = None) -> int:
        """
        Finish every open follow response (only those of ``ring`` when given).

        :return: how many were ended.
        """
        ending = [f for f in self._open if ring is None or f.ring is ring]
        for follow in ending:
            follow.close()
        return len(ending)


def follow_logs(request: Request, ring: LogRing, clock: IReactorTime, *,
                tail: Optional[int] = 100, followers: Optional[LogFollowers] = None,
                stall_timeout: Optional[float] = 300.0) -> Deferred[None]:
    """
    Stream ``ring``: its last ``tail`` lines (``None``: all it holds), then each
    new line, until the client leaves or ``followers.close_all()``.

    Return the result from a Klein route: it fires with ``None`` when the
    response is over (Klein then finishes it if need be) and never fails;
    cancelling it (as Klein does when the client leaves) ends the follow.

    :param followers: the registry :meth:`LogFollowers.close_all` ends.
    :param stall_timeout: drop a client that reads nothing for this long
        (``None``: never); the server's ``idle_write_timeout`` fits.
    """
    if request.method == b"HEAD":
        _plain(request)
        return succeed(None)
    registry = followers if followers is not None else LogFollowers()
    follow = LogFollow(request, ring, clock, stall_timeout, registry.discard)
    registry.add(follow)
    return follow.start(tail)
