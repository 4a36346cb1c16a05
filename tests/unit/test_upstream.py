"""
The lean upstream client: request bytes, response framing, the keep-alive
pool, flow control and cancellation.

Most tests drive a connection by hand over ``StringTransport`` with a
``MemoryReactorClock``; a few use real loopback sockets where the point is
the socket (refused connections, reuse of one TCP connection).
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IConsumer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, UNKNOWN_LENGTH
from zope.interface import implementer

from jano.upstream import (
    ChunkedDecoder, MalformedResponse, UpstreamAgent, parse_response_head,
)


# --- fakes ---------------------------------------------------------------------------


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """A StringTransport that records TCP_NODELAY and tells abort from close."""

    def __init__(self) -> None:
        super().__init__()
        self.nodelay = False
        self.aborted = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class BytesBody:
    """Shaped like jano.proxy.BytesProducer: the body is a public attribute."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        raise AssertionError("the agent must send .body without running the producer")

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class PiecewiseProducer:
    """A generic body producer with no ``body`` attribute."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces
        self.length = UNKNOWN_LENGTH

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for piece in self.pieces:
            consumer.write(piece)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Collector(Protocol):
    """A deliverBody target that records everything it is told."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reasons: list[Failure] = []
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reasons.append(reason)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def reason(self) -> Failure:
        assert len(self.reasons) == 1, self.reasons
        return self.reasons[0]


class Upstream:
    """One fake upstream connection, opened by the agent on a MemoryReactorClock."""

    def __init__(self, reactor: MemoryReactorClock, index: int = -1) -> None:
        host, port, factory, _timeout, _bind = reactor.tcpClients[index]
        self.host, self.port = host, port
        self.protocol = factory.buildProtocol(None)
        self.transport = TCPTransport()
        self.protocol.makeConnection(self.transport)

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.dataReceived(piece)

    def lose(self, reason: Optional[Failure] = None) -> None:
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))


URL = b"http://127.0.0.1:8080/v1/chat/completions"
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"


