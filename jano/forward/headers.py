"""
Header hygiene, both ways: which fields cross the proxy and which stay on
their own connection.

Twisted serialises every header (its ``Headers`` refuses CR, LF and NUL in a
value), so this module only decides *which* fields go, never how they are
written.
"""

from __future__ import annotations

from typing import Iterable, Optional

from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

#: RFC 9110 section 7.6.1 connection-specific fields, plus the legacy
#: Proxy-Connection, never forwarded in either direction.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
#: Request fields the upstream connection sets for itself.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}
#: Response fields Twisted's server adds that the upstream's answer replaces.
_SERVER_OWN = (b"server", b"date", b"content-type")
#: Statuses whose answers never carry a Content-Length of their body.
_NO_LENGTH = frozenset({204, 304})


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The lower-cased field names a ``Connection`` header nominates (RFC 9110 7.6.1)."""
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def upstream_headers(incoming: Headers, client_host: Optional[str],
                     strip_authorization: bool) -> Headers:
    """The request headers to send upstream: end-to-end ones, plus ``X-Forwarded-For``."""
    drop = _NOT_FORWARDED | connection_tokens(incoming.getRawHeaders(b"connection", ()))
    if strip_authorization:
        drop = drop | {b"authorization"}
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, values)
    if client_host:
        prior = incoming.getRawHeaders(b"x-forwarded-for")
        host = client_host.encode("ascii", "replace")
        out.setRawHeaders(b"x-forwarded-for", [b", ".join([*prior, host]) if prior else host])
    return out


def copy_response_headers(response: IResponse, request: Request) -> None:
    """
    Give the client the upstream's status, end-to-end headers and length,
    nothing of Twisted's own.  (Twisted's HTTP client keeps the upstream's
    ``Connection`` header to itself, so only the standard hop-by-hop fields
    can be dropped here.)
    """
    request.setResponseCode(response.code, response.phrase)
    request.defaultContentType = None
    out = request.responseHeaders
    for name in _SERVER_OWN:
        out.removeHeader(name)
    drop = HOP_BY_HOP | connection_tokens(response.headers.getRawHeaders(b"connection", ()))
    for name, values in response.headers.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, values)
    length = response.length
    if isinstance(length, int) and request.method != b"HEAD" and response.code not in _NO_LENGTH:
        out.setRawHeaders(b"content-length", [b"%d" % length])
