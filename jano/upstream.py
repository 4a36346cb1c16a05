"""
A lean HTTP/1.1 client for talking to local model servers.

Twisted's ``Agent`` with an ``HTTPConnectionPool`` is general: TLS, proxies,
body producers of every kind, redirects and more layered on top.  Its price
is paid on every request, and profiling showed it as a large share of Jano's
CPU.  Jano forwards plain HTTP/1.1 to a handful of local backends with
request bodies already in memory, so :class:`UpstreamAgent` does only that:

- one ``transport.write`` per request;
- a LIFO keep-alive pool per ``(host, port)`` with an idle timeout;
- a response parser that for a typical streamed chunk (one socket read, one
  chunk) costs a couple of ``find()`` calls and slices, and hands each
  read's payload to the body consumer at once, never buffering a body.

It provides the slice of :class:`~twisted.web.iweb.IAgent` and
:class:`~twisted.web.iweb.IResponse` that :mod:`jano.proxy` uses, with the
same failure types as Twisted's client (``ResponseDone``,
``PotentialDataLoss``, ``ResponseFailed``, ``ResponseNeverReceived``).

Parsing is kept apart from I/O: :func:`parse_response_head` and
:class:`ChunkedDecoder` are fed bytes and know nothing of sockets; the
connection protocol only shuttles bytes between them and the consumer.

Retries: a request sent on a *reused* connection that the backend closes
before sending a single response byte is retried once on a fresh connection,
but only for ``GET``, ``HEAD`` and ``OPTIONS``.  Anything else (``POST`` in
particular) fails with ``ResponseNeverReceived``: the backend may have acted
on it.  The default ``idle_timeout`` of 3 s stays below the 5 s keep-alive
that backends commonly use, so that race is rare.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Protocol as TypingProtocol, Union, cast

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer, IDelayedCall, IProtocol, IPushProducer, IReactorTime, IStreamClientEndpoint,
    ITCPTransport, ITransport,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse, UNKNOWN_LENGTH
from zope.interface import implementer

from jano.headers import WireHeaders
from jano.writethrough import send_now

__all__ = [
    "ChunkedDecoder", "MalformedResponse", "ResponseHead", "UpstreamAgent", "UpstreamResponse",
    "parse_response_head",
]

#: Largest response head (status line and header fields) accepted.
MAX_HEAD_BYTES = 64 * 1024
#: Largest chunk-size line (size plus extensions) accepted.
MAX_CHUNK_LINE_BYTES = 4 * 1024
#: Largest trailer section accepted; trailers are read and discarded.
MAX_TRAILER_BYTES = 64 * 1024

#: ``IResponse.length`` is an ``int`` or this opaque marker.
Length = Union[int, str]

#: Fields about this hop's framing and connection, never end-to-end.
_CONNECTION_FIELDS = frozenset({
    b"connection", b"content-length", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade",
})
_VERSIONS = {b"HTTP/1.1": (b"HTTP", 1, 1), b"HTTP/1.0": (b"HTTP", 1, 0)}
_NO_TOKENS: frozenset[bytes] = frozenset()
_HEX_DIGITS = b"0123456789abcdefABCDEF"
#: RFC 9110 token characters, the only ones allowed in a field name.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HOST_CHARS = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
               b"-._~!$&'()*+,;=%")
_KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
#: Methods whose request announces a body even when there is none (as Twisted's Agent does).
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: Methods safe to send twice when a reused connection died before answering.
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
#: Request fields the agent writes itself from the body it sends.
_REQUEST_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
#: Bound on the per-URI-prefix and per-(host, port) caches.
_MAX_CACHED_ORIGINS = 1024
#: Shortest re-arm of the idle sweep, so float rounding cannot make it spin.
_MIN_SWEEP_DELAY = 0.01


#: The end of every complete body, made once (as ``twisted.internet.protocol.connectionDone`` is).
_RESPONSE_DONE = Failure(ResponseDone())


class MalformedResponse(ValueError):
    """The upstream's bytes are not an HTTP/1.1 response we can frame."""


# --- sans-IO parsing -----------------------------------------------------------------


class ResponseHead(NamedTuple):
    """A parsed status line and header section."""

    version: tuple[bytes, int, int]
    code: int
    phrase: bytes
    #: End-to-end fields only, every value of repeated fields in order.
    headers: Headers
    #: The Content-Length, or ``None`` when absent or irrelevant (HEAD, 1xx, 204, 304).
    content_length: Optional[int]
    #: ``Transfer-Encoding: chunked`` (takes precedence over Content-Length).
    chunked: bool
    #: Lower-cased tokens of the Connection field(s).
    connection_tokens: frozenset[bytes]
    #: Whether the server lets the connection carry another request.
    keep_alive: bool