def agent_and_reactor(**kwargs: Any) -> tuple[UpstreamAgent, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    return UpstreamAgent(reactor, **kwargs), reactor


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (a Failure if it failed)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def get(agent: UpstreamAgent, reactor: MemoryReactorClock, uri: bytes = URL,
        method: bytes = b"GET") -> tuple[Deferred[Any], Upstream]:
    """Start a request that needs a new connection, and connect it."""
    before = len(reactor.tcpClients)
    d = agent.request(method, uri)
    assert len(reactor.tcpClients) == before + 1, "expected a new connection"
    return d, Upstream(reactor)


def respond(agent: UpstreamAgent, reactor: MemoryReactorClock, *pieces: bytes,
            method: bytes = b"GET") -> tuple[Any, Collector, Upstream]:
    """One request on a new connection, answered with ``pieces``; the body is collected."""
    d, up = get(agent, reactor, method=method)
    body = Collector()
    d.addCallback(lambda response: (response.deliverBody(body), response)[1])
    up.reply(*pieces)
    return result_of(d), body, up


# --- request bytes -------------------------------------------------------------------


def test_request_is_serialized_exactly_in_one_write() -> None:
    agent, reactor = agent_and_reactor()
    headers = Headers({b"Content-Type": [b"application/json"], b"X-Many": [b"a", b"b"]})
    writes: list[bytes] = []
    agent.request(b"POST", URL + b"?stream=1", headers, BytesBody(b'{"x":1}'))
    up = Upstream(reactor)
    assert (up.host, up.port) == ("127.0.0.1", 8080)
    writes.append(up.sent())
    assert writes == [
        b"POST /v1/chat/completions?stream=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8080\r\n"
        b"Content-Type: application/json\r\n"
        b"X-Many: a\r\nX-Many: b\r\n"
        b"Content-Length: 7\r\n\r\n"
        b'{"x":1}'
    ]
    assert up.transport.nodelay


def test_no_body_means_no_content_length_except_for_post_put_patch() -> None:
    agent, reactor = agent_and_reactor()
    agent.request(b"GET", b"http://127.0.0.1:8080")
    assert Upstream(reactor).sent() == b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    agent.request(b"POST", b"http://127.0.0.1/x")
    assert Upstream(reactor).sent() == (
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")


def test_callers_host_wins_and_callers_framing_headers_are_dropped() -> None:
    agent, reactor = agent_and_reactor()
    headers = Headers({b"Host": [b"model.local"], b"Content-Length": [b"99"],
                       b"Transfer-Encoding": [b"chunked"], b"Accept": [b"*/*"]})
    agent.request(b"PUT", URL, headers, BytesBody(b"abc"))
    assert Upstream(reactor).sent() == (
        b"PUT /v1/chat/completions HTTP/1.1\r\nHost: model.local\r\nAccept: */*\r\n"
        b"Content-Length: 3\r\n\r\nabc")


def test_jano_wire_headers_go_out_as_spelled_with_the_agents_framing() -> None:
    from jano.headers import WireHeaders

    agent, reactor = agent_and_reactor()
    headers = WireHeaders.from_pairs([(b"content-type", b"application/json"), (b"X-Many", b"a"),
                                      (b"x-many", b"b"), (b"CONTENT-LENGTH", b"99")])
    agent.request(b"POST", URL, headers, BytesBody(b'{"x":1}'))
    assert Upstream(reactor).sent() == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"content-type: application/json\r\nX-Many: a\r\nX-Many: b\r\n"
        b"Content-Length: 7\r\n\r\n{\"x\":1}")
    agent.request(b"GET", b"http://127.0.0.1:8081/", WireHeaders.from_pairs([(b"hOST", b"m.local")]))
    assert Upstream(reactor).sent() == b"GET / HTTP/1.1\r\nhOST: m.local\r\n\r\n"


def test_a_generic_body_producer_is_collected_and_sent_with_a_length() -> None:
    agent, reactor = agent_and_reactor()
    agent.request(b"POST", URL, None, PiecewiseProducer(b"ab", b"cd"))
    assert Upstream(reactor).sent().endswith(b"Content-Length: 4\r\n\r\nabcd")


@pytest.mark.parametrize(("uri", "where", "head"), [
    (b"http://[::1]:9000/a?b=c", ("::1", 9000), b"GET /a?b=c HTTP/1.1\r\nHost: [::1]:9000\r\n"),
    (b"http://10.0.0.2?q=1", ("10.0.0.2", 80), b"GET /?q=1 HTTP/1.1\r\nHost: 10.0.0.2\r\n"),
    (b"HTTP://127.0.0.1:81/p#frag", ("127.0.0.1", 81),
     b"GET /p HTTP/1.1\r\nHost: 127.0.0.1:81\r\n"),
])
def test_uris_are_split_into_where_to_connect_host_and_target(
        uri: bytes, where: tuple[str, int], head: bytes) -> None:
    agent, reactor = agent_and_reactor()
    agent.request(b"GET", uri)
    up = Upstream(reactor)
    assert (up.host, up.port) == where
    assert up.sent() == head + b"\r\n"


@pytest.mark.parametrize("uri", [
    b"https://127.0.0.1/", b"ftp://x/", b"http:///path", b"http://:80/", b"http://host:0/",
    b"http://host:99999/", b"http://host:8a/", b"http://user@host/", b"http://[::1/",
    b"http://[nothex]:80/", b"http://a b/", b"http://host/a b", b"http://host/a\r\nX: y",
])
def test_bad_uris_fail_with_value_error_and_connect_nowhere(uri: bytes) -> None:
    agent, reactor = agent_and_reactor()
    failure = result_of(agent.request(b"GET", uri))
    assert isinstance(failure, Failure) and failure.check(ValueError)
    assert reactor.tcpClients == []


def test_a_method_that_is_not_a_token_is_refused() -> None:
    agent, reactor = agent_and_reactor()
    failure = result_of(agent.request(b"GET /x HTTP/1.1\r\n", URL))
    assert failure.check(ValueError)
    assert reactor.tcpClients == []
    agent.request(b"PROPFIND", URL)
    assert Upstream(reactor).sent().startswith(b"PROPFIND /v1/chat/completions HTTP/1.1\r\n")


# --- response framing ----------------------------------------------------------------


def test_content_length_body_is_delivered_read_by_read() -> None:
    agent, reactor = agent_and_reactor()
    response, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 11\r\n\r\nhel",
                                 b"lo ", b"world")
    assert (response.code, response.phrase, response.version) == (200, b"OK", (b"HTTP", 1, 1))
    assert response.length == 11
    assert body.chunks == [b"hel", b"lo ", b"world"]
    assert body.reason.check(ResponseDone)
    assert not up.transport.disconnecting  # kept for reuse


