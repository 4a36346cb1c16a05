"""
A managed server's log ring, and ``/logs/<model>`` over a real twisted.web
Site on a ``StringTransport`` (so pauses and disconnects are the channel's own).  The suite's
error observer (conftest) fails any test here that makes Twisted log an error.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from jano.swap.logring import ENTRY_OVERHEAD, Entry, LogRing
from jano.web.logs import LogFollowers, follow_logs, logs_page, parse_tail, skipped_note

# --- the ring ----------------------------------------------------------------------------


def test_bytes_never_exceed_the_bound_and_the_oldest_go_first() -> None:
    ring = LogRing(1000, Clock())
    for i in range(500):
        ring.append(f"line {i} " + "x" * (i % 37))
        assert ring.bytes <= 1000
    assert ring.total_lines == 500
    assert ring.dropped_lines == 500 - len(ring)
    assert ring.bytes == sum(len(e.text.encode()) + ENTRY_OVERHEAD for e in ring.lines())
    assert ring.last(1) == ["line 499 " + "x" * (499 % 37)]
    assert ring.lines()[0].text.startswith(f"line {ring.dropped_lines} ")


def test_a_line_longer_than_the_ring_is_cut_to_fit_on_a_character_boundary() -> None:
    ring = LogRing(100, Clock())
    ring.append("kept")
    ring.append("é" * 200, "stderr")
    assert ring.bytes <= 100 and len(ring) == 1 and ring.dropped_lines == 1
    (entry,) = ring.lines()
    assert entry.stream == "stderr" and entry.text.endswith("…")
    assert set(entry.text[:-1]) == {"é"}
    assert len(entry.text.encode()) + ENTRY_OVERHEAD <= 100


def test_entries_carry_time_and_stream_and_tail_picks_the_last() -> None:
    clock = Clock()
    ring = LogRing(10_000, clock)
    ring.append("one\n")
    clock.advance(2.5)
    ring.append("two\r\n", "stderr")
    ring.append("started pid 123 on port 10100", "jano")
    assert ring.lines() == [Entry(0.0, "stdout", "one"), Entry(2.5, "stderr", "two"),
                            Entry(2.5, "jano", "started pid 123 on port 10100")]
    assert ring.lines(2)[0].text == "two" and ring.lines(0) == [] and len(ring.lines(99)) == 3
    assert ring.text() == "one\ntwo\n[jano] started pid 123 on port 10100\n"
    assert ring.text(1) == "[jano] started pid 123 on port 10100\n"
    assert ring.last(2) == ["two", "started pid 123 on port 10100"]  # unmarked
    assert LogRing(1000, clock).text() == ""
    with pytest.raises(ValueError):
        ring.append("x", "stdin")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LogRing(ENTRY_OVERHEAD, clock)


@pytest.mark.logs_errors
def test_followers_get_each_line_and_a_failing_one_is_logged_and_dropped(
        error_observer: list[dict[str, Any]]) -> None:
    ring = LogRing(1000, Clock())
    seen: list[str] = []
    stop = ring.follow(lambda e: seen.append(e.text))

    def broken(entry: Entry) -> None:
        raise RuntimeError("boom")

    ring.follow(broken)
    ring.append("a")  # the append itself does not fail
    assert seen == ["a"] and ring.followers == 1 and len(error_observer) == 1
    ring.append("b")
    assert seen == ["a", "b"] and len(error_observer) == 1
    stop()
    stop()
    ring.append("c")
    assert seen == ["a", "b"] and ring.followers == 0


# --- the web views, through Klein and a real Site -------------------------------------------


class LogsApp:
    """The two routes as the app wires them (auth and the 404 are not under test here)."""

    app = Klein()

    def __init__(self, ring: LogRing, clock: Clock, followers: LogFollowers) -> None:
        self.ring, self.clock, self.followers = ring, clock, followers
        self.last: Optional[Deferred[None]] = None

    @app.route("/logs/<model>", methods=["GET", "HEAD"])
    def logs(self, request: Request, model: str) -> Any:
        try:
            tail = parse_tail(request)
        except ValueError as e:
            request.setResponseCode(400)
            return str(e).encode()
        if (request.args or {}).get(b"follow") == [b"1"]:
            self.last = follow_logs(request, self.ring, self.clock,
                                    tail=100 if tail is None else tail,
                                    followers=self.followers, stall_timeout=30.0)
            return self.last
        return logs_page(request, self.ring, tail)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.ring = LogRing(64 * 1024, self.clock)
        self.followers = LogFollowers()
        self.app = LogsApp(self.ring, self.clock, self.followers)
        self.site = Site(self.app.app.resource(), reactor=self.clock)

    def get(self, target: str, method: str = "GET") -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(f"{method} {target} HTTP/1.1\r\nHost: jano\r\n\r\n".encode())
        return protocol, transport


def response(raw: bytes) -> tuple[str, dict[str, str], list[bytes], bool]:
    """Status line, headers (lower-cased), body chunks (or the body), and whether it ended."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    if headers.get("transfer-encoding") != "chunked":
        return status, headers, [rest], True
    chunks, ended = [], False
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            ended = True
            break
        chunks.append(rest[:size])
        rest = rest[size + 2:]
    return status, headers, chunks, ended


def test_the_page_is_the_ring_as_plain_text_uncached() -> None:
    w = World()
    for i in range(5):
        w.ring.append(f"l{i}", "stderr")
    w.ring.append("exited with status 1", "jano")
    status, headers, body, ended = response(w.get("/logs/m")[1].value())
    assert status == "HTTP/1.1 200 OK" and ended
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert b"".join(body) == b"l0\nl1\nl2\nl3\nl4\n[jano] exited with status 1\n"
    _, _, body, _ = response(w.get("/logs/m?tail=2")[1].value())
    assert b"".join(body) == b"l4\n[jano] exited with status 1\n"


