"""
Request smuggling and malformed messages, table-driven, through the whole
listener users run (``JanoSite`` -> Klein app -> forward -> a recording
backend), in memory.

The rule every row checks: the client and the backend can never disagree
about where a message ends.  Jano reads a request whole with Twisted's parser
and sends the backend a new message framed by ``Content-Length`` from
Twisted's client, so either the backend sees exactly the requests the client
sent (and nothing else), or the client gets an error and the backend sees
nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from jano.config import Config, ServerConfig
from jano.records import ModelSpec
from jano.service import JanoService
from jano.testing._memory import MemoryAgent, MemoryClient, RawConnection

BODY = b'{"model":"a","prompt":"hi"}'
CL = b"Content-Length: %d\r\n" % len(BODY)
POST = b"POST /completion HTTP/1.1\r\nHost: jano\r\n"
GET = b"GET /props HTTP/1.1\r\nHost: jano\r\n"


class Recorder(Resource):
    """The backend: records each request it parsed."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((request.method, request.uri,
                          {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                          request.content.read()))
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok":true}'


class Box:
    def __init__(self, upstream: Any = None, **server: Any) -> None:
        self.clock = Clock()
        self.backend = Recorder()
        self.upstream = upstream if upstream is not None else RequestTraversalAgent(self.backend)
        config = Config(models=(ModelSpec("a", "http://127.0.0.1:9001", always_on=True),),
                        server=ServerConfig(**server))
        self.svc = JanoService(config, self.clock, agent=self.upstream,
                               probe=lambda url: fail(ConnectionRefusedError()), listen=False)
        self.client = MemoryAgent(self.svc.site)

    def send(self, raw: bytes) -> RawConnection:
        conn = self.client.raw(raw)
        self.settle()
        return conn

    def settle(self) -> None:
        for _ in range(20):
            self.clock.advance(0)
            self.upstream.flush()