def test_body_bytes_after_the_head_in_the_same_read_go_straight_to_the_consumer() -> None:
    agent, reactor = agent_and_reactor()
    response, body, _ = respond(agent, reactor, OK_HEAD + b"Content-Length: 5\r\n\r\nhello")
    assert body.chunks == [b"hello"] and body.reason.check(ResponseDone)


def chunked_message() -> bytes:
    return (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n"
            b"1\r\n \r\n"
            b"A ; x=\"y\"\r\n0123456789\r\n"
            b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n")


def test_chunked_body_with_extensions_and_trailers() -> None:
    agent, reactor = agent_and_reactor()
    response, body, up = respond(agent, reactor, chunked_message())
    assert response.length is UNKNOWN_LENGTH
    assert body.body == b"hello 0123456789"
    assert body.reason.check(ResponseDone)
    assert not up.transport.disconnecting
    assert response.headers.getRawHeaders(b"x-trailer") is None


@pytest.mark.parametrize("split", range(1, len(chunked_message())))
def test_chunked_body_split_at_every_position(split: int) -> None:
    agent, reactor = agent_and_reactor()
    message = chunked_message()
    _, body, up = respond(agent, reactor, message[:split], message[split:])
    assert body.body == b"hello 0123456789"
    assert body.reason.check(ResponseDone)
    assert not up.transport.disconnecting


def test_chunked_decoder_every_pair_of_split_points() -> None:
    encoded = chunked_message()[len(OK_HEAD) + len(b"Transfer-Encoding: chunked\r\n\r\n"):]
    for i in range(len(encoded) + 1):
        for j in range(i, len(encoded) + 1):
            decoder = ChunkedDecoder()
            out = b"".join(decoder.feed(p) for p in (encoded[:i], encoded[i:j], encoded[j:]))
            assert out == b"hello 0123456789", (i, j)
            assert decoder.done and not decoder.extra


def encode_chunked(chunks: list[bytes], trailers: list[bytes]) -> bytes:
    out = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=6),
       trailers=st.lists(st.sampled_from([b"A: 1", b"Digest: x=y"]), max_size=2),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_chunked_decoder_any_split(chunks: list[bytes], trailers: list[bytes],
                                   cuts: list[int]) -> None:
    encoded = encode_chunked(chunks, trailers)
    points = sorted({c % (len(encoded) + 1) for c in cuts})
    pieces = [encoded[a:b] for a, b in zip([0, *points], [*points, len(encoded)])]
    decoder = ChunkedDecoder()
    assert b"".join(decoder.feed(p) for p in pieces) == b"".join(chunks)
    assert decoder.done and not decoder.extra


def test_whole_chunks_in_one_read() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b'e\r\ndata: {"a":1}\n\r\n') == b'data: {"a":1}\n'
    assert decoder.feed(b"3\r\nabc\r\n3\r\ndef\r\n") == b"abcdef"
    assert not decoder.done
    assert decoder.feed(b"0\r\n\r\nHTTP/1.1") == b""
    assert decoder.done and decoder.extra


