"""
What every :class:`~jano.forward.exchange.Exchange` shares: the agent, the
seams, the clock, and the watches no single request can keep itself.

* one timer for all requests waiting for response headers (504 past
  ``upstream_timeout``);
* one timer for all bodies streaming (``upstream_stalled`` when no byte came
  for ``stall_timeout``);
* each model's streak of stalls and header timeouts: ``stall_threshold`` in a
  row mark it *stalled*: its waiting requests fail fast with 503 and new ones
  are refused for ``stall_cooldown`` seconds; after that one request may try
  again (a half-open circuit), and the first that completes clears it;
* the live requests, for ``GET /queue``.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from twisted.web.server import Request

from jano.errors import Refusal, error_body
from jano.interfaces import Admission, UsageSink
from jano.records import LiveRequest, ModelSpec, UsageRecord

__all__ = ["Forwarder", "write_error", "abort_client", "cut_client", "Watched"]

Phase = Literal["new", "queued", "waiting_headers", "streaming", "done"]


class Watched(Protocol):
    """What the forwarder's watches need of an exchange."""

    id: int
    phase: Phase
    caller: Optional[str]

    def live(self) -> LiveRequest: ...

    def headers_timed_out(self) -> None: ...

    def stalled(self) -> None: ...

    def last_byte_at(self) -> Optional[float]: ...


def write_error(request: Request, path: bytes, status: int, message: str, kind: str,
                code: Optional[str] = None, retry_after: Optional[float] = None) -> None:
    """
    Answer a request with an API-shaped JSON error and finish it.

    :param path: the path below Jano's mount point, which picks the error's shape.
    """
    body = error_body(path, status, message, kind, code)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    if retry_after is not None:
        request.responseHeaders.setRawHeaders(
            b"retry-after", [str(max(1, int(retry_after + 0.999))).encode()])
    request.write(body)
    request.finish()


def abort_client(request: Request) -> None:
    """Drop the client's connection at once, unsent bytes and all (a client that reads nothing)."""
    transport = request.transport
    if transport is not None:
        cast(ITCPTransport, transport).abortConnection()


def cut_client(request: Request, clock: IReactorTime, grace: Optional[float]) -> None:
    """
    Close the client's connection once what was relayed is sent, without
    ending the response: a chunked body with no last chunk, or fewer bytes
    than its ``Content-Length``, is how HTTP says "truncated".  A client that
    has not read it all ``grace`` seconds later is dropped.
    """
    transport = request.transport
    if transport is None:
        return
    transport.loseConnection()
    if grace is not None:
        clock.callLater(grace, abort_client, request)  # a no-op once it is closed