def statuses(out: bytes) -> list[int]:
    """Status codes of every response in ``out``, in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", out)]


# (id, raw request bytes, statuses the client gets, bodies the backend sees)
CASES: list[tuple[str, bytes, list[int], list[bytes]]] = [
    ("plain", POST + CL + b"\r\n" + BODY, [200], [BODY]),
    ("conflicting content-length", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n" + BODY,
     [400], []),
    ("duplicated content-length", POST + CL + CL + b"\r\n" + BODY, [400], []),
    ("content-length with a sign", POST + b"Content-Length: +27\r\n\r\n" + BODY, [400], []),
    ("content-length with a comma list", POST + b"Content-Length: 27, 27\r\n\r\n" + BODY, [400], []),
    ("content-length in hex", POST + b"Content-Length: 0x1b\r\n\r\n" + BODY, [400], []),
    ("content-length padded with spaces", POST + b"Content-Length:   27  \r\n\r\n" + BODY,
     [200], [BODY]),
    ("chunked, identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n1b\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    ("xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n1b\r\n" + BODY + b"\r\n0\r\n\r\n",
     [400], []),
    ("tab before chunked", POST + b"Transfer-Encoding:\tchunked\r\n\r\n1b\r\n" + BODY
     + b"\r\n0\r\n\r\n", [200], [BODY]),
    ("duplicated transfer-encoding", POST + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n1b\r\n" + BODY + b"\r\n0\r\n\r\n", [400], []),
    ("content-length and chunked", POST + CL + b"Transfer-Encoding: chunked\r\n\r\n1b\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    ("chunked and content-length", POST + b"Transfer-Encoding: chunked\r\n" + CL + b"\r\n1b\r\n"
     + BODY + b"\r\n0\r\n\r\n", [400], []),
    ("chunk size with 0x", POST + b"Transfer-Encoding: chunked\r\n\r\n0x1b\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    ("chunk size with a sign", POST + b"Transfer-Encoding: chunked\r\n\r\n+1b\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    ("negative chunk size", POST + b"Transfer-Encoding: chunked\r\n\r\n-1b\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    ("chunk size with trailing junk", POST + b"Transfer-Encoding: chunked\r\n\r\n1b junk\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    # A huge chunk size swallows what follows as chunk data: no answer yet, nothing
    # forwarded (test_a_huge_chunk_is_refused_at_the_body_limit shows the end of it).
    ("chunk size overflow", POST + b"Transfer-Encoding: chunked\r\n\r\n"
     + b"f" * 40 + b"\r\n" + BODY + b"\r\n0\r\n\r\n", [], []),
    ("chunk data longer than its size", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + BODY
     + b"\r\n0\r\n\r\n", [400], []),
    ("bare CR in a header value", GET + b"X-A: a\rX-Injected: 1\r\n\r\n", [400], []),
    ("NUL in a header value", GET + b"X-A: a\x00b\r\n\r\n", [400], []),
    ("whitespace before the colon", GET + b"X-A : a\r\n\r\n", [400], []),
    ("space in a header name", GET + b"X A: a\r\n\r\n", [400], []),
    ("missing host", b"GET /props HTTP/1.1\r\n\r\n", [400], []),
    ("duplicate host", GET + b"Host: evil\r\n\r\n", [400], []),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: jano\r\n\r\n", [400], []),
    ("authority-form", b"CONNECT gpu-box:8080 HTTP/1.1\r\nHost: jano\r\n\r\n", [400], []),
    ("target glued to a port-less upstream", b"GET http.attacker.example/x HTTP/1.1\r\n"
     b"Host: jano\r\n\r\n", [400], []),
    ("HTTP/0.9", b"GET /props\r\n\r\n", [400], []),
    ("HTTP/2.0 request line", b"GET /props HTTP/2.0\r\nHost: jano\r\n\r\n", [400], []),
    ("a request pipelined after a bad one", GET + b"X-A: a\x00\r\n\r\n" + GET + b"\r\n", [400], []),
    ("two good pipelined requests", GET + b"\r\n" + POST + CL + b"\r\n" + BODY, [200, 200],
     [b"", BODY]),
    ("a chunked body then a pipelined request", POST + b"Transfer-Encoding: chunked\r\n\r\n"
     b"1b\r\n" + BODY + b"\r\n0\r\n\r\n" + GET + b"\r\n", [200, 200], [BODY, b""]),
]


@pytest.mark.parametrize("raw,expect,forwarded", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_client_and_backend_agree_where_each_message_ends(raw: bytes, expect: list[int],
                                                           forwarded: list[bytes]) -> None:
    box = Box()
    conn = box.send(raw)
    assert statuses(conn.output) == expect
    assert [body for _, _, _, body in box.backend.seen] == forwarded
    for _, _, headers, body in box.backend.seen:  # the backend's framing is Jano's own
        assert b"transfer-encoding" not in headers
        assert headers.get(b"content-length", [b"0"]) == [b"%d" % len(body)]
    if expect and expect[-1] >= 400:
        assert conn.closed


def test_a_huge_chunk_is_refused_at_the_body_limit() -> None:
    box = Box(max_body_bytes=4096)
    conn = box.send(POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n")
    conn.send(b"x" * 5000)
    box.settle()
    assert statuses(conn.output) == [413] and box.backend.seen == [] and conn.closed


@pytest.mark.parametrize("target", [b"//props", b"/v1//models?x=%20", b"/props%3Fnot-a-query"])
def test_odd_but_valid_paths_are_forwarded_as_they_came(target: bytes) -> None:
    box = Box()
    conn = box.send(b"GET " + target + b" HTTP/1.1\r\nHost: jano\r\n\r\n")
    assert statuses(conn.output) == [200]
    assert box.backend.seen[0][1] == target


@pytest.mark.parametrize("target", [b"/../props", b"/%2e%2e/props", b"/a/%2E%2e%2fprops",
                                    b"/props%00", b"/v1/%2e%2e"])
def test_dot_dot_and_nul_are_refused_encoded_or_not(target: bytes) -> None:
    box = Box()
    conn = box.send(b"GET " + target + b" HTTP/1.1\r\nHost: jano\r\n\r\n")
    assert statuses(conn.output) == [400] and box.backend.seen == []


def test_obs_fold_becomes_one_value_and_injects_nothing() -> None:
    box = Box()
    conn = box.send(GET + b"X-A: a\r\n b\r\nX-B: c\r\n\r\n")
    assert statuses(conn.output) == [200]
    headers = box.backend.seen[0][2]
    assert headers[b"x-a"] == [b"a b"] and headers[b"x-b"] == [b"c"]


def test_absolute_form_goes_to_the_configured_upstream_only() -> None:
    box = Box()
    conn = box.send(b"POST http://attacker.example/completion?q=1 HTTP/1.1\r\nHost: jano\r\n"
                    + CL + b"\r\n" + BODY)
    assert statuses(conn.output) == [200]
    method, uri, _, body = box.backend.seen[0]
    assert (method, uri, body) == (b"POST", b"/completion?q=1", BODY)


def test_a_chunk_extension_that_never_ends_is_refused_without_growing() -> None:
    box = Box()
    conn = box.send(POST + b"Transfer-Encoding: chunked\r\n\r\n1b;" + b"x" * 70_000)
    assert statuses(conn.output) == [400] and box.backend.seen == [] and conn.closed


def test_bare_lf_line_ends_are_not_a_request_and_the_connection_times_out() -> None:
    box = Box(idle_timeout=60.0)
    conn = box.send(b"GET /props HTTP/1.1\nHost: jano\n\n")
    assert box.backend.seen == [] and statuses(conn.output) == []
    box.clock.advance(61)
    assert conn.closed and box.backend.seen == []


# --- the upstream side: what a backend sends that a client must never see as-is ---------------


class Canned(Protocol):
    """A backend that answers any request head with fixed bytes."""

    def __init__(self, answer: bytes, close: bool) -> None:
        self.answer, self.close, self.buf = answer, close, b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf and self.transport is not None:
            answer, self.answer = self.answer, b""
            if answer:
                self.transport.write(answer)
            if self.close:
                self.transport.loseConnection()


def canned(answer: bytes, close: bool = False) -> MemoryAgent:
    factory = ServerFactory()
    factory.buildProtocol = lambda addr: Canned(answer, close)  # type: ignore[method-assign]
    return MemoryAgent(factory)


def through(answer: bytes, method: str = "POST", close: bool = False) -> tuple[Optional[int], bytes, Any]:
    """Send one request through Jano to a canned backend; (status, body, headers) or (None, b"", error)."""
    upstream = canned(answer, close)
    box = Box(upstream=upstream)
    client = MemoryClient(box.svc.site)
    got: list[Any] = []
    data = BODY if method == "POST" else None
    client.request(method, "http://jano/completion", data=data).addBoth(got.append)
    for _ in range(30):
        box.clock.advance(0)
        client.flush()
        upstream.flush()
    resp = got[0]
    if not hasattr(resp, "code"):
        return None, b"", resp
    body: list[Any] = []
    client.content(resp).addBoth(body.append)
    for _ in range(30):
        box.clock.advance(0)
        client.flush()
        upstream.flush()
    return resp.code, body[0] if isinstance(body[0], bytes) else b"", resp.headers


def test_backend_sending_both_length_and_chunked_is_reframed_by_chunked() -> None:
    code, body, headers = through(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
                                  b"\r\n5\r\nhello\r\n0\r\n\r\n")
    # RFC 9112 6.3: Transfer-Encoding wins; the client gets Jano's own framing of "hello".
    assert (code, body) == (200, b"hello")


def test_a_body_on_204_never_reaches_the_client() -> None:
    code, body, headers = through(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", close=True)
    assert (code, body) == (204, b"")
    assert headers.getRawHeaders("content-length") is None


def test_a_head_answer_carries_no_body() -> None:
    code, body, _ = through(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", method="HEAD",
                            close=True)
    assert (code, body) == (200, b"")


def test_cr_inside_an_upstream_header_value_is_never_a_header_line_for_the_client() -> None:
    code, body, headers = through(b"HTTP/1.1 200 OK\r\nX-A: a\rX-Injected: 1\r\nContent-Length: 2\r\n\r\nok")
    if code is not None:  # Twisted's client may refuse the answer (502); it must not split it
        assert headers.getRawHeaders("x-injected") is None
        assert all(b"\r" not in v and b"\n" not in v
                   for _, vs in headers.getAllRawHeaders() for v in vs)


def test_an_interim_1xx_answer_is_not_passed_off_as_the_final_one() -> None:
    code, body, _ = through(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert code in (200, 502)
    if code == 200:
        assert body == b"ok"


def test_a_close_before_the_declared_length_cuts_the_client_too() -> None:
    code, body, err = through(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel", close=True)
    assert code == 200 and body == b""  # the body never completes for the client


def test_an_upstream_error_never_shows_the_upstream_address() -> None:
    box = Box(upstream=canned(b"", close=True))
    client = MemoryClient(box.svc.site)
    got: list[Any] = []
    client.post("http://jano/completion", data=BODY).addBoth(got.append)
    for _ in range(30):
        box.clock.advance(0)
        client.flush()
        box.upstream.flush()
    resp = got[0]
    body: list[Any] = []
    client.content(resp).addBoth(body.append)
    client.flush()
    assert resp.code == 502
    assert b"127.0.0.1" not in body[0] and b"9001" not in body[0]
    assert json.loads(body[0])["error"]["type"] == "upstream_error"