def parse_response_head(block: bytes, *, head_request: bool = False) -> ResponseHead:
    """
    Parse a response head: everything before the blank line that ends it.

    :param head_request: the response answers a ``HEAD`` request, so its
        Content-Length describes the representation, not a body; it is kept in
        ``headers``, as Twisted's client does.
    :raises MalformedResponse: bad status line, bare CR or LF, obsolete line
        folding, a field line without a colon or with an invalid name, or
        Content-Length / Transfer-Encoding we cannot frame a body with.
    """
    lines = block.split(b"\r\n")
    if block.count(b"\n") != len(lines) - 1 or block.count(b"\r") != len(lines) - 1:
        raise MalformedResponse("bare CR or LF in the response head")
    status = lines[0]
    version_b, _, rest = status.partition(b" ")
    version = _VERSIONS.get(version_b)
    code_b = rest[:3]
    if (version is None or len(code_b) != 3 or not code_b.isdigit()
            or rest[3:4] not in (b"", b" ")):
        raise MalformedResponse(f"bad status line {status[:100]!r}")
    code = int(code_b)
    headers = WireHeaders()
    raw = headers._rawHeaders
    spelled = headers._names
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise MalformedResponse(f"obsolete line folding in the response head: {line[:100]!r}")
        name, colon, value = line.partition(b":")
        if not colon:
            raise MalformedResponse(f"response header line without a colon: {line[:100]!r}")
        value = value.strip(b" \t")
        lower = name.lower()
        if lower in _CONNECTION_FIELDS:
            if lower == b"content-length":
                lengths.append(value)
                if head_request:
                    raw[lower] = [value]
                    spelled[lower] = name
            elif lower == b"transfer-encoding":
                codings.append(value)
            elif lower == b"connection":
                connection.append(value)
            continue
        if not name or name.translate(None, _TCHAR):
            raise MalformedResponse(f"invalid response header name {name[:100]!r}")
        values = raw.get(lower)
        if values is None:
            raw[lower] = [value]
            spelled[lower] = name
        else:
            values.append(value)

    tokens = _NO_TOKENS
    if connection:
        tokens = frozenset(t.strip(b" \t").lower() for v in connection for t in v.split(b","))
        tokens -= {b""}
    keep_alive = (b"close" not in tokens) if version[2] == 1 else (b"keep-alive" in tokens)

    content_length: Optional[int] = None
    chunked = False
    if code >= 200 and code not in (204, 304) and not head_request:
        if codings:
            coding = b",".join(codings).strip(b" \t").lower()
            if coding != b"chunked":
                raise MalformedResponse(f"unsupported Transfer-Encoding {coding[:100]!r}")
            chunked = True
            # Both framings (or chunked in HTTP/1.0) smell of response splitting:
            # trust chunked for this response, not the connection (RFC 9112 6.3).
            if lengths or version[2] == 0:
                keep_alive = False
        elif lengths:
            content_length = _content_length(lengths)
    return ResponseHead(version, code, rest[4:], headers, content_length, chunked, tokens,
                        keep_alive)


def _content_length(values: list[bytes]) -> int:
    """One length from all Content-Length values; repeats must agree (RFC 9110 8.6)."""
    if len(values) == 1 and values[0].isdigit() and len(values[0]) < 19:
        return int(values[0])
    found: Optional[int] = None
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or len(part) >= 19:
                raise MalformedResponse(f"bad Content-Length {value[:100]!r}")
            n = int(part)
            if found is not None and n != found:
                raise MalformedResponse(f"conflicting Content-Length values {values!r}")
            found = n
    if found is None:
        raise MalformedResponse("empty Content-Length")
    return found


_SIZE_LINE, _DATA, _DATA_CRLF, _TRAILERS, _DONE = range(5)