@pytest.mark.parametrize("query", ["tail=0", "tail=10001", "tail=x", "tail=1&tail=2"])
def test_a_bad_tail_is_a_value_error_naming_it(query: str) -> None:
    status, _, body, _ = response(World().get(f"/logs/m?{query}")[1].value())
    assert status.startswith("HTTP/1.1 400") and b"".join(body).startswith(b"tail:")


def open_follow(w: World, query: str = "") -> tuple[Any, StringTransport]:
    protocol, transport = w.get(f"/logs/m?follow=1{query}")
    return protocol, transport


def channel_of(transport: StringTransport) -> Any:
    """The HTTP channel, the transport's producer: it pauses the request's producer in turn."""
    assert transport.producer is not None
    return transport.producer


def body_of(transport: StringTransport) -> tuple[bytes, bool]:
    _, _, chunks, ended = response(transport.value())
    return b"".join(chunks), ended


def test_follow_writes_the_backlog_then_each_line_as_its_own_chunk() -> None:
    w = World()
    for i in range(150):
        w.ring.append(f"old {i}")
    _, transport = open_follow(w)
    status, headers, chunks, ended = response(transport.value())
    assert status == "HTTP/1.1 200 OK" and not ended
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    assert chunks == [f"old {i}\n".encode() for i in range(50, 150)]  # the default tail: 100
    w.ring.append("new one", "stderr")
    w.ring.append("exited with status 139", "jano")
    chunks = response(transport.value())[2]
    assert chunks[-2:] == [b"new one\n", b"[jano] exited with status 139\n"]
    assert w.ring.followers == 1 and len(w.followers) == 1


def test_follow_on_a_quiet_server_sends_the_headers_at_once() -> None:
    w = World()
    _, transport = open_follow(w, "&tail=5")
    status, _, chunks, ended = response(transport.value())
    assert status == "HTTP/1.1 200 OK" and chunks == [] and not ended


def test_a_client_that_leaves_unsubscribes_without_any_error_logged() -> None:
    w = World()
    w.ring.append("before")
    protocol, transport = open_follow(w)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert w.ring.followers == 0 and len(w.followers) == 0
    w.ring.append("after")  # nothing is written to a gone client
    assert b"after" not in transport.value()


def test_a_tcp_teardown_stops_the_producer_first_and_nothing_is_finished() -> None:
    w = World()
    protocol, transport = open_follow(w)
    channel_of(transport).stopProducing()  # what a TCP transport does before connectionLost
    w.ring.append("late")
    protocol.connectionLost(Failure(ConnectionDone()))
    body, ended = body_of(transport)
    assert not ended and b"late" not in body
    assert w.ring.followers == 0 and len(w.followers) == 0


def test_a_paused_client_gets_nothing_then_one_note_on_resume() -> None:
    w = World()
    w.ring.append("first")
    _, transport = open_follow(w)
    channel = channel_of(transport)
    channel.pauseProducing()
    sent = transport.value()
    for i in range(1000):
        w.ring.append(f"while paused {i}")
    assert transport.value() == sent  # not written, and not kept either: only counted
    channel.resumeProducing()
    w.ring.append("live again")
    body, ended = body_of(transport)
    assert body == b"first\n" + skipped_note(1000).encode() + b"\nlive again\n" and not ended
    assert skipped_note(1000) == "[jano: 1000 lines skipped while the client was not reading]"
    channel.pauseProducing()
    channel.resumeProducing()  # a pause that cost nothing says nothing
    assert body_of(transport)[0].endswith(b"live again\n")


def test_a_client_paused_past_the_stall_timeout_is_dropped() -> None:
    w = World()
    protocol, transport = open_follow(w)
    channel_of(transport).pauseProducing()
    w.clock.advance(29.0)
    channel_of(transport).resumeProducing()
    channel_of(transport).pauseProducing()
    w.clock.advance(29.0)
    assert not transport.disconnecting  # each pause has its own 30 s
    w.clock.advance(1.5)
    assert transport.disconnecting  # aborted
    protocol.connectionLost(Failure(ConnectionDone()))
    assert w.ring.followers == 0


def test_close_all_ends_every_open_follow_cleanly() -> None:
    w = World()
    other = LogRing(1000, w.clock)
    w.ring.append("a")
    (_, t1), (_, t2) = open_follow(w), open_follow(w)
    assert len(w.followers) == 2
    assert w.followers.close_all(other) == 0  # another ring's followers only: none
    assert w.followers.close_all() == 2
    for t in (t1, t2):
        assert body_of(t) == (b"a\n", True)
    assert w.ring.followers == 0 and len(w.followers) == 0
    w.ring.append("b")
    assert w.followers.close_all() == 0


def test_cancelling_the_routes_deferred_ends_the_response_without_a_failure() -> None:
    w = World()
    w.ring.append("a")
    _, transport = open_follow(w)
    got: list[object] = []
    follow = w.app.last
    assert follow is not None
    follow.addBoth(got.append)  # after Klein's own callbacks, which finished the response
    follow.cancel()
    assert got == [None] and w.ring.followers == 0 and len(w.followers) == 0
    assert body_of(transport) == (b"a\n", True)


def test_head_asks_for_no_stream() -> None:
    w = World()
    w.ring.append("x")
    _, transport = w.get("/logs/m?follow=1", "HEAD")
    status, headers, body, _ = response(transport.value())
    assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("text/plain")
    assert body == [b""] and w.ring.followers == 0 and len(w.followers) == 0
