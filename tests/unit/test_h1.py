"""jano.h1: Jano's HTTP/1.1 server protocol, over an in-memory transport."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from jano.api import JanoSite
from jano.h1 import MAX_HEAD_BYTES, MAX_HELD_BYTES, HTTP11Server, JanoHTTPFactory, ProxyRequest


class Root(Resource):
    """Stands in for JanoResource: /own is answered by twisted.web, the rest is 'proxied'."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.proxied: list[ProxyRequest] = []
        self.own: list[Request] = []
        self.auto: Optional[bytes] = b"hello"  # answer proxied requests at once with this body

    @staticmethod
    def is_own(method: bytes, path: bytes, accept: Optional[bytes]) -> bool:
        return path == b"/own"

    def render(self, request: Request) -> bytes:
        self.own.append(request)
        request.setHeader(b"content-type", b"text/plain")
        return b"own:" + request.content.read()  # type: ignore[union-attr]

    def proxy(self, request: ProxyRequest, path: bytes) -> None:
        self.proxied.append(request)
        if self.auto is not None:
            request.setHeader(b"content-length", str(len(self.auto)).encode())
            request.write(self.auto)
            request.finish()


class Conn:
    def __init__(self, max_body: int = 1024, idle_timeout: float = 60.0) -> None:
        self.root = Root()
        self.site = JanoSite(self.root, max_body_bytes=max_body)
        self.clock = Clock()
        self.factory = JanoHTTPFactory(self.site, self.clock, idle_timeout=idle_timeout)
        self.proto = self.factory.buildProtocol(None)
        assert isinstance(self.proto, HTTP11Server)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def out(self) -> bytes:
        v = self.transport.value()
        self.transport.clear()
        return v

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_a_proxied_request_arrives_parsed_and_its_answer_goes_out_whole() -> None:
    c = Conn()
    c.send(_post(b"/v1/chat/completions?x=1", b'{"model":"m"}', b"X-Jano-Model: m\r\naCCept: */*\r\n"))
    [req] = c.root.proxied
    assert dict(req.requestHeaders.getAllRawHeaders())[b"aCCept"] == [b"*/*"]  # spelled as sent
    assert (req.method, req.uri, req.path, req.clientproto) == (
        b"POST", b"/v1/chat/completions?x=1", b"/v1/chat/completions", b"HTTP/1.1")
    assert req.body == b'{"model":"m"}'
    assert req.getHeader(b"x-jano-model") == b"m"
    assert req.requestHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert c.out() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"  # names as set
    assert not c.closed  # keep-alive


