"""
The listener on its own (``JanoSite`` over an in-memory transport, an echo
resource behind it): bodies in memory and bounded, refusals from the headers
alone, connection caps, head limits, idle timeouts.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from jano.testing._memory import MemoryAgent, RawConnection
from jano.web.site import JanoSite, origin_form


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes, str]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((request.method, request.uri,
                          {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                          request.content.read(), type(request.content).__name__))
        return b"ok"


def serve(raw: bytes, *, max_body: int = 1024, api_key: Optional[str] = None,
          clock: Optional[Clock] = None, **kw: Any) -> tuple[Echo, RawConnection]:
    echo = Echo()
    site = JanoSite(echo, max_body_bytes=max_body, api_key=api_key, reactor=clock or Clock(), **kw)
    return echo, MemoryAgent(site).raw(raw)


def status(out: bytes) -> int:
    return int(out.split(b" ", 2)[1])


def body_of(out: bytes) -> Any:
    return json.loads(out.split(b"\r\n\r\n", 1)[1])


def test_content_type_reaches_the_resource_and_form_bodies_are_not_parsed() -> None:
    body = b"a=1&b=2"
    echo, conn = serve(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: 7\r\n\r\n" + body)
    _, _, headers, got, kind = echo.seen[0]
    assert headers[b"content-type"] == [b"application/x-www-form-urlencoded"]
    assert got == body and kind == "BytesIO"  # never a temporary file
    assert conn.output.startswith(b"HTTP/1.1 200")


def test_announced_oversized_body_is_refused_before_it_is_read() -> None:
    echo, conn = serve(b"POST /api/chat HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n")
    out = conn.output
    assert status(out) == 413 and body_of(out) == {"error": "request body larger than 1024 bytes"}
    assert b"connection: close" in out.lower() and conn.closed
    assert echo.seen == []


def test_chunked_body_that_grows_too_large_is_refused() -> None:
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    echo, conn = serve(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunk * 3 + b"0\r\n\r\n")
    assert status(conn.output) == 413 and body_of(conn.output)["error"]["type"] == "invalid_request_error"
    assert echo.seen == [] and conn.closed


def test_large_body_within_the_limit_stays_in_memory() -> None:
    body = b"y" * 200_000  # Twisted alone would spool this to a temporary file
    echo, _ = serve(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n" + body, max_body=1 << 20)
    assert echo.seen[0][3] == body and echo.seen[0][4] == "BytesIO"


def test_a_body_without_the_key_is_refused_when_the_headers_are_in() -> None:
    # Only the head is sent: the answer must not wait for the 8 MiB announced.
    echo, conn = serve(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
                       b"Content-Length: 8388607\r\nExpect: 100-continue\r\n\r\n",
                       max_body=8 << 20, api_key="k")
    out = conn.output
    assert status(out) == 401 and b"100 Continue" not in out
    assert body_of(out)["error"]["type"] == "authentication_error"
    assert b'www-authenticate: bearer realm="jano"' in out.lower()
    assert conn.closed and echo.seen == []


def test_a_wrong_key_is_refused_just_the_same_and_a_right_one_passes() -> None:
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
    _, conn = serve(head + b"Authorization: Bearer nope\r\n\r\n", api_key="k")
    assert status(conn.output) == 401
    echo, conn = serve(head + b"Authorization: Bearer k\r\n\r\nhi", api_key="k")
    assert status(conn.output) == 200 and echo.seen[0][3] == b"hi"


def test_a_bodiless_request_reaches_the_app_which_checks_the_key_itself() -> None:
    echo, conn = serve(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n", api_key="k")
    assert status(conn.output) == 200 and len(echo.seen) == 1


def test_an_absolute_form_target_is_served_as_its_path_and_its_authority_is_the_host() -> None:
    echo, conn = serve(b"GET http://example.test:8080/status?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    method, uri, headers, _, _ = echo.seen[0]
    assert (method, uri) == (b"GET", b"/status?x=1")
    assert headers[b"host"] == [b"example.test:8080"]


@pytest.mark.parametrize("target", [b"*", b"example.test:443", b"relative/path", b"ftp://x/y",
                                    b"http://user@x/y", b"http:///nohost"])
def test_targets_that_are_neither_origin_nor_absolute_form_get_400(target: bytes) -> None:
    echo, conn = serve(b"OPTIONS " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status(conn.output) == 400 and echo.seen == [] and conn.closed


def test_origin_form_keeps_the_target_and_absolute_form_is_cut_to_path_and_query() -> None:
    assert origin_form(b"/a?b") == (b"/a?b", None)
    assert origin_form(b"http://h:1?q=1") == (b"/?q=1", b"h:1")
    assert origin_form(b"HTTPS://h/p") == (b"/p", b"h")
    assert origin_form(b"gpu-box.example/x") is None


@pytest.mark.parametrize("hosts", [b"", b"Host: a\r\nHost: b\r\n"])
def test_http11_needs_exactly_one_host(hosts: bytes) -> None:
    echo, conn = serve(b"GET /x HTTP/1.1\r\n" + hosts + b"\r\n")
    assert status(conn.output) == 400 and echo.seen == []


def test_http10_may_omit_host() -> None:
    echo, conn = serve(b"GET /x HTTP/1.0\r\n\r\n")
    assert status(conn.output) == 200 and len(echo.seen) == 1


def test_an_over_long_header_line_gets_431() -> None:
    echo, conn = serve(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert status(conn.output) == 431 and conn.closed and echo.seen == []


def test_too_many_header_fields_get_400() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(200))
    echo, conn = serve(b"GET /x HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n")
    assert status(conn.output) == 400 and echo.seen == []


def test_connections_are_capped_in_all_and_per_client() -> None:
    echo = Echo()
    site = JanoSite(echo, max_connections=3, max_connections_per_client=2, reactor=Clock())
    laptop = MemoryAgent(site, client_host="10.0.0.2")
    desktop = MemoryAgent(site, client_host="10.0.0.3")
    a, b = laptop.raw(b""), laptop.raw(b"")
    assert not a.refused and not b.refused
    assert laptop.raw(b"").refused  # a third from the same address
    c = desktop.raw(b"")
    assert not c.refused
    assert desktop.raw(b"").refused  # a fourth in all
    assert site.open_connections == 3 and site.refused_connections == 2
    a.lose()
    assert not desktop.raw(b"").refused  # a slot came free
    assert site.open_connections == 3


def test_an_idle_connection_is_closed_and_a_busy_one_is_not() -> None:
    clock = Clock()
    _, idle = serve(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", clock=clock, idle_timeout=60.0)
    _, trickle = serve(b"GET /x HTTP/1.1\r\nHo", clock=clock, idle_timeout=60.0)
    clock.advance(59)
    assert not idle.closed and not trickle.closed
    clock.advance(2)
    assert idle.closed and trickle.closed


def test_no_access_log_line_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)  # type: ignore[arg-type]
    try:
        serve(b"GET /secret?token=abc HTTP/1.1\r\nHost: h\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)  # type: ignore[arg-type]
    assert not any("token=abc" in repr(e) for e in seen)