class ChunkedDecoder:
    """
    Decode a ``Transfer-Encoding: chunked`` body fed in arbitrary pieces.

    :meth:`feed` returns the payload found in what it was given, so nothing is
    held back but a partial chunk-size or trailer line.  Chunk extensions are
    ignored, trailers read and discarded.  After the last chunk and its
    trailers, :attr:`done` is true and :attr:`extra` tells whether more bytes
    followed (which a connection that sent no second request must not get).
    Bad framing sets :attr:`error`; the payload before it is still returned.
    """

    __slots__ = ("_state", "_left", "_line", "_trailer_bytes", "done", "extra", "rest", "error")

    def __init__(self) -> None:
        self._state = _SIZE_LINE
        self._left = 0  # payload bytes left in this chunk, or CRLF bytes left after it
        self._line = b""  # a chunk-size or trailer line split across reads
        self._trailer_bytes = 0
        self.done = False
        self.extra = False
        #: The bytes that followed the body in the piece that ended it (a
        #: pipelined request, for a server).
        self.rest = b""
        self.error: Optional[MalformedResponse] = None

    def feed(self, data: bytes) -> bytes:
        """
        Decode the next piece of the body.

        :return: the payload it contained (possibly empty); once :attr:`done`
            or :attr:`error` is set, nothing more.
        """
        if self.done or self.error is not None:
            self.extra = self.extra or bool(data)
            return b""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        state = self._state
        try:
            while pos < end:
                if state == _DATA:
                    stop = pos + self._left
                    if stop > end:
                        out.append(data[pos:])
                        self._left = stop - end
                        break
                    out.append(data[pos:stop])
                    if data.startswith(b"\r\n", stop):  # the usual case: CRLF in this read
                        pos = stop + 2
                        state = _SIZE_LINE
                    else:
                        pos = stop
                        state = _DATA_CRLF
                        self._left = 2
                elif state == _SIZE_LINE:
                    eol = data.find(b"\n", pos)
                    if eol < 0:
                        self._line += data[pos:]
                        if len(self._line) > MAX_CHUNK_LINE_BYTES:
                            raise MalformedResponse("chunk-size line too long")
                        break
                    if self._line:
                        line = self._line + data[pos:eol]
                        self._line = b""
                    else:
                        line = data[pos:eol]
                    pos = eol + 1
                    # hex-size [BWS ";" extensions] [CR]; extensions are ignored.
                    digits = line.partition(b";")[0].rstrip(b" \t\r")
                    if (not digits or len(digits) > 16 or digits.strip(_HEX_DIGITS)
                            or len(line) > MAX_CHUNK_LINE_BYTES):
                        raise MalformedResponse(f"bad chunk-size line {line[:100]!r}")
                    size = int(digits, 16)
                    if size:
                        state = _DATA
                        self._left = size
                    else:
                        state = _TRAILERS
                elif state == _DATA_CRLF:
                    expected = b"\r\n"[2 - self._left:]
                    got = data[pos:pos + len(expected)]
                    if not expected.startswith(got):
                        raise MalformedResponse("chunk data not followed by CRLF")
                    pos += len(got)
                    self._left -= len(got)
                    if not self._left:
                        state = _SIZE_LINE
                else:  # _TRAILERS: read up to the blank line, keep nothing
                    eol = data.find(b"\n", pos)
                    if eol < 0:
                        self._line += data[pos:]
                        if self._trailer_bytes + len(self._line) > MAX_TRAILER_BYTES:
                            raise MalformedResponse("chunked trailers too large")
                        break
                    if self._line:
                        line = self._line + data[pos:eol]
                        self._line = b""
                    else:
                        line = data[pos:eol]
                    pos = eol + 1
                    if line == b"" or line == b"\r":
                        state = _DONE
                        self.done = True
                        self.extra = pos < end
                        self.rest = data[pos:]
                        break
                    self._trailer_bytes += len(line) + 1
                    if self._trailer_bytes > MAX_TRAILER_BYTES:
                        raise MalformedResponse("chunked trailers too large")
        except MalformedResponse as e:
            self.error = e
        self._state = state
        return b"".join(out)


# --- request side --------------------------------------------------------------------


class _Origin(NamedTuple):
    key: tuple[str, int]  # (host without brackets, port): the pool and endpoint key
    host_header: bytes


def _parse_origin(prefix: bytes) -> _Origin:
    """``http://host[:port]`` (host may be ``[v6]``) -> where to connect and the Host value."""
    authority = prefix[7:]
    if authority.startswith(b"["):
        close = authority.find(b"]")
        host = authority[1:close].decode("ascii", "replace") if close > 0 else ""
        after = authority[close + 1:] if close > 0 else b""
        if not isIPv6Address(host) or (after and not after.startswith(b":")):
            raise ValueError(f"bad IPv6 authority in {prefix!r}")
        port_b = after[1:]
    else:
        host_b, _, port_b = authority.partition(b":")
        if not host_b or host_b.translate(None, _HOST_CHARS):
            raise ValueError(f"bad host in {prefix!r}")
        host = host_b.decode("ascii").lower()
    port = 80
    if port_b:
        if not port_b.isdigit() or len(port_b) > 5 or not 0 < int(port_b) < 65536:
            raise ValueError(f"bad port in {prefix!r}")
        port = int(port_b)
    return _Origin((host, port), authority)