class Forwarder:
    """
    Everything an exchange needs, shared by all of them.

    :param request_id_header: the response header carrying each request's id
        (``None``: none is added).
    """

    log = Logger()

    def __init__(self, agent: IAgent, clock: IReactorTime, admission: Admission,
                 recorder: UsageSink, *, upstream_timeout: float = 600.0,
                 idle_write_timeout: Optional[float] = 300.0,
                 strip_authorization: bool = False, stall_timeout: float = 120.0,
                 stall_threshold: int = 3, stall_cooldown: float = 30.0,
                 request_id_header: Optional[bytes] = b"X-Jano-Request-Id") -> None:
        self.agent = agent
        self.clock = clock
        self.admission = admission
        self.recorder = recorder
        self.upstream_timeout = upstream_timeout
        self.idle_write_timeout = idle_write_timeout
        self.strip_authorization = strip_authorization
        self.stall_timeout = stall_timeout
        self.stall_threshold = stall_threshold
        self.stall_cooldown = stall_cooldown
        self.request_id_header = request_id_header
        # Exchanges waiting for response headers, with their deadlines; one
        # timer for the earliest rather than one per request.
        self._deadlines: dict[Watched, float] = {}
        self._deadline_call: Optional[IDelayedCall] = None
        #: Live exchanges by id, in arrival order.
        self.live: dict[int, Watched] = {}
        self._stall_call: Optional[IDelayedCall] = None
        #: Stalls and header timeouts in a row, by model.
        self._streak: dict[str, int] = {}
        #: Stalled models: until when they are refused, and why.
        self.stalled: dict[str, tuple[float, str]] = {}
        #: The replica a request that needs no admission goes to, for a model
        #: served by replicas (see :meth:`jano.scheduler.replicas.Replicas.instance_for`).
        self.instance_for: Callable[[ModelSpec], ModelSpec] = lambda spec: spec

    # --- live requests --------------------------------------------------------------------

    def started(self, exchange: Watched) -> None:
        self.live[exchange.id] = exchange

    def ended(self, exchange: Watched) -> None:
        self.live.pop(exchange.id, None)
        self._deadlines.pop(exchange, None)

    def live_requests(self) -> list[LiveRequest]:
        return [e.live() for e in self.live.values()]

    def queued_by(self, caller: str) -> int:
        """Requests of ``caller`` waiting in the scheduler's queues now."""
        return sum(1 for e in self.live.values() if e.phase == "queued" and e.caller == caller)

    # --- response headers due -------------------------------------------------------------

    def await_headers(self, exchange: Watched) -> None:
        """Time ``exchange`` out unless :meth:`got_headers` comes first."""
        self._deadlines[exchange] = self.clock.seconds() + self.upstream_timeout
        if self._deadline_call is None:
            self._deadline_call = self.clock.callLater(self.upstream_timeout, self._expire)

    def got_headers(self, exchange: Watched) -> None:
        self._deadlines.pop(exchange, None)
        self._watch_streams()

    def _expire(self) -> None:
        self._deadline_call = None
        now = self.clock.seconds()
        due = [e for e, at in self._deadlines.items() if at <= now]
        for exchange in due:
            del self._deadlines[exchange]
        if self._deadlines:  # a reload may have shortened the timeout: take the earliest
            wake = min(self._deadlines.values())
            self._deadline_call = self.clock.callLater(max(0.0, wake - now), self._expire)
        for exchange in due:
            exchange.headers_timed_out()

    # --- streams that stall ---------------------------------------------------------------

    def _watch_streams(self) -> None:
        if self._stall_call is None and self.stall_timeout > 0:
            self._stall_call = self.clock.callLater(self.stall_timeout, self._sweep)

    def _sweep(self) -> None:
        """End every stream that sent nothing for ``stall_timeout``; come back for the next."""
        self._stall_call = None
        now = self.clock.seconds()
        limit = self.stall_timeout
        wake: Optional[float] = None
        stalled = []
        for e in self.live.values():
            if e.phase != "streaming":
                continue
            last = e.last_byte_at()
            if last is None or last + limit <= now:
                stalled.append(e)
            elif wake is None or last + limit < wake:
                wake = last + limit
        for e in stalled:
            e.stalled()
        if wake is not None or any(e.phase == "streaming" for e in self.live.values()):
            delay = max(1.0, (wake - now) if wake is not None else limit)
            self._stall_call = self.clock.callLater(delay, self._sweep)

    # --- the stalled circuit --------------------------------------------------------------

    def failed(self, model: str, cause: str) -> None:
        """A stall or a header timeout of ``model``; enough in a row mark it stalled."""
        streak = self._streak.get(model, 0) + 1
        self._streak[model] = streak
        if streak < self.stall_threshold or not self.stall_threshold:
            return
        until = self.clock.seconds() + self.stall_cooldown
        reason = f"stalled: the last {streak} requests {cause}"
        self.stalled[model] = (until, reason)
        self.log.warn("{model} {reason}; refusing its requests for {cooldown:g}s",
                      model=model, reason=reason, cooldown=self.stall_cooldown)
        self.admission.mark_down(model, reason, self.stall_cooldown)

    def unreachable(self, replica: str) -> None:
        """
        A replica refused the connection (or could not be reached): refuse it
        for ``stall_cooldown``, so that its queued requests go to the other
        replicas now, not one by one to a server that is gone.
        """
        self.log.warn("replica {replica} is unreachable; its queue goes to the other replicas "
                      "for {cooldown:g}s", replica=replica, cooldown=self.stall_cooldown)
        self.admission.mark_down(replica, "its server could not be reached",
                                 self.stall_cooldown)

    def succeeded(self, model: str) -> None:
        if self._streak.pop(model, 0) and model in self.stalled:
            self.log.info("{model} answered again: no longer stalled", model=model)
        self.stalled.pop(model, None)

    def stalled_now(self) -> dict[str, tuple[float, str]]:
        """Models stalled now (within their cooldown), for telemetry."""
        now = self.clock.seconds()
        return {m: v for m, v in self.stalled.items() if v[0] > now}

    # --- answers of Jano's own --------------------------------------------------------------

    def refuse(self, request: Request, path: bytes, refusal: Refusal, arrived_at: float,
               model: Optional[str] = None, stream: bool = False,
               retry_after: Optional[float] = None, request_id: Optional[int] = None,
               caller: Optional[str] = None) -> None:
        """Answer with ``refusal`` and record the request as rejected."""
        rid = request_id if request_id is not None else self.recorder.next_request_id()
        if self.request_id_header:
            request.responseHeaders.setRawHeaders(self.request_id_header, [b"%d" % rid])
        write_error(request, path, refusal.status, refusal.message, refusal.kind,
                    retry_after=retry_after)
        self.recorder.queue_rejected(refusal.reason)
        self.recorder.request_finished(UsageRecord(
            id=rid, model=model,
            method=request.method.decode("ascii", "replace"),
            path=path.decode("utf-8", "replace"), status=refusal.status,
            stream=stream, arrived_at=arrived_at, queue_wait=None, waited_for_swap=False,
            ttfb=None, duration=self.clock.seconds() - arrived_at, usage=None,
            outcome="rejected", caller=caller))
