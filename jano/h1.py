"""
Jano's own HTTP/1.1 server protocol, the one ``twistd jano`` listens with.

Model traffic is the hot path: every proxied request used to pay for
twisted.web's ``HTTPChannel`` line parser, a full ``server.Request`` with
resource traversal, and its per-write machinery, which together were most of
Jano's CPU per request.  This protocol parses a request head in a few
``find``/``split`` calls, keeps the body in memory (bounded), and answers
model traffic with :class:`ProxyRequest`, a small object with the slice of
``twisted.web.server.Request`` that :mod:`jano.proxy` uses.

Everything else (``/status``, ``/metrics``, ``/ui``, ...) is served by a real
``twisted.web.server.Request`` on the same connection, this protocol acting
as its channel (the way Twisted's HTTP/2 streams do), so Klein and the
resource tree see nothing unusual.

What it does, in HTTP/1.1 terms:

- keep-alive (HTTP/1.1 by default; HTTP/1.0 when the client asks with
  ``Connection: keep-alive`` and the answer has a length), pipelined
  requests answered in order, one at a time;
- request bodies by ``Content-Length`` or ``Transfer-Encoding: chunked``,
  held in memory and bounded by the site's ``max_body_bytes`` (413 before
  reading an announced oversized body), ``Expect: 100-continue`` answered;
- a request head over :data:`MAX_HEAD_BYTES` or :data:`MAX_HEADERS` lines gets
  431, a malformed one 400 (JSON in the caller's API shape), then the
  connection closes;
- responses framed by the ``Content-Length`` they carry, else chunked
  (close-delimited for HTTP/1.0); ``HEAD``, 1xx, 204 and 304 carry no body;
- a connection that has no request in progress for ``idle_timeout`` seconds
  (including one trickling a request head in) is closed.
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol as TypingProtocol, Sequence, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IConsumer, IDelayedCall, IProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from jano.headers import WireHeaders
from jano.routing import error_body
from jano.upstream import ChunkedDecoder
from jano.writethrough import send_now

if TYPE_CHECKING:
    from jano.api import JanoSite


class _Conn(TypingProtocol):
    """What this module uses of a TCP (or UNIX) server transport."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...

#: Bytes allowed for the request line plus all header lines.
MAX_HEAD_BYTES = 64 * 1024
#: Header lines allowed in one request.
MAX_HEADERS = 128
#: Bytes of pipelined input held while a request is being answered, beyond
#: which the connection stops being read until the answer is done.
MAX_HELD_BYTES = 64 * 1024