def test_a_response_without_length_is_chunked_and_ended() -> None:
    c = Conn()
    c.root.auto = None
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    [req] = c.root.proxied
    req.setResponseCode(201, b"Made")
    req.setHeader(b"content-type", b"text/event-stream")
    req.write(b"data: 1\n\n")
    assert c.out() == (b"HTTP/1.1 201 Made\r\ncontent-type: text/event-stream\r\n"
                       b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
    req.write(b"")  # nothing, not a terminator
    req.write(b"x" * 300)
    assert c.out() == b"12c\r\n" + b"x" * 300 + b"\r\n"
    req.finish()
    assert c.out() == b"0\r\n\r\n"
    req.write(b"late")  # after finish: ignored
    assert c.out() == b""


def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    c = Conn()
    c.root.auto = None
    c.send(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [r.path for r in c.root.proxied] == [b"/a"]
    first = c.root.proxied[0]
    first.setHeader(b"content-length", b"1")
    first.write(b"A")
    first.finish()
    assert [r.path for r in c.root.proxied] == [b"/a", b"/b"]
    second = c.root.proxied[1]
    second.setHeader(b"content-length", b"1")
    second.write(b"B")
    second.finish()
    out = c.out()
    assert out.index(b"\r\n\r\nA") < out.index(b"\r\n\r\nB")


def test_http10_gets_no_chunking_and_the_connection_closes() -> None:
    c = Conn()
    c.root.auto = None
    c.send(b"GET /x HTTP/1.0\r\n\r\n")
    req = c.root.proxied[0]
    req.write(b"body")
    req.finish()
    out = c.out()
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and b"connection: close" in out
    assert b"chunked" not in out and out.endswith(b"\r\n\r\nbody")
    assert c.closed


def test_connection_close_from_the_client_closes_after_the_answer() -> None:
    c = Conn()
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert b"connection: close" in c.out() and c.closed


@given(st.integers(min_value=1, max_value=60))
@settings(max_examples=30, deadline=None)
def test_a_body_split_anywhere_arrives_whole(split: int) -> None:
    c = Conn()
    raw = _post(b"/v1/completions", b'{"model":"m","prompt":"0123456789"}')
    split = min(split, len(raw) - 1)
    c.send(raw[:split])
    assert c.root.proxied == []
    c.send(raw[split:])
    assert c.root.proxied[0].body == b'{"model":"m","prompt":"0123456789"}'


def test_a_chunked_request_body_is_decoded_whatever_the_split() -> None:
    body = (b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    for split in range(1, len(body)):
        c = Conn()
        c.send(body[:split])
        c.send(body[split:])
        assert [r.body for r in c.root.proxied] == [b"hello world"], split


def test_an_announced_oversized_body_gets_413_before_it_is_read() -> None:
    c = Conn(max_body=1024)
    c.send(b"POST /api/chat HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10)
    out = c.out()
    assert out.startswith(b"HTTP/1.1 413 ") and c.closed and c.root.proxied == []
    assert out.endswith(b'{"error": "request body larger than 1024 bytes"}')  # Ollama's shape


def test_a_chunked_body_that_grows_too_large_gets_413() -> None:
    c = Conn(max_body=1024)
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunk * 2)
    out = c.out()
    assert out.startswith(b"HTTP/1.1 413 ") and c.closed
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw, status", [
    (b"GET /x\r\n\r\n", 400),
    (b"GET /x HTTP/2.0\r\n\r\n", 505),
    (b"GET /x HTTP/1.1\r\nHost : h\r\n\r\n", 400),  # whitespace before the colon
    (b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\n folded: x\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST /x HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
])
def test_malformed_requests_get_a_json_error_and_a_closed_connection(raw: bytes, status: int) -> None:
    c = Conn()
    c.send(raw)
    out = c.out()
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert b"application/json" in out and c.closed and c.root.proxied == []
    assert "error" in json.loads(out.split(b"\r\n\r\n", 1)[1])


def test_a_request_head_that_never_ends_gets_431() -> None:
    c = Conn()
    c.send(b"GET /x HTTP/1.1\r\n")
    for _ in range(MAX_HEAD_BYTES // 1000 + 1):
        c.send(b"X-Pad: " + b"p" * 990 + b"\r\n")
    out = c.out()
    assert out.startswith(b"HTTP/1.1 431 ") and c.closed


def test_expect_100_continue_is_answered_before_the_body() -> None:
    c = Conn()
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert c.out() == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"{}")
    assert c.root.proxied[0].body == b"{}"


def test_head_answers_carry_headers_and_no_body() -> None:
    c = Conn()
    c.send(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert c.out() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    assert not c.closed


def test_a_client_that_leaves_fails_notify_finish_and_writes_go_nowhere() -> None:
    c = Conn()
    c.root.auto = None
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    req = c.root.proxied[0]
    lost: list[Failure] = []
    req.notifyFinish().addErrback(lost.append)
    c.proto.connectionLost(Failure(ConnectionError("gone")))
    assert len(lost) == 1 and lost[0].check(ConnectionError)
    assert req.channel is None
    req.write(b"x")
    req.finish()
    assert c.out() == b""


def test_finishing_fires_notify_finish() -> None:
    c = Conn()
    c.root.auto = None
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    req = c.root.proxied[0]
    done: list[object] = []
    req.notifyFinish().addCallback(done.append)
    req.finish()
    assert done == [None]


def test_own_routes_are_rendered_by_twisted_web_on_the_same_connection() -> None:
    c = Conn()
    c.send(_post(b"/own", b"abc") + b"GET /proxied HTTP/1.1\r\nHost: h\r\n\r\n")
    out = c.out()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"own:abc" in out and b"Content-Length: 7" in out
    assert out.endswith(b"\r\n\r\nhello")  # then the proxied request, on the same connection
    assert len(c.root.own) == 1 and [r.path for r in c.root.proxied] == [b"/proxied"]
    assert not c.closed


def test_idle_connections_are_closed_but_busy_ones_are_not() -> None:
    c = Conn(idle_timeout=10)
    c.root.auto = None
    c.clock.advance(5)
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")  # busy from here on
    c.clock.advance(30)
    assert not c.closed
    c.root.proxied[0].finish()
    c.clock.advance(9)
    assert not c.closed
    c.clock.advance(5)
    assert c.closed


def test_a_trickled_request_head_does_not_keep_a_connection_open() -> None:
    c = Conn(idle_timeout=10)
    for _ in range(12):
        c.send(b"X")
        c.clock.advance(1)
    assert c.closed


def test_the_idle_sweep_stops_with_the_last_connection() -> None:
    c = Conn(idle_timeout=10)
    assert c.clock.getDelayedCalls()
    c.proto.connectionLost(Failure(ConnectionError()))
    c.clock.advance(10)
    assert c.clock.getDelayedCalls() == []


def test_pipelined_input_beyond_the_bound_pauses_reading_until_the_answer() -> None:
    c = Conn(max_body=1 << 20)
    c.root.auto = None
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    c.send(_post(b"/y", b"p" * (MAX_HELD_BYTES + 1)))
    assert c.transport.producerState == "paused"
    c.root.proxied[0].finish()
    assert c.transport.producerState == "producing"
    assert [r.path for r in c.root.proxied] == [b"/x", b"/y"]


def test_producers_are_registered_on_the_client_connection() -> None:
    c = Conn()
    c.root.auto = None
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    req = c.root.proxied[0]

    class P:
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    p: Any = P()
    req.registerProducer(p, True)
    assert c.transport.producer is p and c.transport.streaming
    req.unregisterProducer()
    assert c.transport.producer is None


def test_http10_keep_alive_is_honoured_when_the_answer_has_a_length() -> None:
    c = Conn()
    c.send(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    out = c.out()
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and b"connection: keep-alive" in out
    assert out.endswith(b"\r\n\r\nhello") and not c.closed
    c.send(b"GET /own HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # twisted.web renders this one
    out = c.out()
    assert b"own:" in out and b"Connection: keep-alive" in out and not c.closed
    c.root.auto = None
    c.send(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    req = c.root.proxied[-1]
    req.write(b"no length")
    req.finish()
    out = c.out()
    assert b"connection: close" in out and out.endswith(b"no length") and c.closed


def test_a_request_pipelined_after_a_chunked_body_is_not_lost() -> None:
    c = Conn()
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"2\r\n{}\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [(r.path, r.body) for r in c.root.proxied] == [(b"/v1/completions", b"{}"), (b"/next", b"")]


def test_the_client_address_is_the_connections_peer() -> None:
    c = Conn()
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert c.root.proxied[0].getClientAddress() == c.transport.getPeer()


def test_upstream_headers_reach_the_client_as_spelled_minus_hop_by_hop_and_with_the_length() -> None:
    from twisted.web.iweb import UNKNOWN_LENGTH

    from jano.headers import WireHeaders
    from jano.proxy import copy_response_headers

    class Upstream:
        code = 200
        phrase = b"OK"
        headers = WireHeaders.from_pairs([(b"X-Trace", b"1"), (b"x-private-hop", b"secret"),
                                          (b"Keep-Alive", b"timeout=5"), (b"content-type", b"a/b")])
        connection_tokens = frozenset({b"x-private-hop"})  # "Connection: x-private-hop"
        length: object = 5

    c = Conn()
    c.root.auto = None
    c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    req = c.root.proxied[0]
    copy_response_headers(Upstream(), req)  # type: ignore[arg-type]
    req.write(b"hello")
    req.finish()
    assert c.out() == (b"HTTP/1.1 200 OK\r\nX-Trace: 1\r\ncontent-type: a/b\r\n"
                       b"Content-Length: 5\r\n\r\nhello")
    Upstream.length = UNKNOWN_LENGTH  # no length upstream: the client gets it chunked
    c.send(b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n")
    req = c.root.proxied[1]
    copy_response_headers(Upstream(), req)  # type: ignore[arg-type]
    req.write(b"hello")
    req.finish()
    out = c.out()
    assert b"Content-Length" not in out and b"transfer-encoding: chunked" in out
