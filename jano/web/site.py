"""
The listener: twisted.web's HTTP/1.1 server, configured for a proxy that
holds prompts.

Twisted parses every byte (request line, headers, chunked bodies, pipelining)
and rejects malformed messages with 400 before anything reaches Jano; the
subclasses here only add policy, through public hooks:

* :class:`JanoRequest` keeps bodies in memory (never a temporary file: they
  hold prompts), bounded by ``max_body_bytes``, and refuses *when the headers
  are in*, before a body byte is read: an announced body over the limit gets
  413, a body from a caller without the API key gets 401.  It normalises an
  absolute-form target to origin-form (RFC 9112 section 3.2.2) and refuses
  any other form with 400.
* :class:`JanoChannel` answers an over-long header line with 431, remembers
  each request's target for the early refusals, and keeps its site's
  connection counts.
* :class:`JanoSite` caps open connections, in all and per client address
  (beyond the cap a connection is closed unread), parses no form bodies, and
  keeps no access log (telemetry records what is needed, never query strings).
"""

from __future__ import annotations

import hmac
from collections import Counter
from io import BytesIO
from typing import Any, Callable, Optional, Sequence, cast

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from jano.errors import Refusal, error_body

#: Seconds a client connection may sit idle between requests (or trickle a head in).
DEFAULT_IDLE_TIMEOUT = 60.0
#: Open client connections, in all and from one address.
DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 1024

UNAUTHORIZED = Refusal(401, "missing or wrong API key", "authentication_error", "unauthorized")


class Keys:
    """
    The proxy routes' bearer tokens: the one ``api_key`` and the named
    ``api_keys``, each naming its caller.  Every key is compared, in constant
    time, whatever matched first; no key is ever logged.
    """

    def __init__(self, api_key: Optional[str] = None,
                 named: Sequence[tuple[str, str]] = ()) -> None:
        self._keys: list[tuple[bytes, Optional[str]]] = [(k.encode(), n) for n, k in named]
        if api_key is not None:
            self._keys.append((api_key.encode(), None))

    @property
    def open(self) -> bool:
        """No key is configured: everyone may call."""
        return not self._keys

    def caller(self, headers: Headers) -> tuple[bool, Optional[str]]:
        """``(allowed, caller name)`` for a request's ``Authorization`` header."""
        if not self._keys:
            return True, None
        got = headers.getRawHeaders(b"authorization")
        token = b""
        if got and len(got) == 1:
            scheme, _, value = got[0].partition(b" ")
            if scheme.lower() == b"bearer":
                token = value.strip()
        found: Optional[tuple[bytes, Optional[str]]] = None
        for key, name in self._keys:
            if hmac.compare_digest(token, key) and found is None:
                found = (key, name)
        return (True, found[1]) if found is not None else (False, None)


def bearer_ok(headers: Headers, key: Optional[str]) -> bool:
    """Whether ``Authorization: Bearer <key>`` is present (constant-time compare)."""
    if key is None:
        return True
    got = headers.getRawHeaders(b"authorization")
    if not got or len(got) != 1:
        return False
    scheme, _, token = got[0].partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


def origin_form(target: bytes) -> Optional[tuple[bytes, Optional[bytes]]]:
    """
    ``(origin-form target, authority)`` for an origin-form or absolute-form
    request target, ``None`` for anything else (asterisk-form, authority-form,
    a relative path, a scheme Jano does not serve).
    """
    if target[:1] == b"/":
        return target, None
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    cut = len(rest)
    for stop in (b"/", b"?"):
        at = rest.find(stop)
        if at >= 0:
            cut = min(cut, at)
    authority, tail = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:
        return None
    if not tail.startswith(b"/"):
        tail = b"/" + tail
    return tail, authority


def answer_and_close(channel: http.HTTPChannel, status: int, body: bytes,
                     extra: Optional[dict[bytes, list[bytes]]] = None) -> None:
    """
    A whole JSON answer written by the channel itself (Twisted serialises
    the head), then the connection closed: for answers given before a
    request exists for Twisted's ``Request`` machinery.
    """
    headers = Headers({b"content-type": [b"application/json"],
                       b"content-length": [b"%d" % len(body)], b"connection": [b"close"],
                       **(extra or {})})
    channel.writeHeaders(b"HTTP/1.1", b"%d" % status, http.RESPONSES.get(status, b"Error"),
                         headers)
    assert channel.transport is not None
    channel.transport.write(body)
    channel.loseConnection()


