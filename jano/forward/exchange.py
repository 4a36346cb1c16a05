"""
Forwarding: one :class:`Exchange` per proxied request, from admission to the
last byte, and the :class:`Forwarder` that all of them share.

The bytes forwarded are the bytes received.  Forwarding goes through an
``IAgent`` (Twisted's ``Agent`` with a persistent pool, see
:mod:`jano.forward.agent`) rather than ``treq.request``: treq wraps every call
in redirect-following, cookie-keeping and gzip-decoding agents, and a
transparent proxy must do none of those.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from jano.errors import Draining, ModelUnavailable, QueueFull, Refusal
from jano.forward.forwarder import Forwarder, Phase, abort_client, cut_client, write_error
from jano.forward.headers import copy_response_headers, upstream_headers
from jano.forward.tee import StreamTee
from jano.records import LiveRequest, ModelSpec, Outcome, Ticket, Usage, UsageRecord
from jano.usage import TailBuffer, extract_usage, with_router_timing

#: Bytes of each body's tail kept for token counting.
TAIL_BYTES = 64 * 1024
#: Seconds after the forward within which a replica closing the connection
#: without an answer gets the request queued once more (it died as the
#: request reached it); later, the server may have worked on it.
LOST_RETRY = 2.0

_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go.

    ``twisted.web.client.FileBodyProducer`` would hand the bytes to a
    cooperator task and cost extra reactor turns per request.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Exchange:
    """
    One proxied request, from admission to the last byte.

    Phases: ``queued`` (waiting for the scheduler), ``waiting_headers``
    (forwarded, no response yet), ``streaming`` (body flowing), ``done``.  A
    client disconnect in any phase cancels what that phase is waiting on.

    :param path: the path below Jano's mount point (error shapes, records).
    :param target: what is appended to the model's upstream URL: the path
        and query below the mount point, as received.

    ``spec`` is the model the client named; :attr:`instance` the one the
    request goes to: the scheduler's choice (``Ticket.served_by``: a replica,
    when replicas serve the model), else ``spec`` itself.  Clients, usage
    records and metrics see ``spec``'s name; the stalled circuit counts per
    instance.  A replica that refuses the connection never saw the request:
    the replica is refused for a while and the request queued again (on
    another replica, at most once per replica), instead of answering 502.
    """

    log = Logger()

    def __init__(self, fwd: Forwarder, request: Request, spec: ModelSpec, body: bytes,
                 admit: bool, stream_hint: bool, arrived_at: float, path: bytes,
                 target: bytes, caller: Optional[str] = None) -> None:
        self.fwd = fwd
        self.caller = caller
        self.path = path
        self.target = target
        #: Fires (with ``None``) once the request has ended, in any way.  The
        #: caller cancels it when the client goes away (Klein does, for the
        #: Deferred a route returns): that is how the exchange learns of it.
        self.done: Deferred[None] = Deferred(lambda _: self._client_lost())
        self.request = request
        self.spec = spec
        #: Where the request goes (see the class docstring).
        self.instance = spec
        self.body = body
        self.admit = admit
        self.stream = stream_hint
        self.arrived_at = arrived_at
        #: The id of this request in ``/usage``, ``/queue`` and the response header.
        self.id = fwd.recorder.next_request_id()
        self.phase: Phase = "new"
        self.ticket: Optional[Ticket] = None
        self._forwarded_at: Optional[float] = None
        self._streaming_since: Optional[float] = None
        self._stalled = False
        self.status: Optional[int] = None
        self.ttfb: Optional[float] = None
        self.client_gone = False
        self._waiting: Optional[Deferred[object]] = None
        self._timed_out = False
        self._tee: Optional[StreamTee] = None
        self._tail: Optional[TailBuffer] = None
        self._content_type: Optional[bytes] = None
        #: Times the request was queued again after its replica refused the connection
        #: (or, once, lost it before answering).
        self._retries = 0
        self._lost_once = False
        self._first_arrival: Optional[float] = None

    # --- phases -------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Queue (or forward at once); the result is :attr:`done`."""
        fwd = self.fwd
        fwd.started(self)
        if fwd.request_id_header:
            self.request.responseHeaders.setRawHeaders(fwd.request_id_header,
                                                       [b"%d" % self.id])
        if not self.admit:
            self._forward(None)
            return self.done
        self.phase = "queued"
        d = self.fwd.admission.admit(self.spec.name)
        self._waiting = d  # type: ignore[assignment]
        d.addCallbacks(self._forward, self._not_admitted)
        return self.done

    def _not_admitted(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError) and self.client_gone:
            self._end("client_disconnected")
            return
        if failure.check(QueueFull):
            exc = failure.value
            self._refuse(Refusal(429, f"too many requests queued for model {self.spec.name!r}",
                                 "rate_limit_error", "queue_full"),
                         getattr(exc, "retry_after", None))
        elif failure.check(ModelUnavailable):
            exc = failure.value
            self._refuse(Refusal(503, f"model {self.spec.name!r} is unavailable: "
                                      f"{getattr(exc, 'cause', exc)}",
                                 "unavailable_error", "model_down"),
                         getattr(exc, "retry_after", None))
        elif failure.check(Draining):
            self._refuse(Refusal(503, "Jano is shutting down", "unavailable_error", "draining"),
                         5.0)
        else:
            self.log.failure("admission failed for {model}", failure, model=self.spec.name)
            self._refuse(Refusal(500, "internal error while queueing the request",
                                 "internal_error", "other"), None)

    def _refuse(self, refusal: Refusal, retry_after: Optional[float]) -> None:
        if self.client_gone:
            self._end("client_disconnected")
            return
        self.phase = "done"
        self.fwd.refuse(self.request, self.path, refusal, self.arrived_at, self.spec.name,
                        self.stream, retry_after, request_id=self.id)
        self._settle()

    def _forward(self, ticket: Optional[Ticket]) -> None:
        self._waiting = None
        self.ticket = ticket
        if self.client_gone:
            self._end("client_disconnected")
            return
        if ticket is not None and self._retries:
            assert self._first_arrival is not None
            ticket.requeued_at = ticket.arrived_at
            ticket.arrived_at = self._first_arrival
            ticket.failovers += self._retries
        if ticket is not None and ticket.served_by is not None:
            self.instance = ticket.served_by
        elif self.spec.replicas:
            self.instance = self.fwd.instance_for(self.spec)
        self.phase = "waiting_headers"
        self._forwarded_at = self.fwd.clock.seconds()
        request = self.request
        addr = request.getClientAddress()
        headers = upstream_headers(request.requestHeaders, getattr(addr, "host", None),
                                   self.fwd.strip_authorization)
        url = self.instance.upstream.encode("ascii") + self.target
        producer = BytesProducer(self.body) if self.body or request.method in (
            b"POST", b"PUT", b"PATCH") else None
        d = self.fwd.agent.request(request.method, url, headers, producer)
        self._waiting = d  # type: ignore[assignment]
        self.fwd.await_headers(self)
        d.addCallbacks(self._response, self._upstream_failed)

    # --- what the forwarder's watches see -----------------------------------------------

    def live(self) -> LiveRequest:
        dispatched = self.ticket.dispatched_at if self.ticket is not None else self._forwarded_at
        return LiveRequest(self.id, self.spec.name, self.phase, self.arrived_at, dispatched,
                           self.caller)

    def last_byte_at(self) -> Optional[float]:
        tee = self._tee
        last = tee.last_at if tee is not None else None
        return last if last is not None else self._streaming_since

    def headers_timed_out(self) -> None:
        self._timed_out = True
        if self._waiting is not None:
            self._waiting.cancel()

    def stalled(self) -> None:
        """No body byte for ``stall_timeout``: give the upstream up, cut the client."""
        if self.phase != "streaming" or self._tee is None:
            return
        self._stalled = True
        self.log.warn("{model}: no body byte for {t:g}s; dropping the upstream request",
                      model=self.instance.name, t=self.fwd.stall_timeout)
        self._tee.stop_upstream()  # its end comes back through _body_ended

    def _response(self, response: IResponse) -> None:
        self._waiting = None
        self.fwd.got_headers(self)
        self.phase = "streaming"
        now = self.fwd.clock.seconds()
        self._streaming_since = now
        self.ttfb = now - self.arrived_at
        self.status = response.code
        ctype = response.headers.getRawHeaders(b"content-type", [None])[0]
        self._content_type = ctype
        if ctype is not None:
            self.stream = ctype.split(b";", 1)[0].strip().lower() in _STREAM_TYPES
        encoding = response.headers.getRawHeaders(b"content-encoding", [b"identity"])[0]
        if encoding.strip().lower() == b"identity":
            self._tail = TailBuffer(TAIL_BYTES)
        if not self.client_gone:
            copy_response_headers(response, self.request)
        self._tee = StreamTee(self.request, self._tail, self.fwd.clock, self._body_ended,
                              stall_timeout=self.fwd.idle_write_timeout,
                              on_stall=self._client_stalled)
        if self.client_gone:
            self._tee.abort()
        response.deliverBody(self._tee)

    def _upstream_failed(self, failure: Failure) -> None:
        self._waiting = None
        self.fwd.got_headers(self)
        if self.client_gone:
            self._end("client_disconnected")
            return
        name = self.spec.name
        instance = self.instance
        if self._timed_out:
            status, msg = 504, (f"upstream for model {name!r} sent no response within "
                                f"{self.fwd.upstream_timeout:g}s")
            self.fwd.failed(instance.name,
                            f"got no response headers within {self.fwd.upstream_timeout:g}s")
        elif failure.check(ConnectionRefusedError, ConnectError, DNSLookupError):
            status, msg = 502, f"upstream for model {name!r} refused the connection"
            if instance.serves is not None:  # its queue may go to the other replicas
                self.fwd.unreachable(instance.name)
                if self._queue_again("refused the connection"):
                    return
        elif failure.check(ResponseNeverReceived, RequestTransmissionFailed):
            status, msg = 502, f"upstream for model {name!r} closed the connection without answering"
            # A replica's server dying (or closing a pooled connection as it was
            # reused) as the request reached it, before any byte of an answer: the
            # client has seen nothing, so the request is queued once more.  The
            # choice may pick the same replica: a server that died refuses the
            # connection (and is left for the others then), one that closed an
            # idle connection answers.  Not after LOST_RETRY: by then the server
            # may have worked on it (its own timeout ending a long generation).
            if (instance.serves is not None and not self._lost_once and self._forwarded_at
                    is not None and self.fwd.clock.seconds() - self._forwarded_at <= LOST_RETRY):
                self._lost_once = True
                if self._queue_again("gave no answer"):
                    return
        else:
            status, msg = 502, f"upstream for model {name!r} failed"
        # The detail (which may name the upstream's address) goes to the log only.
        self.log.warn("{method} {path} -> {status}: {msg} ({detail})", method=self.request.method,
                      path=self.path, status=status, msg=msg, detail=failure.getErrorMessage())
        self.status = status
        write_error(self.request, self.path, status, msg, "upstream_error")
        self._end("upstream_error")

    def _queue_again(self, why: str) -> bool:
        """Queue the request again (no answer came from its replica); false when it may not."""
        if (not self.admit or self.ticket is None
                or self._retries >= len(self.spec.replicas) - 1 + self._lost_once):
            return False
        self._retries += 1
        ticket, self.ticket = self.ticket, None
        if self._first_arrival is None:
            self._first_arrival = ticket.arrived_at
        self.fwd.admission.release(ticket)
        self.log.info("{model}: replica {replica} {why}; queueing the request again",
                      model=self.spec.name, replica=self.instance.name, why=why)
        self.instance = self.spec
        self.phase = "queued"
        d = self.fwd.admission.admit(self.spec.name)
        self._waiting = d  # type: ignore[assignment]
        d.addCallbacks(self._forward, self._not_admitted)
        return True

    def _body_ended(self, completed: bool, first_at: Optional[float], last_at: Optional[float],
                    nbytes: int) -> None:
        if self.client_gone:
            self._end("client_disconnected")
            return
        if not completed:
            # Cut the client's connection too, as a reverse proxy does: a cleanly
            # ended response would pass the truncation off as complete.
            if self._stalled:
                self.fwd.failed(self.instance.name,
                                f"sent no body byte for {self.fwd.stall_timeout:g}s")
            else:
                self.log.warn("{model}: upstream body ended early after {n} bytes; "
                              "dropping the client connection", model=self.instance.name,
                              n=nbytes)
            # Klein must not finish the response either: :attr:`done` stays
            # unfired until the connection is gone (Klein then cancels it).
            self._end("upstream_stalled" if self._stalled else "upstream_error", settle=False)
            cut_client(self.request, self.fwd.clock, self.fwd.idle_write_timeout)
            return
        self.request.finish()
        usage: Optional[Usage] = None
        if self._tail is not None and nbytes:
            ctype = self._content_type.decode("latin-1") if self._content_type else None
            usage = extract_usage(self._tail.getvalue(), ctype, truncated=self._tail.truncated)
            if usage is not None and self.stream:
                usage = with_router_timing(usage, first_at, last_at)
        self.fwd.succeeded(self.instance.name)
        self._end("completed", usage)

    def _client_stalled(self) -> None:
        """The client read nothing for ``idle_write_timeout``: free its connection and the upstream."""
        self.log.warn("{model}: client read nothing for {t:g}s; dropping it",
                      model=self.spec.name, t=self.fwd.idle_write_timeout)
        abort_client(self.request)  # the caller then cancels :attr:`done` -> _client_lost

    def _client_lost(self) -> None:
        if self.phase == "done":
            return
        self.client_gone = True
        self.fwd.recorder.client_disconnected(self.spec.name, self.phase)
        if self._waiting is not None:
            self._waiting.cancel()
        elif self._tee is not None:
            self._tee.abort()

    def _end(self, outcome: Outcome, usage: Optional[Usage] = None, settle: bool = True) -> None:
        if self.phase == "done":
            return
        self.phase = "done"
        self.fwd.ended(self)
        self._tail = None
        if self.ticket is not None:
            self.fwd.admission.release(self.ticket)
        now = self.fwd.clock.seconds()
        ticket = self.ticket
        self.fwd.recorder.request_finished(UsageRecord(
            id=self.id, model=self.spec.name,
            method=self.request.method.decode("ascii", "replace"),
            path=self.path.decode("utf-8", "replace"),
            status=self.status, stream=self.stream, arrived_at=self.arrived_at,
            queue_wait=ticket.queue_wait if ticket is not None else (0.0 if not self.admit else None),
            waited_for_swap=bool(ticket and ticket.waited_for_swap), ttfb=self.ttfb,
            duration=now - self.arrived_at, usage=usage, outcome=outcome, caller=self.caller))
        if settle:
            self._settle()

    def _settle(self) -> None:
        # The web layer may have cancelled :attr:`done` when the client left.
        if not self.done.called:
            self.done.callback(None)