def _request_bytes(method: bytes, target: bytes, host: bytes, headers: Optional[Headers],
                   body: Optional[bytes]) -> bytes:
    """
    The whole request, ready for one write.

    The caller's headers go out as given, all values, except that a caller's
    ``Host`` replaces the default and a caller's Content-Length or
    Transfer-Encoding is dropped: the agent frames the body it sends.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if type(headers) is WireHeaders:  # Jano's own: lower-cased keys, clean values
        raw = headers._rawHeaders
        if b"host" not in raw:
            parts += (b"Host: ", host, b"\r\n")
        names = headers._names
        for key, field_values in raw.items():
            if key in _REQUEST_FRAMING:
                continue
            spelled = names[key]
            for one in field_values:
                parts += (spelled, b": ", one, b"\r\n")
        if body is None:
            parts.append(b"\r\n")
        else:
            parts += (b"Content-Length: ", b"%d" % len(body), b"\r\n\r\n", body)
        return b"".join(parts)
    if headers is None or not headers.hasHeader(b"host"):
        parts += (b"Host: ", host, b"\r\n")
    if headers is not None:
        framing = headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
        for name, values in headers.getAllRawHeaders():
            if framing and name.lower() in _REQUEST_FRAMING:
                continue
            for value in values:
                parts += (name, b": ", value, b"\r\n")
    if body is None:
        parts.append(b"\r\n")
    else:
        parts += (b"Content-Length: ", b"%d" % len(body), b"\r\n\r\n", body)
    return b"".join(parts)


@implementer(IConsumer)
class _BodySink:
    """Collects what a generic ``IBodyProducer`` writes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def _collect_body(producer: IBodyProducer) -> Deferred[bytes]:
    """
    Run a generic body producer to completion in memory.

    Jano's own bodies arrive as ``BytesProducer`` with a ``body`` attribute and
    never come here; this keeps any other ``IBodyProducer`` working, sent with
    a Content-Length like every body.
    """
    sink = _BodySink()
    collected: Deferred[bytes] = Deferred(lambda _: producer.stopProducing())

    def done(_: object) -> None:
        if not collected.called:
            collected.callback(b"".join(sink.parts))

    def failed(failure: Failure) -> None:
        if not collected.called:
            collected.errback(failure)

    producer.startProducing(sink).addCallbacks(done, failed)
    return collected


class _PendingRequest:
    """One request from ``request()`` until its response head arrives (or it fails)."""

    __slots__ = ("_agent", "key", "method", "data", "head_only", "deferred", "conn",
                 "_connecting", "reused", "_retried", "_cancelled")

    def __init__(self, agent: UpstreamAgent, key: tuple[str, int], method: bytes,
                 data: bytes) -> None:
        self._agent = agent
        self.key = key
        self.method = method
        self.data = data
        self.head_only = method == b"HEAD"
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self.conn: Optional[_Connection] = None
        self._connecting: Optional[Deferred[_Connection]] = None
        self.reused = False
        self._retried = False
        self._cancelled = False

    def start(self) -> None:
        conn = self._agent._checkout(self.key)
        if conn is None:
            self._connect()
        else:
            self.reused = True
            conn.send(self)

    def _connect(self) -> None:
        self.reused = False
        self._connecting = self._agent._connect(self.key)
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: _Connection) -> None:
        self._connecting = None
        if self._cancelled:
            conn.abandon()
            return
        conn.send(self)

    def _connect_failed(self, failure: Failure) -> None:
        # ConnectionRefusedError, ConnectError, DNSLookupError... pass unchanged:
        # callers tell "backend down" from "backend broke" by these types.
        self._connecting = None
        if not self._cancelled:
            self.deferred.errback(failure)

    def lost(self, reason: Failure, got_bytes: bool) -> None:
        """The connection closed before the whole response head arrived."""
        if (self.reused and not got_bytes and not self._retried
                and self.method in _RETRYABLE):
            # The backend most likely closed the idle connection as we wrote to it.
            self._retried = True
            self._connect()
            return
        self.deferred.errback(Failure(ResponseNeverReceived([reason])))

    def _cancel(self, _: Deferred[IResponse]) -> None:
        # Deferred.cancel errbacks with CancelledError once this returns.
        self._cancelled = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon()


# --- response side -------------------------------------------------------------------