class JanoRequest(server.Request):
    """
    A request whose body is kept in memory and bounded, and that is refused
    before its body is read when the headers already decide it.

    :ivar target: the request target as sent, set by :class:`JanoChannel`
        when the request line arrives (``request.uri`` is only set once the
        whole body is in).
    """

    target: bytes = b"/"
    version: bytes = b"HTTP/1.1"
    refused = False
    _received = 0

    @property
    def site_policy(self) -> "JanoSite":
        return cast(JanoSite, self.channel.site)  # type: ignore[attr-defined]

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        site = self.site_policy
        hosts = self.requestHeaders.getRawHeaders(b"host")
        if (len(hosts) != 1 if hosts else self.version == b"HTTP/1.1") or origin_form(
                self.target) is None:
            # RFC 9112 3.2: exactly one Host in HTTP/1.1, at most one before.
            self.refuse_early(Refusal(400, "a request needs exactly one Host header and a "
                                           "path (origin-form) or absolute http URL as target",
                                      "invalid_request_error", "bad_request"))
        elif length is not None and length > site.max_body_bytes:
            self.refuse_early(Refusal(413, f"request body larger than {site.max_body_bytes} bytes",
                                      "invalid_request_error", "too_large"))
        elif length != 0 and not site.keys.caller(self.requestHeaders)[0]:
            # A body is coming from a caller without the key: answer now, read none of it.
            self.refuse_early(UNAUTHORIZED)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._received += len(data)
        limit = self.site_policy.max_body_bytes
        if self._received > limit:
            self.refuse_early(Refusal(413, f"request body larger than {limit} bytes",
                                      "invalid_request_error", "too_large"))
            return
        cast(BytesIO, self.content).write(data)

    def refuse_early(self, refusal: Refusal) -> None:
        """Answer from the headers alone and close, leaving the body unread."""
        self.refused = True
        self.content = BytesIO()
        # Twisted would otherwise send "100 Continue" after this answer.
        self.requestHeaders.removeHeader(b"expect")
        site = self.site_policy
        site.refused_early[refusal.reason] += 1
        if site.on_refused is not None:
            site.on_refused(refusal.reason)
        path = (origin_form(self.target) or (b"/", None))[0].split(b"?", 1)[0]
        body = error_body(path, refusal.status, refusal.message, refusal.kind)
        extra = {b"www-authenticate": [b'Bearer realm="jano"']} if refusal.status == 401 else {}
        answer_and_close(self.channel, refusal.status, body, extra)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:
            return
        form = origin_form(path)
        if form is None:  # gotLength refused it already; never let it through
            return
        path, authority = form
        if authority is not None:  # RFC 9112 3.2.2: the target's authority is the host
            self.requestHeaders.setRawHeaders(b"host", [authority])
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if not self.refused:
            super().process()


class JanoChannel(http.HTTPChannel):
    """
    ``HTTPChannel`` with Jano's head limits: a header line over
    ``MAX_LENGTH`` gets 431; a head over ``totalHeadersSize`` bytes or
    ``maxHeaders`` fields gets Twisted's 400.
    """

    MAX_LENGTH = 16 * 1024
    totalHeadersSize = 64 * 1024
    maxHeaders = 128
    site: "JanoSite"

    def lineReceived(self, line: bytes) -> None:
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before:  # that was a request line: keep its target
            parts = line.split(b" ")
            if len(parts) == 3:
                request = cast(JanoRequest, self.requests[-1])
                request.target, request.version = parts[1], parts[2]

    def lineLengthExceeded(self, line: bytes) -> None:
        body = error_body(b"/", 431, f"a request line or header exceeds {self.MAX_LENGTH} bytes",
                          "invalid_request_error")
        answer_and_close(self, 431, body)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.connection_closed(self)


class JanoSite(server.Site):
    """
    The ``Site`` Jano listens with (and the one to mount
    :func:`jano.service.make_resource` on to get the same limits).

    :param max_body_bytes: largest request body held; larger gets 413.
    :param api_key: when set, a request with a body and without this bearer
        token gets 401 before its body is read.
    :param keys: the same with several (named) keys; replaces ``api_key``.
    :param max_connections: open client connections at most; more are closed
        unread.
    :param max_connections_per_client: the same, per client address.
    :param idle_timeout: seconds a connection may idle between requests.
    """

    requestFactory = JanoRequest
    protocol = JanoChannel  # type: ignore[assignment]  # HTTP/1.1 only: no TLS, so no HTTP/2
    log_ = Logger()

    def __init__(self, resource: IResource, *, max_body_bytes: int = 8 * 1024 * 1024,
                 api_key: Optional[str] = None, keys: Optional[Keys] = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, reactor: Any = None) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=idle_timeout,
                         reactor=reactor)
        self.max_body_bytes = max_body_bytes
        #: The proxy routes' keys (``api_key`` alone when no ``keys`` are given).
        self.keys = keys if keys is not None else Keys(api_key)
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.open_connections = 0
        self._per_client: Counter[str] = Counter()
        self.refused_connections = 0
        #: Told the reason of each refusal made from the headers alone (telemetry).
        self.on_refused: Optional[Callable[[str], None]] = None
        self.refused_early: Counter[str] = Counter()

    @staticmethod
    def _client(addr: Optional[IAddress]) -> str:
        return str(getattr(addr, "host", "") or "")

    def buildProtocol(self, addr: IAddress) -> Optional[JanoChannel]:  # type: ignore[override]
        client = self._client(addr)
        if (self.open_connections >= self.max_connections
                or self._per_client[client] >= self.max_connections_per_client):
            self.refused_connections += 1
            if self.refused_connections == 1 or self.refused_connections % 1000 == 0:
                self.log_.warn("connection limit reached ({n} open, {m} from {client}): "
                               "refusing connections ({refused} so far)",
                               n=self.open_connections, m=self._per_client[client],
                               client=client, refused=self.refused_connections)
            return None  # Twisted closes the socket at once, unread
        channel = cast(Optional[JanoChannel], super().buildProtocol(addr))
        if channel is not None:
            self.open_connections += 1
            self._per_client[client] += 1
            channel.client_key = client  # type: ignore[attr-defined]
        return channel

    def connection_closed(self, channel: JanoChannel) -> None:
        client = getattr(channel, "client_key", None)
        if client is None:
            return
        channel.client_key = None  # type: ignore[attr-defined]
        self.open_connections -= 1
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    def log(self, request: http.Request) -> None:
        """Access logs are off: telemetry keeps what is needed, and no query strings."""
