"""JanoRequest over an in-memory transport: bodies in memory, 413 early, headers intact."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from jano.api import JanoSite


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[bytes, list[bytes]], bytes, Any]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((dict(request.requestHeaders.getAllRawHeaders()), request.content.read(),
                          type(request.content).__name__))
        return b"ok"


def _serve(raw: bytes, max_body: int = 1024) -> tuple[Echo, bytes]:
    echo = Echo()
    site = JanoSite(echo, max_body_bytes=max_body)
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    return echo, transport.value()


def test_content_type_reaches_the_resource_and_form_bodies_are_not_parsed() -> None:
    body = b"a=1&b=2"
    echo, out = _serve(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: 7\r\n\r\n" + body)
    headers, got, kind = echo.seen[0]
    assert headers[b"Content-Type"] == [b"application/x-www-form-urlencoded"]
    assert got == body and kind == "BytesIO"  # never a temporary file
    assert out.startswith(b"HTTP/1.1 200")


def test_announced_oversized_body_is_refused_before_it_is_read() -> None:
    echo, out = _serve(b"POST /api/chat HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10)
    assert out.startswith(b"HTTP/1.1 413") and b'{"error": "request body larger than 1024 bytes"}' in out
    assert echo.seen == []


def test_chunked_body_that_grows_too_large_is_refused() -> None:
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    echo, out = _serve(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunk * 3 + b"0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and b"invalid_request_error" in out
    assert echo.seen == []


def test_large_body_within_the_limit_stays_in_memory() -> None:
    body = b"y" * 200_000  # Twisted alone would spool this to a temporary file
    echo, _ = _serve(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n" + body, max_body=1 << 20)
    assert echo.seen[0][1] == body and echo.seen[0][2] == "BytesIO"