@implementer(IPushProducer)
class _BodyStream:
    """
    Delivers one response body to its consumer, and is that consumer's transport.

    Pause and resume reach the upstream socket only while the body is being
    read: once it is complete the connection may already serve another
    request, so the stream is detached and they do nothing.
    """

    __slots__ = ("_conn", "_consumer", "_pending", "_reason", "_attached", "_stopped")

    def __init__(self, conn: _Connection) -> None:
        self._conn: Optional[_Connection] = conn
        self._consumer: Optional[IProtocol] = None
        self._pending: list[bytes] = []  # payload that arrived before deliverBody
        self._reason: Optional[Failure] = None  # the end, if it came before deliverBody
        self._attached = False
        self._stopped = False

    # Driven by the connection.

    def write(self, data: bytes) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.dataReceived(data)
        elif not self._stopped:
            self._pending.append(data)
            if self._conn is not None:
                self._conn.hold(True)

    def detach(self) -> None:
        self._conn = None

    def finish(self, reason: Failure) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.connectionLost(reason)
        elif not self._attached:
            self._reason = reason

    # Driven by the response's owner.

    def attach(self, protocol: IProtocol) -> None:
        if self._attached:
            raise RuntimeError("deliverBody may be called only once per response")
        self._attached = True
        self._consumer = protocol
        # Like Twisted's own Response, the consumer's "transport" is a push producer.
        protocol.makeConnection(cast(ITransport, self))
        pending, self._pending = self._pending, []
        for piece in pending:
            if self._stopped:
                break
            protocol.dataReceived(piece)
        reason, self._reason = self._reason, None
        if reason is not None:  # the body ended before deliverBody
            self._consumer = None
            if self._stopped:
                reason = Failure(ResponseFailed([Failure(ConnectionAborted())]))
            protocol.connectionLost(reason)
        elif self._conn is not None and not self._stopped:
            self._conn.hold(False)

    # IPushProducer, for the consumer.

    def pauseProducing(self) -> None:
        if self._conn is not None:
            self._conn.consumer_paused(True)

    def resumeProducing(self) -> None:
        if self._conn is not None:
            self._conn.consumer_paused(False)

    def stopProducing(self) -> None:
        """Give up on the body: abort the upstream connection (llama-server stops generating)."""
        if self._stopped or self._consumer is None:
            return
        self._stopped = True
        self._pending = []
        if self._conn is not None:
            self._conn.consumer_stopped()

    def abortConnection(self) -> None:
        """The same as :meth:`stopProducing`; ``readBody`` cancels through this name."""
        self.stopProducing()