@pytest.mark.parametrize("bad", [
    b"zz\r\n", b"-1\r\n", b"0x5\r\nhello\r\n", b"1_0\r\n", b"5\r\nhelloXX",
    b"1" * 17 + b"\r\n", b"5" + b";" * 5000,
])
def test_chunked_decoder_rejects_bad_framing(bad: bytes) -> None:
    decoder = ChunkedDecoder()
    decoder.feed(bad)
    assert isinstance(decoder.error, MalformedResponse)
    assert not decoder.done
    assert decoder.feed(b"1\r\na\r\n") == b""  # nothing more after an error


def test_chunked_decoder_returns_the_payload_before_bad_framing() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\nzz\r\n") == b"abc"
    assert decoder.error is not None


def test_chunked_trailers_are_bounded() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n")
    for _ in range(100):
        decoder.feed(b"X-Big: " + b"x" * 1000 + b"\r\n")
    assert decoder.error is not None and not decoder.done


def test_bad_chunk_framing_fails_the_body_and_aborts_the_connection() -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                                          b"3\r\nabc\r\nnope\r\n")
    assert body.body == b"abc"
    assert body.reason.check(ResponseFailed)
    assert body.reason.value.reasons[0].check(MalformedResponse)
    assert up.transport.aborted


def test_chunked_wins_over_content_length_but_the_connection_is_not_reused() -> None:
    agent, reactor = agent_and_reactor()
    response, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 100\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert body.body == b"ok" and body.reason.check(ResponseDone)
    assert up.transport.disconnecting and not up.transport.aborted


def test_close_delimited_body_ends_with_potential_data_loss() -> None:
    agent, reactor = agent_and_reactor()
    response, body, up = respond(agent, reactor, OK_HEAD + b"\r\nsome", b" more")
    assert response.length is UNKNOWN_LENGTH
    assert body.chunks == [b"some", b" more"] and body.reasons == []
    up.lose()
    assert body.body == b"some more"
    assert body.reason.check(PotentialDataLoss)


def test_close_delimited_body_cut_by_a_reset_is_a_failure() -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, OK_HEAD + b"\r\nsome")
    up.lose(Failure(ConnectionLost()))
    assert body.reason.check(ResponseFailed)