_NO_BODY_CODES = frozenset({204, 304})
#: RFC 9110 token characters, the only ones allowed in a header name.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class BadRequest(Exception):
    """A request the protocol answers itself and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def raw_error(status: int, message: str, path: bytes = b"/",
              kind: str = "invalid_request_error") -> bytes:
    """A whole ``Connection: close`` HTTP response for an error found before any request object exists."""
    body = error_body(path, status, message, kind)
    phrase = RESPONSES.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % (status, phrase, len(body)) + body)


def parse_head(block: bytes) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    """
    Split a request head (without its blank line) into method, target,
    version and ``(name as sent, value)`` pairs.

    Strict where leniency enables request smuggling: no whitespace before the
    colon, no obsolete line folding, no control characters in names.
    """
    lines = block.split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505 if version.startswith(b"HTTP/") else 400,
                         "only HTTP/1.0 and HTTP/1.1 are supported")
    if not method or not method.isalpha() or not target or target[0:1] not in b"/*" and not target.startswith(b"http"):
        raise BadRequest(400, "malformed request line")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
    pairs = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TCHAR):
            raise BadRequest(400, "malformed header line")
        pairs.append((name, value.strip(b" \t")))
    return method, target, version, pairs


class ProxyRequest:
    """
    One request to be forwarded, with the part of ``twisted.web.server.Request``
    that :mod:`jano.proxy` and :class:`jano.api.JanoResource` use: the parsed
    request, a ``responseHeaders`` to fill, ``write``/``finish``,
    ``notifyFinish``, and producer registration on the client connection.
    """

    prepath: list[bytes] = []
    content = None
    startedWriting = False
    finished = False
    defaultContentType: Optional[bytes] = None

    def __init__(self, channel: "HTTP11Server", method: bytes, uri: bytes, version: bytes,
                 headers: Headers, body: bytes) -> None:
        self.channel: Optional[HTTP11Server] = channel
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.clientproto = version
        self.requestHeaders = headers
        self.body = body
        self.responseHeaders: Headers = WireHeaders()
        self.code = 200
        self.code_message: Optional[bytes] = None
        self._chunked = False
        self._no_body = False
        self._finish_waiters: list[Deferred[None]] = []
        self._lost_callbacks: list[Callable[[Failure], object]] = []

    # --- the request --------------------------------------------------------------------

    def getHeader(self, name: bytes) -> Optional[bytes]:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> IAddress:
        assert self.channel is not None
        return self.channel.getPeer()

    def watch_lost(self, callback: Callable[[Failure], object]) -> None:
        """Call ``callback`` with the reason if the connection is lost before :meth:`finish`."""
        self._lost_callbacks.append(callback)

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._finish_waiters.append(d)
        return d

    # --- the response -------------------------------------------------------------------

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        self.code = code
        self.code_message = message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def _head(self) -> bytes:
        """The status line and headers, choosing the framing."""
        self.startedWriting = True
        channel = self.channel
        assert channel is not None
        code = self.code
        headers = self.responseHeaders
        if self.method == b"HEAD" or code in _NO_BODY_CODES or code < 200:
            self._no_body = True
        elif not headers.hasHeader(b"content-length"):
            if self.clientproto == b"HTTP/1.1":
                headers.setRawHeaders(b"transfer-encoding", [b"chunked"])
                self._chunked = True
            else:
                channel.persistent = False
        if not channel.persistent:
            headers.setRawHeaders(b"connection", [b"close"])
        elif self.clientproto == b"HTTP/1.0":
            headers.setRawHeaders(b"connection", [b"keep-alive"])
        phrase = self.code_message or RESPONSES.get(code, b"Unknown")
        out = [b"%s %d %s\r\n" % (self.clientproto, code, phrase)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                out.append(b"%s: %s\r\n" % (name, value))
        out.append(b"\r\n")
        return b"".join(out)

    def write(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or self.finished:
            return  # the client is gone: nothing to write to
        if not self.startedWriting:
            head = self._head()
            if self._no_body or not data:
                channel.send(head)
                return
            channel.send(head + (b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data))
            return
        if self._no_body or not data:
            return
        channel.send(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def finish(self) -> None:
        channel = self.channel
        if channel is None or self.finished:
            return
        if not self.startedWriting:
            channel.send(self._head() + (b"0\r\n\r\n" if self._chunked else b""))
        elif self._chunked:
            channel.send(b"0\r\n\r\n")
        self.finished = True
        self._lost_callbacks = []
        if self._finish_waiters:
            waiters, self._finish_waiters = self._finish_waiters, []
            for d in waiters:
                d.callback(None)
        channel.request_done(self)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.channel is not None:
            self.channel.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.channel is not None:
            self.channel.unregisterProducer()

    def connectionLost(self, reason: Failure) -> None:
        self.channel = None
        waiters, self._finish_waiters = self._finish_waiters, []
        for d in waiters:
            d.errback(reason)
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for callback in callbacks:
            callback(reason)


@implementer(IConsumer)
class HTTP11Server(Protocol):
    """One client connection.  See the module docstring."""

    log = Logger()
    factory: "JanoHTTPFactory"
    persistent = True
    closing = False

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: Optional[tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]] = None
        self._need = 0  # body bytes expected (Content-Length)
        self._chunked: Optional[ChunkedDecoder] = None  # a chunked request body being read
        self._chunk_parts: list[bytes] = []
        self._chunk_size = 0
        self._current: Optional[Any] = None  # the request being answered
        self._parsing = False
        self._paused = False
        self.idle_since = 0.0

    #: The transport, typed for what this module uses of it.
    conn: Optional[_Conn] = None

    # --- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self.conn = cast(_Conn, transport)
        self._peer = transport.getPeer()  # a new address object per call otherwise
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)  # responses are written whole; stream chunks must not wait
        self.idle_since = self.factory.clock.seconds()
        self.factory.connection_opened(self)

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        self.factory.connection_closed(self)
        current, self._current = self._current, None
        if current is not None:
            current.connectionLost(reason)

    def send(self, data: bytes) -> None:
        if self.conn is not None:
            send_now(self.conn, data)

    def close(self) -> None:
        """Write what is pending, then close; read nothing more."""
        self.closing = True
        self._buf.clear()
        if self.transport is not None:
            self.transport.loseConnection()

    def idle_expired(self) -> None:
        """The factory's sweep found this connection without a request in progress for too long."""
        self.close()

    # --- input --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self._buf += data
        if self._current is not None:
            conn = self.conn
            if len(self._buf) > MAX_HELD_BYTES and not self._paused and conn is not None:
                self._paused = True
                conn.pauseProducing()
            return
        self._parse()

    def _parse(self) -> None:
        if self._parsing:
            return
        self._parsing = True
        try:
            while self._current is None and not self.closing and self._buf:
                if not self._step():
                    break
        except BadRequest as e:
            self._refuse(e)
        finally:
            self._parsing = False

    def _step(self) -> bool:
        """Advance the parse; True if it made progress and may continue."""
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            skip = 4
            if end < 0:
                end = buf.find(b"\n\n")
                skip = 2
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
                return False
            if end > MAX_HEAD_BYTES:
                raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            if end == 0 or buf[0] in (13, 10):  # blank lines before a request are ignored
                stripped = buf.lstrip(b"\r\n")
                del buf[:len(buf) - len(stripped)]
                return bool(buf)
            head = parse_head(bytes(buf[:end]))
            del buf[:end + skip]
            self._start_body(head)
        decoder = self._chunked
        if decoder is not None:
            piece = decoder.feed(bytes(buf))
            buf.clear()
            if decoder.error is not None:
                raise BadRequest(400, f"malformed chunked body: {decoder.error}")
            self._chunk_size += len(piece)
            if self._chunk_size > self.factory.max_body_bytes:
                raise BadRequest(413, f"request body larger than {self.factory.max_body_bytes} bytes")
            self._chunk_parts.append(piece)
            if not decoder.done:
                return False
            buf += decoder.rest
            body = b"".join(self._chunk_parts)
            self._chunked = None
            self._chunk_parts = []
        else:
            if len(buf) < self._need:
                return False
            body = bytes(buf[:self._need])
            del buf[:self._need]
        parsed = self._head
        self._head = None
        assert parsed is not None
        self._dispatch(parsed, body)
        return True

    def _start_body(self, head: tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]) -> None:
        method, target, version, pairs = head
        limit = self.factory.max_body_bytes
        length: Optional[bytes] = None
        chunked = False
        expect = False
        self.persistent = version == b"HTTP/1.1"
        for spelled, value in pairs:
            name = spelled.lower()
            if name == b"content-length":
                if length is not None and value != length:
                    raise BadRequest(400, "conflicting Content-Length headers")
                length = value
            elif name == b"transfer-encoding":
                codings = [c.strip().lower() for c in value.split(b",")]
                if codings[-1] != b"chunked" or len(codings) > 1:
                    raise BadRequest(501, "only the chunked transfer coding is supported")
                chunked = True
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    self.persistent = False
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    self.persistent = True  # HTTP/1.0 keep-alive (ab -k), if the answer has a length
            elif name == b"expect" and value.lower() == b"100-continue":
                expect = True
        self._head = head
        if chunked:
            if length is not None:
                self.persistent = False  # both framings: answer, then close (RFC 9112 6.1)
            self._chunked = ChunkedDecoder()
            self._chunk_parts = []
            self._chunk_size = 0
            self._need = 0
        elif length is not None:
            if not length.isdigit():
                raise BadRequest(400, "malformed Content-Length")
            self._need = int(length)
            if self._need > limit:
                raise BadRequest(413, f"request body larger than {limit} bytes")
        else:
            self._need = 0
        if expect and version == b"HTTP/1.1" and (chunked or self._need):
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _refuse(self, error: BadRequest) -> None:
        path = b"/"
        if self._head is not None:
            path = self._head[1].split(b"?", 1)[0]
        else:
            first = bytes(self._buf[:1024]).split(b" ", 2)
            if len(first) > 1:
                path = first[1]
        self._buf.clear()
        self._head = None
        self._chunked = None
        self.send(raw_error(error.status, error.message, path))
        self.close()

    # --- dispatch -----------------------------------------------------------------------

    def _dispatch(self, head: tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]],
                  body: bytes) -> None:
        method, target, version, pairs = head
        headers = WireHeaders.from_pairs(pairs)
        factory = self.factory
        resource = factory.site.resource
        path = target.split(b"?", 1)[0]
        accept = headers.getRawHeaders(b"accept")
        if resource.is_own(method, path, accept[-1] if accept else None):
            self._serve_own(method, target, version, headers, body)
            return
        request = ProxyRequest(self, method, target, version, headers, body)
        self._current = request
        try:
            resource.proxy(request, path)
        except Exception:
            self.log.failure("proxying {method} {path} failed", method=method, path=path)
            if not request.startedWriting and self._current is request:
                request.setResponseCode(500)
                request.responseHeaders = WireHeaders({b"content-type": [b"application/json"]})
                request.write(error_body(path, 500, "internal error", "internal_error"))
                request.finish()
            elif self.conn is not None:
                self.conn.abortConnection()

    def _serve_own(self, method: bytes, target: bytes, version: bytes, headers: Headers,
                   body: bytes) -> None:
        """Jano's own routes: a real ``twisted.web`` request, with this protocol as its channel."""
        request = server.Request(self)
        request.requestHeaders = Headers(dict(headers.getAllRawHeaders()))
        request.content = BytesIO(body)
        self._current = request
        request.requestReceived(method, target, version)

    def request_done(self, request: object) -> None:
        """A response has been written in full: close, or go on to the next request."""
        if request is not self._current:
            return
        self._current = None
        if not self.persistent:
            self.close()
            return
        self.idle_since = self.factory.clock.seconds()
        if self._paused and self.conn is not None:
            self._paused = False
            self.conn.resumeProducing()
        if self._buf:
            self._parse()

    # --- the channel interface of twisted.web.http.Request (own routes) ------------------

    @property
    def site(self) -> "JanoSite":
        return self.factory.site

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return False

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        request = self._current
        method = getattr(request, "method", b"GET")
        framed = (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
                  or method == b"HEAD" or int(code) in _NO_BODY_CODES)
        if not framed:
            self.persistent = False
        if not self.persistent:
            headers.setRawHeaders(b"connection", [b"close"])
        elif version == b"HTTP/1.0":
            headers.setRawHeaders(b"connection", [b"keep-alive"])
        out = [b"%s %s %s\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                out.append(b"%s: %s\r\n" % (name, value))
        out.append(b"\r\n")
        self.send(b"".join(out))

    def write(self, data: bytes) -> None:
        self.send(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.send(b"".join(data))

    def requestDone(self, request: object) -> None:
        self.request_done(request)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.conn is not None:
            self.conn.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.conn is not None:
            self.conn.unregisterProducer()

    def loseConnection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class JanoHTTPFactory(ServerFactory):
    """
    Builds :class:`HTTP11Server` connections for a :class:`jano.api.JanoSite`
    (its resource, its ``max_body_bytes``), and closes idle connections.
    """

    protocol = HTTP11Server  # type: ignore[assignment]

    def __init__(self, site: "JanoSite", clock: IReactorTime, *,
                 idle_timeout: float = 60.0) -> None:
        self.site = site
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.connections: set[HTTP11Server] = set()
        self._sweep: Optional[IDelayedCall] = None

    @property
    def max_body_bytes(self) -> int:
        return self.site.max_body_bytes

    def connection_opened(self, proto: HTTP11Server) -> None:
        self.connections.add(proto)
        if self._sweep is None:
            self._sweep = self.clock.callLater(self._period(), self._sweep_idle)

    def connection_closed(self, proto: HTTP11Server) -> None:
        self.connections.discard(proto)

    def _period(self) -> float:
        return max(0.5, min(5.0, self.idle_timeout / 4))

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.clock.seconds()
        for proto in list(self.connections):
            if proto._current is None and now - proto.idle_since >= self.idle_timeout:
                proto.idle_expired()
        if self.connections:
            self._sweep = self.clock.callLater(self._period(), self._sweep_idle)

    def log(self, request: object) -> None:
        """``twisted.web`` requests call this to log themselves: access logs are off."""

    def stopFactory(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None


__all__ = ["HTTP11Server", "JanoHTTPFactory", "ProxyRequest", "BadRequest", "parse_head",
           "raw_error", "MAX_HEAD_BYTES", "MAX_HEADERS"]