@implementer(IResponse)
class UpstreamResponse:
    """
    A response whose head has arrived; the body follows through :meth:`deliverBody`.

    :ivar headers: end-to-end fields only: framing and connection-control
        fields (Content-Length, Transfer-Encoding, Connection, Keep-Alive, TE,
        Trailer, Upgrade, Proxy-Connection) are left out, except Content-Length
        in a response to ``HEAD``.
    :ivar length: the body length, or ``UNKNOWN_LENGTH`` (chunked or
        close-delimited); 0 when there is no body.
    :ivar connection_tokens: lower-cased tokens of the Connection field(s),
        naming further hop-by-hop fields a proxy must drop.
    :ivar request: always ``None``: the agent keeps no request object.
    """

    __slots__ = ("version", "code", "phrase", "headers", "length", "connection_tokens",
                 "request", "previousResponse", "_stream")

    def __init__(self, head: ResponseHead, length: Length, stream: _BodyStream) -> None:
        self.version = head.version
        self.code = head.code
        self.phrase = head.phrase
        self.headers = head.headers
        self.length = length
        self.connection_tokens = head.connection_tokens
        self.request = None
        self.previousResponse: Optional[IResponse] = None
        self._stream = stream

    def deliverBody(self, protocol: IProtocol) -> None:
        """
        Stream the body to ``protocol``.

        ``protocol.makeConnection`` gets an ``IPushProducer`` (pause and resume
        reading the upstream socket; stop aborts the connection), then
        ``dataReceived`` once per socket read's payload, then exactly one
        ``connectionLost``: ``ResponseDone``, ``PotentialDataLoss`` (body
        delimited by the connection closing), or ``ResponseFailed``.
        """
        self._stream.attach(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


class _Transport(TypingProtocol):
    """What the connection uses of its TCP transport."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


# Connection states.
_IDLE, _WAITING, _BODY, _CLOSING = range(4)
# Body framings.
_BY_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)


class _Connection(Protocol):
    """
    One upstream TCP connection: sends a request, frames its response, and
    goes back to the pool or closes.  Never more than one request at a time.
    """

    log = Logger()

    def __init__(self, agent: UpstreamAgent, key: tuple[str, int]) -> None:
        self._agent = agent
        self.key = key
        self.expires_at = 0.0  # when idle in the pool: the clock time it stops being reusable
        self.in_pool = False
        self.disconnected = False
        self._t: Optional[_Transport] = None
        self._state = _IDLE
        self._request: Optional[_PendingRequest] = None
        self._got_bytes = False
        self._buf = b""  # an incomplete response head
        self._scan = 0  # where in _buf the blank line may start
        self._stream: Optional[_BodyStream] = None
        self._framing = _BY_LENGTH
        self._left = 0
        self._decoder: Optional[ChunkedDecoder] = None
        self._keep_alive = False
        self._consumer_paused = False
        self._held = False  # paused by us: body bytes with no consumer yet
        self._reading_paused = False
        self._lost_waiters: list[Deferred[None]] = []

    @property
    def _transport(self) -> _Transport:
        assert self._t is not None
        return self._t

    def connectionMade(self) -> None:
        self._t = cast(_Transport, self.transport)
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    # Requests.

    def send(self, request: _PendingRequest) -> None:
        self._request = request
        request.conn = self
        self._state = _WAITING
        self._got_bytes = False
        send_now(self._transport, request.data)

    def abandon(self) -> None:
        """The request was cancelled before its response head: this connection is spoiled."""
        self._request = None
        self._abort()

    # Bytes in.

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._body_received(data)
        elif state == _WAITING:
            self._head_received(data)
        elif state == _IDLE:
            self.log.warn("{host}:{port} sent {n} bytes on an idle connection; closing it",
                          host=self.key[0], port=self.key[1], n=len(data))
            self._agent._forget(self)
            self._abort()
        # _CLOSING: whatever still arrives is dropped.

    def _head_received(self, data: bytes) -> None:
        self._got_bytes = True
        buf = self._buf + data if self._buf else data
        scan = self._scan
        request = self._request
        assert request is not None
        while True:
            end = buf.find(b"\r\n\r\n", scan)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._head_failed(MalformedResponse("response head larger than 64 KiB"))
                    return
                self._buf = buf
                self._scan = max(0, len(buf) - 3)
                return
            if end > MAX_HEAD_BYTES:
                self._head_failed(MalformedResponse("response head larger than 64 KiB"))
                return
            try:
                head = parse_response_head(buf[:end], head_request=request.head_only)
            except MalformedResponse as e:
                self._head_failed(e)
                return
            buf = buf[end + 4:]
            scan = 0
            if head.code >= 200:
                break
            if head.code == 101:
                self._head_failed(MalformedResponse("unexpected 101 Switching Protocols"))
                return
            # 100 Continue, 103 Early Hints...: interim, the real response follows.
        self._buf = b""
        self._scan = 0
        self._begin_body(request, head, buf)

    def _head_failed(self, error: Exception) -> None:
        request, self._request = self._request, None
        self._buf = b""
        self._abort()
        if request is not None:
            request.conn = None
            request.deferred.errback(Failure(ResponseFailed([Failure(error)])))

    def _begin_body(self, request: _PendingRequest, head: ResponseHead, rest: bytes) -> None:
        self._request = None
        request.conn = None
        stream = _BodyStream(self)
        left = head.content_length
        length: Length = 0
        if request.head_only or head.code in (204, 304) or left == 0:
            framing = None
        elif head.chunked:
            framing, length = _CHUNKED, UNKNOWN_LENGTH
        elif left is not None:
            framing, length = _BY_LENGTH, left
        else:
            framing, length = _UNTIL_CLOSE, UNKNOWN_LENGTH
        response = UpstreamResponse(head, length, stream)
        if framing is None:
            self._state = _IDLE
            stream.detach()
            stream.finish(_RESPONSE_DONE)
            self._release(head.keep_alive and not rest)
            request.deferred.callback(response)
            return
        self._state = _BODY
        self._stream = stream
        self._framing = framing
        self._left = left or 0
        self._decoder = ChunkedDecoder() if framing == _CHUNKED else None
        self._keep_alive = head.keep_alive and framing != _UNTIL_CLOSE
        # Fire first: a consumer attached right away gets the rest unbuffered.
        request.deferred.callback(response)
        if rest and self._state == _BODY:
            self._body_received(rest)

    def _body_received(self, data: bytes) -> None:
        stream = self._stream
        assert stream is not None
        framing = self._framing
        if framing == _CHUNKED:
            decoder = self._decoder
            assert decoder is not None
            payload = decoder.feed(data)
            if payload:
                stream.write(payload)
            if self._state != _BODY:
                return  # the consumer stopped
            if decoder.done:
                self._body_complete(decoder.extra)
            elif decoder.error is not None:
                self._body_failed(decoder.error)
        elif framing == _BY_LENGTH:
            left = self._left
            n = len(data)
            if n < left:
                self._left = left - n
                stream.write(data)
                return
            self._left = 0
            stream.write(data if n == left else data[:left])
            if self._state == _BODY:
                self._body_complete(n > left)
        else:
            stream.write(data)

    def _body_complete(self, extra: bool) -> None:
        stream, self._stream = self._stream, None
        assert stream is not None
        self._decoder = None
        self._state = _IDLE
        stream.detach()
        self._release(self._keep_alive and not extra)
        stream.finish(_RESPONSE_DONE)

    def _body_failed(self, error: Exception) -> None:
        stream, self._stream = self._stream, None
        assert stream is not None
        self._decoder = None
        self._abort()
        stream.detach()
        stream.finish(Failure(ResponseFailed([Failure(error)])))

    def _release(self, reusable: bool) -> None:
        """The exchange is over: back to the pool, reading resumed, or closed."""
        self._consumer_paused = self._held = False
        if not reusable or self.disconnected:
            self.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resumeProducing()
        self._agent._checkin(self)

    # Flow control, from the body stream.

    def hold(self, held: bool) -> None:
        self._held = held
        self._sync_reading()

    def consumer_paused(self, paused: bool) -> None:
        self._consumer_paused = paused
        self._sync_reading()

    def consumer_stopped(self) -> None:
        # Keep _stream: connectionLost tells the consumer how it ended.
        self._abort()

    def _sync_reading(self) -> None:
        paused = self._consumer_paused or self._held
        if paused != self._reading_paused and self._state == _BODY:
            self._reading_paused = paused
            if paused:
                self._transport.pauseProducing()
            else:
                self._transport.resumeProducing()

    # Closing.

    def when_lost(self) -> Deferred[None]:
        if self.disconnected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def close(self) -> None:
        """Close gracefully: the exchange is over, or the connection idled out."""
        if self._state != _CLOSING and not self.disconnected:
            self._transport.loseConnection()
        self._state = _CLOSING

    def _abort(self) -> None:
        if self._state != _CLOSING and not self.disconnected:
            self._transport.abortConnection()
        self._state = _CLOSING

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.disconnected = True
        state, self._state = self._state, _CLOSING
        self._agent._forget(self)
        request, self._request = self._request, None
        if request is not None:
            request.conn = None
            request.lost(reason, self._got_bytes)
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.detach()
            if state == _BODY and self._framing == _UNTIL_CLOSE and reason.check(ConnectionDone):
                stream.finish(Failure(PotentialDataLoss()))
            else:
                stream.finish(Failure(ResponseFailed([reason])))
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)


# --- the agent -----------------------------------------------------------------------


class _QuietFactory(Factory):
    """Builds the one given connection, without a log line per upstream connection."""

    noisy = False

    def __init__(self, protocol: "_Connection") -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> "_Connection":
        return self._protocol


@implementer(IAgent)
class UpstreamAgent:
    """
    Plain-HTTP/1.1 ``IAgent`` with a keep-alive pool, for local backends.

    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``.
    :param max_idle_per_host: idle connections kept per ``(host, port)``;
        when full, the longest-idle one is closed.
    :param idle_timeout: seconds an idle connection stays reusable; keep it
        below the backends' own keep-alive timeout.
    :param connect_timeout: seconds to wait for a TCP connection.
    """

    def __init__(self, reactor: IReactorTime, *, max_idle_per_host: int = 64,
                 idle_timeout: float = 3.0, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._max_idle = max_idle_per_host
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._origins: dict[bytes, _Origin] = {}
        self._endpoints: dict[tuple[str, int], IStreamClientEndpoint] = {}
        # Idle connections per (host, port), oldest first: checkout pops the newest.
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._idle_count = 0
        self._sweeper: Optional[IDelayedCall] = None

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None,
                bodyProducer: Optional[IBodyProducer] = None) -> Deferred[IResponse]:
        """
        Send a request; the Deferred fires with an :class:`UpstreamResponse`
        (typed as ``IResponse``, as the interface says) once its head has arrived.

        Cancelling it before then aborts the connection.  Failures: the
        endpoint's own (``ConnectionRefusedError``, ``ConnectError``,
        ``DNSLookupError``...) when no connection could be made;
        ``ResponseNeverReceived`` when the connection closed before a whole
        response head; ``ResponseFailed`` wrapping :class:`MalformedResponse`
        for a response that cannot be parsed; ``ValueError`` for anything but
        an ``http://`` URI or a method that is not a token.
        """
        try:
            origin, target = self._route(uri)
            if method not in _KNOWN_METHODS and not _TOKEN.fullmatch(method):
                raise ValueError(f"bad request method {method[:40]!r}")
        except ValueError as e:
            return fail(e)
        body: Optional[bytes]
        if bodyProducer is None:
            body = b"" if method in _BODY_METHODS else None
        else:
            given = getattr(bodyProducer, "body", None)  # jano.proxy.BytesProducer: in memory
            if not isinstance(given, bytes):
                return _collect_body(bodyProducer).addCallback(
                    lambda collected: self._send(method, origin, target, headers, collected))
            body = given
        return self._send(method, origin, target, headers, body)

    def close_idle(self) -> Deferred[None]:
        """
        Close every idle connection; fires once they are all closed.

        Connections busy with a request are left alone and pooled as usual
        when it ends: call this once nothing is being forwarded any more.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        closing: list[Deferred[None]] = []
        for pool in self._idle.values():
            for conn in pool:
                conn.in_pool = False
                closing.append(conn.when_lost())
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        return gatherResults(closing).addCallback(lambda _: None)

    # Request plumbing.

    def _route(self, uri: bytes) -> tuple[_Origin, bytes]:
        """``http://authority/target`` -> the (cached) origin and the request target."""
        if not uri.startswith(b"http://") and uri[:7].lower() != b"http://":
            raise ValueError(f"only http:// URIs are supported, not {uri[:100]!r}")
        end = uri.find(b"/", 7)
        if end < 0:
            end = len(uri)
        for separator in (b"?", b"#"):
            i = uri.find(separator, 7, end)
            if i >= 0:
                end = i
        prefix = uri[:end]
        origin = self._origins.get(prefix)
        if origin is None:
            origin = _parse_origin(prefix)
            if len(self._origins) >= _MAX_CACHED_ORIGINS:
                self._origins.clear()
            self._origins[prefix] = origin
        target = uri[end:]
        fragment = target.find(b"#")
        if fragment >= 0:
            target = target[:fragment]
        if not target.startswith(b"/"):
            target = b"/" + target
        if _BAD_TARGET.search(target):
            raise ValueError(f"whitespace or control character in request target {target[:100]!r}")
        return origin, target

    def _send(self, method: bytes, origin: _Origin, target: bytes, headers: Optional[Headers],
              body: Optional[bytes]) -> Deferred[IResponse]:
        data = _request_bytes(method, target, origin.host_header, headers, body)
        request = _PendingRequest(self, origin.key, method, data)
        request.start()
        return request.deferred

    def _connect(self, key: tuple[str, int]) -> Deferred[_Connection]:
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host, port = key
            if isIPAddress(host) or isIPv6Address(host):
                # connectTCP picks the address family of an IP literal itself.
                endpoint = TCP4ClientEndpoint(self._reactor, host, port,
                                              timeout=self._connect_timeout)
            else:
                endpoint = HostnameEndpoint(self._reactor, host, port,
                                            timeout=self._connect_timeout)
            if len(self._endpoints) >= _MAX_CACHED_ORIGINS:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return cast("Deferred[_Connection]", endpoint.connect(_QuietFactory(_Connection(self, key))))

    # The pool.

    def _checkout(self, key: tuple[str, int]) -> Optional[_Connection]:
        pool = self._idle.get(key)
        if not pool:
            return None
        conn = pool.pop()
        conn.in_pool = False
        self._idle_count -= 1
        if self._reactor.seconds() < conn.expires_at:
            return conn
        # The newest has expired, so have all older ones.
        conn.close()
        for older in pool:
            older.in_pool = False
            older.close()
        self._idle_count -= len(pool)
        pool.clear()
        return None

    def _checkin(self, conn: _Connection) -> None:
        if self._max_idle <= 0:
            conn.close()
            return
        pool = self._idle.get(conn.key)
        if pool is None:
            pool = self._idle[conn.key] = []
        if len(pool) >= self._max_idle:
            oldest = pool.pop(0)
            oldest.in_pool = False
            oldest.close()
            self._idle_count -= 1
        conn.expires_at = self._reactor.seconds() + self._idle_timeout
        conn.in_pool = True
        pool.append(conn)
        self._idle_count += 1
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """``conn`` is closing or closed: it must never be checked out again."""
        if conn.in_pool:
            conn.in_pool = False
            self._idle[conn.key].remove(conn)
            self._idle_count -= 1
        if self._idle_count == 0 and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        """Close expired idle connections; re-arm only while some remain idle."""
        self._sweeper = None
        now = self._reactor.seconds()
        next_expiry: Optional[float] = None
        for key, pool in list(self._idle.items()):
            expired = 0
            while expired < len(pool) and pool[expired].expires_at <= now:
                expired += 1
            for conn in pool[:expired]:
                conn.in_pool = False
                conn.close()
            del pool[:expired]
            self._idle_count -= expired
            if not pool:
                del self._idle[key]
            elif next_expiry is None or pool[0].expires_at < next_expiry:
                next_expiry = pool[0].expires_at
        if next_expiry is not None:
            self._sweeper = self._reactor.callLater(
                max(next_expiry - now, _MIN_SWEEP_DELAY), self._sweep)