@pytest.mark.parametrize(("method", "status"), [
    (b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified"),
])
def test_no_body_responses_end_at_once_and_keep_the_connection(method: bytes,
                                                                 status: bytes) -> None:
    agent, reactor = agent_and_reactor()
    response, body, up = respond(
        agent, reactor, b"HTTP/1.1 " + status + b"\r\nContent-Length: 42\r\nETag: \"x\"\r\n\r\n",
        method=method)
    assert response.length == 0
    assert body.made and body.chunks == [] and body.reason.check(ResponseDone)
    assert not up.transport.disconnecting
    # The next request reuses the connection.
    up.sent()
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == 1
    assert up.sent().startswith(b"GET /v1/chat/completions HTTP/1.1\r\n")


def test_head_response_keeps_its_content_length_header() -> None:
    agent, reactor = agent_and_reactor()
    response, _, _ = respond(agent, reactor, OK_HEAD + b"Content-Length: 42\r\n\r\n",
                             method=b"HEAD")
    assert response.headers.getRawHeaders(b"content-length") == [b"42"]


def test_interim_responses_are_skipped() -> None:
    agent, reactor = agent_and_reactor()
    _, body, _ = respond(agent, reactor, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early",
                         b" Hints\r\nLink: </a>\r\n\r\n", OK_HEAD + b"Content-Length: 2\r\n\r\nok")
    assert body.body == b"ok" and body.reason.check(ResponseDone)


def test_101_is_a_failure() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    failure = result_of(d)
    assert failure.check(ResponseFailed)
    assert up.transport.aborted


def test_headers_are_end_to_end_only_with_framing_exposed_separately() -> None:
    agent, reactor = agent_and_reactor()
    response, _, _ = respond(
        agent, reactor,
        b"HTTP/1.1 200 Fine Thanks\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Connection: keep-alive, X-Private\r\nconnection: Upgrade\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
        b"Proxy-Connection: close\r\nContent-Length: 0\r\n"
        b"Set-Cookie: a=1\r\nX-Private: 1\r\nset-cookie: b=2\r\nSet-Cookie:   c=3  \r\n\r\n")
    assert response.phrase == b"Fine Thanks"
    assert response.length == 0
    assert response.connection_tokens == frozenset({b"keep-alive", b"x-private", b"upgrade"})
    assert sorted(name.lower() for name, _ in response.headers.getAllRawHeaders()) == [
        b"content-type", b"set-cookie", b"x-private"]
    assert response.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2", b"c=3"]


def test_status_line_without_phrase() -> None:
    head = parse_response_head(b"HTTP/1.0 404")
    assert (head.code, head.phrase, head.version, head.keep_alive) == (
        404, b"", (b"HTTP", 1, 0), False)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 2000 OK", b"HTTP/1.1 OK", b"HTTP/2 200 OK", b"ICY 200 OK", b"HTTP/1.1 20 OK",
    b"HTTP/1.1 200 OK\r\n folded: no", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tmore",
    b"HTTP/1.1 200 OK\r\nno colon here", b"HTTP/1.1 200 OK\r\nBad Name: 1",
    b"HTTP/1.1 200 OK\r\nX: a\nY: b", b"HTTP/1.1 200 OK\r\nContent-Length: -1",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1e3", b"HTTP/1.1 200 OK\r\nContent-Length: ",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
])
def test_malformed_heads_are_rejected(head: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_response_head(head)


def test_agreeing_repeated_content_lengths_are_one_length() -> None:
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5")
    assert head.content_length == 5


def test_malformed_status_line_fails_the_request_and_aborts() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.reply(b"HTTP/1.1 OK 200\r\n\r\n")
    failure = result_of(d)
    assert failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(MalformedResponse)
    assert "status line" in failure.value.reasons[0].getErrorMessage()
    assert up.transport.aborted


@pytest.mark.parametrize("one_read", [False, True])
def test_a_head_over_64_kib_fails_and_aborts(one_read: bool) -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    lines = [b"X-Filler-%d: %s\r\n" % (i, b"x" * 1000) for i in range(70)]
    if one_read:
        up.reply(OK_HEAD + b"".join(lines) + b"\r\nbody")
    else:
        up.reply(OK_HEAD)
        for line in lines:
            up.reply(line)
    failure = result_of(d)
    assert failure.check(ResponseFailed)
    assert "64 KiB" in failure.value.reasons[0].getErrorMessage()
    assert up.transport.aborted


def test_a_head_split_byte_by_byte_is_found() -> None:
    agent, reactor = agent_and_reactor()
    message = OK_HEAD + b"Content-Length: 2\r\n\r\nok"
    _, body, _ = respond(agent, reactor, *(message[i:i + 1] for i in range(len(message))))
    assert body.body == b"ok" and body.reason.check(ResponseDone)


# --- failures ------------------------------------------------------------------------


def test_connection_lost_mid_body_is_response_failed() -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 10\r\n\r\nabc")
    up.lose(Failure(ConnectionLost()))
    assert body.body == b"abc"
    assert body.reason.check(ResponseFailed)
    assert body.reason.value.reasons[0].check(ConnectionLost)


def test_connection_lost_before_any_byte_is_response_never_received() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.lose()
    failure = result_of(d)
    assert failure.check(ResponseNeverReceived)


def test_connection_lost_inside_the_head_is_response_never_received() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.reply(b"HTTP/1.1 200 OK\r\nContent-")
    up.lose(Failure(ConnectionLost()))
    assert result_of(d).check(ResponseNeverReceived)


def reuse_one_connection(agent: UpstreamAgent, reactor: MemoryReactorClock) -> Upstream:
    _, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 0\r\n\r\n")
    assert body.reason.check(ResponseDone)
    up.sent()
    return up


def test_post_on_a_reused_connection_that_dies_is_not_retried() -> None:
    agent, reactor = agent_and_reactor()
    up = reuse_one_connection(agent, reactor)
    d = agent.request(b"POST", URL, None, BytesBody(b"{}"))
    assert up.sent().startswith(b"POST ")
    up.lose()
    assert result_of(d).check(ResponseNeverReceived)
    assert len(reactor.tcpClients) == 1


def test_get_on_a_reused_connection_that_dies_is_retried_once_on_a_new_one() -> None:
    agent, reactor = agent_and_reactor()
    up = reuse_one_connection(agent, reactor)
    d = agent.request(b"GET", URL)
    up.lose()
    assert not d.called and len(reactor.tcpClients) == 2
    fresh = Upstream(reactor)
    assert fresh.sent().startswith(b"GET /v1/chat/completions ")
    fresh.lose()  # a fresh connection failing is not retried
    assert result_of(d).check(ResponseNeverReceived)
    assert len(reactor.tcpClients) == 2


@pytest.mark.integration  # a real loopback socket
@pytest_twisted.inlineCallbacks
def test_connection_refused_is_passed_on_unchanged() -> Any:
    from twisted.internet import reactor

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = UpstreamAgent(reactor)
    with pytest.raises(ConnectionRefusedError):
        yield agent.request(b"GET", b"http://127.0.0.1:%d/" % port)


# --- the pool ------------------------------------------------------------------------


class CountingServer(Protocol):
    """A tiny HTTP/1.1 server: answers each request with its body, counts connections."""

    def __init__(self, factory: CountingFactory) -> None:
        self.factory = factory
        self.buf = b""

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buf = rest[:length], rest[length:]
            self.factory.heads.append(head)
            extra = b"Connection: close\r\n" if self.factory.close else b""
            self.transport.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s"
                                 % (extra, len(body) + 5, b"echo:" + body))
            if self.factory.close:
                self.transport.loseConnection()


