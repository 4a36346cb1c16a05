"""
The readiness probe over HTTP: ``GET`` the health URL, answer its status.

:func:`http_probe` builds the ``probe(url)`` :class:`~jano.swap.swapper.ScriptSwapper`
polls after the script succeeded.  Only the status matters: the body is read
and thrown away (cut off past 64 KiB), and a probe that hangs fails after its
timeout.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse

__all__ = ["http_probe"]


class _Discard(Protocol):
    """Read a response body into nowhere; give up on it past ``limit`` bytes."""

    def __init__(self, done: Deferred[None], limit: int = 64 * 1024) -> None:
        self._done = done
        self._left = limit

    def dataReceived(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0 and self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._done.called:
            self._done.callback(None)


def _status_after_body(response: IResponse) -> Deferred[int]:
    protocol: _Discard

    def stop(d: Deferred[None]) -> None:
        if protocol.transport is not None:
            cast(IPushProducer, protocol.transport).stopProducing()

    done: Deferred[None] = Deferred(stop)
    protocol = _Discard(done)
    response.deliverBody(protocol)
    return done.addCallback(lambda _: response.code)


def http_probe(agent_or_treq_client: Any, *, timeout: float = 5.0,
               clock: Optional[Any] = None) -> Callable[[str], Deferred[int]]:
    """
    Build the readiness probe :class:`ScriptSwapper` calls with a health URL.

    ``probe(url)`` sends ``GET url`` (no redirects followed) and fires with the
    response's status code once the body has been read and discarded (bodies
    over 64 KiB are cut off by closing the connection; errors while reading a
    body do not matter, the status is known).  It fails on connection errors
    and with :class:`TimeoutError` when no complete answer came in ``timeout``
    seconds.

    :param agent_or_treq_client: a ``treq.client.HTTPClient`` (or anything
        with its ``get(url, **kwargs)``, such as the ``treq`` module), or an
        ``IAgent``, which is wrapped in an ``HTTPClient``.
    :param clock: ``callLater`` provider for the timeout; default: the global
        reactor, imported only when a probe runs.
    """
    if IAgent.providedBy(agent_or_treq_client):
        from treq.client import HTTPClient

        client: Any = HTTPClient(agent_or_treq_client)
    elif callable(getattr(agent_or_treq_client, "get", None)):
        client = agent_or_treq_client
    else:
        raise TypeError("http_probe needs a treq HTTPClient (or the treq module) or an IAgent, "
                        f"not {type(agent_or_treq_client).__name__}")

    def probe(url: str) -> Deferred[int]:
        time: Any = clock
        if time is None:
            from twisted.internet import reactor

            time = reactor
        d: Deferred[Any] = client.get(url, allow_redirects=False, unbuffered=True)
        d.addCallback(_status_after_body)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = time.callLater(timeout, expire)

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure) and result.check(CancelledError):
                return Failure(TimeoutError(f"no answer within {timeout:g}s"))
            return result

        return d.addBoth(settle)

    return probe