class CountingFactory(Factory):
    def __init__(self, close: bool = False) -> None:
        self.close = close
        self.connections = 0
        self.heads: list[bytes] = []

    def buildProtocol(self, addr: Any) -> CountingServer:
        return CountingServer(self)


@pytest.mark.integration  # a real loopback socket
@pytest.mark.parametrize("close", [False, True])
@pytest_twisted.inlineCallbacks
def test_sequential_requests_share_one_tcp_connection_unless_told_to_close(close: bool) -> Any:
    from twisted.internet import reactor

    factory = CountingFactory(close=close)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    agent = UpstreamAgent(reactor)
    try:
        url = b"http://127.0.0.1:%d/x" % port.getHost().port
        for i in range(3):
            response = yield agent.request(b"POST", url, None, BytesBody(b"n%d" % i))
            assert (yield readBody(response)) == b"echo:n%d" % i
        assert factory.connections == (3 if close else 1)
        assert len(factory.heads) == 3
    finally:
        yield agent.close_idle()
        yield port.stopListening()


@pytest.mark.integration  # a real loopback socket
@pytest_twisted.inlineCallbacks
def test_hostnames_connect_through_a_hostname_endpoint() -> Any:
    from twisted.internet import reactor

    factory = CountingFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    agent = UpstreamAgent(reactor)
    try:
        url = b"http://localhost:%d/y" % port.getHost().port
        response = yield agent.request(b"GET", url)
        assert (yield readBody(response)) == b"echo:"
        assert factory.heads[0].split(b"\r\n")[1] == b"Host: localhost:%d" % port.getHost().port
    finally:
        yield agent.close_idle()
        yield port.stopListening()


@pytest.mark.parametrize(("status", "connection", "reused"), [
    (b"HTTP/1.1 200 OK", b"", True),
    (b"HTTP/1.1 200 OK", b"Connection: close\r\n", False),
    (b"HTTP/1.1 200 OK", b"Connection: keep-alive, close\r\n", False),
    (b"HTTP/1.0 200 OK", b"", False),
    (b"HTTP/1.0 200 OK", b"Connection: Keep-Alive\r\n", True),
])
def test_persistence_follows_version_and_connection_header(status: bytes, connection: bytes,
                                                           reused: bool) -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, status + b"\r\n" + connection +
                          b"Content-Length: 2\r\n\r\nok")
    assert body.reason.check(ResponseDone)
    assert up.transport.disconnecting == (not reused)
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == (1 if reused else 2)


def test_extra_bytes_after_the_body_mean_no_reuse() -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 2\r\n\r\nokEXTRA")
    assert body.body == b"ok" and body.reason.check(ResponseDone)
    assert up.transport.disconnecting


def test_bytes_on_an_idle_connection_close_it_and_it_leaves_the_pool() -> None:
    agent, reactor = agent_and_reactor()
    up = reuse_one_connection(agent, reactor)
    up.reply(b"HTTP/1.1 200 OK\r\n\r\n")
    assert up.transport.aborted
    up.lose()
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == 2
    assert reactor.getDelayedCalls() == []


def test_an_idle_connection_the_server_closes_leaves_the_pool() -> None:
    agent, reactor = agent_and_reactor()
    up = reuse_one_connection(agent, reactor)
    assert len(reactor.getDelayedCalls()) == 1  # the idle sweep
    up.lose()
    assert reactor.getDelayedCalls() == []
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == 2


def test_idle_connections_expire() -> None:
    agent, reactor = agent_and_reactor(idle_timeout=3.0)
    up = reuse_one_connection(agent, reactor)
    reactor.advance(2.5)
    assert not up.transport.disconnecting
    reactor.advance(0.5)
    assert up.transport.disconnecting
    assert reactor.getDelayedCalls() == []  # nothing idle, no timer
    up.lose()
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == 2


def test_an_expired_connection_is_not_checked_out_even_before_the_sweep() -> None:
    agent, reactor = agent_and_reactor(idle_timeout=3.0)
    up = reuse_one_connection(agent, reactor)
    reactor.rightNow += 5.0  # the clock jumped; the sweep has not run yet
    agent.request(b"GET", URL)
    assert up.transport.disconnecting
    assert len(reactor.tcpClients) == 2


def test_the_sweep_rearms_for_the_next_expiry() -> None:
    agent, reactor = agent_and_reactor(idle_timeout=3.0)
    first = reuse_one_connection(agent, reactor)
    reactor.advance(2.0)
    # A second connection goes idle two seconds later.
    d1 = agent.request(b"GET", URL)  # reuses `first`
    d2, second = get(agent, reactor)
    for up in (first, second):
        up.reply(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    assert not isinstance(result_of(d1), Failure) and not isinstance(result_of(d2), Failure)
    reactor.advance(1.0)  # the first sweep: nothing expired yet (both idle since t=2)
    assert not first.transport.disconnecting and not second.transport.disconnecting
    reactor.advance(2.0)
    assert first.transport.disconnecting and second.transport.disconnecting
    assert reactor.getDelayedCalls() == []


def test_the_pool_keeps_at_most_max_idle_per_host_evicting_the_oldest() -> None:
    agent, reactor = agent_and_reactor(max_idle_per_host=1)
    d1, one = get(agent, reactor)
    d2, two = get(agent, reactor)
    one.reply(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    two.reply(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    assert one.transport.disconnecting and not two.transport.disconnecting
    agent.request(b"GET", URL)
    assert two.sent().startswith(b"GET ")


def test_close_idle_closes_idle_connections_and_fires_when_they_are_gone() -> None:
    agent, reactor = agent_and_reactor()
    up = reuse_one_connection(agent, reactor)
    d = agent.close_idle()
    assert up.transport.disconnecting and not up.transport.aborted
    assert not d.called
    assert reactor.getDelayedCalls() == []
    up.lose()
    assert result_of(d) is None
    assert result_of(agent.close_idle()) is None  # nothing idle: fires at once


# --- cancellation and flow control ---------------------------------------------------


def test_cancel_before_the_head_aborts_and_never_pools_the_connection() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.reply(b"HTTP/1.1 200 O")
    d.cancel()
    assert result_of(d).check(CancelledError)
    assert up.transport.aborted
    up.reply(b"K\r\nContent-Length: 0\r\n\r\n")  # too late: ignored
    up.lose(Failure(ConnectionLost()))
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == 2


def test_cancel_while_connecting_gives_cancelled_error() -> None:
    agent, reactor = agent_and_reactor()
    d = agent.request(b"GET", URL)
    d.cancel()
    assert result_of(d).check(CancelledError)
    assert reactor.connectors[0].stoppedConnecting


def test_stop_producing_aborts_and_the_consumer_hears_once() -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 10\r\n\r\nabc")
    body.transport.stopProducing()
    assert up.transport.aborted
    up.reply(b"defghij")  # already in flight: not delivered
    assert body.body == b"abc" and body.reasons == []
    up.lose(Failure(ConnectionLost()))
    assert body.reason.check(ResponseFailed)
    agent.request(b"GET", URL)
    assert len(reactor.tcpClients) == 2


def test_stop_producing_inside_the_last_data_received_does_not_pool() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)

    class Stopper(Collector):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.stopProducing()

    body = Stopper()
    d.addCallback(lambda response: response.deliverBody(body))
    up.reply(OK_HEAD + b"Content-Length: 3\r\n\r\n", b"abc")
    assert up.transport.aborted and body.reasons == []
    up.lose(Failure(ConnectionLost()))
    assert body.reason.check(ResponseFailed)


def test_pause_and_resume_reach_the_transport_and_pooling_resumes_it() -> None:
    agent, reactor = agent_and_reactor()
    _, body, up = respond(agent, reactor, OK_HEAD + b"Content-Length: 6\r\n\r\nabc")
    body.transport.pauseProducing()
    assert up.transport.producerState == "paused"
    body.transport.resumeProducing()
    assert up.transport.producerState == "producing"
    body.transport.pauseProducing()
    up.reply(b"def")  # the last bytes were already in flight
    assert body.reason.check(ResponseDone)
    assert up.transport.producerState == "producing" and not up.transport.disconnecting
    body.transport.pauseProducing()  # after the end: no effect on the pooled connection
    assert up.transport.producerState == "producing"


def test_body_bytes_before_deliver_body_are_held_and_reading_paused() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.reply(OK_HEAD + b"Content-Length: 6\r\n\r\nab")
    response = result_of(d)
    up.reply(b"cd")
    assert up.transport.producerState == "paused"
    body = Collector()
    response.deliverBody(body)
    assert body.chunks == [b"ab", b"cd"]
    assert up.transport.producerState == "producing"
    up.reply(b"ef")
    assert body.chunks == [b"ab", b"cd", b"ef"] and body.reason.check(ResponseDone)


def test_a_body_complete_before_deliver_body_is_delivered_whole() -> None:
    agent, reactor = agent_and_reactor()
    d, up = get(agent, reactor)
    up.reply(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    response = result_of(d)
    assert not up.transport.disconnecting  # already back in the pool
    body = Collector()
    response.deliverBody(body)
    assert body.body == b"ab" and body.reason.check(ResponseDone)
    with pytest.raises(RuntimeError):
        response.deliverBody(Collector())


@pytest.mark.integration  # a real loopback socket
@pytest_twisted.inlineCallbacks
def test_stop_producing_on_a_real_socket_aborts_the_upstream_connection() -> Any:
    from twisted.internet import reactor

    server_gone: Deferred[None] = Deferred()

    class Endless(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nfirst")

        def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
            server_gone.callback(None)

    port = reactor.listenTCP(0, Factory.forProtocol(Endless), interface="127.0.0.1")
    agent = UpstreamAgent(reactor)
    try:
        response = yield agent.request(b"GET", b"http://127.0.0.1:%d/" % port.getHost().port)
        ended: Deferred[list[Failure]] = Deferred()

        class StopAtFirstByte(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.stopProducing()

            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
                ended.callback([reason])

        response.deliverBody(StopAtFirstByte())
        [reason] = yield ended
        assert reason.check(ResponseFailed)
        yield server_gone  # the backend saw the connection go: it would stop generating
    finally:
        yield agent.close_idle()
        yield port.stopListening()
