"""The stream tee: each chunk straight to the client, the tail to the parser, producers wired."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from jano.forward.tee import StreamTee
from jano.usage import TailBuffer


class FakeRequest:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.producer: Any = None
        self.streaming: Optional[bool] = None
        self.unregistered = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.unregistered += 1
        self.producer = None


class FakeTransport:
    def __init__(self) -> None:
        self.stopped = 0

    def stopProducing(self) -> None:
        self.stopped += 1

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def _tee(clock: Clock) -> tuple[StreamTee, FakeRequest, FakeTransport, list[tuple[Any, ...]]]:
    req, transport, ends = FakeRequest(), FakeTransport(), []
    tee = StreamTee(req, TailBuffer(16), clock, lambda *a: ends.append(a))  # type: ignore[arg-type]
    tee.makeConnection(transport)
    return tee, req, transport, ends


def test_chunks_are_written_as_they_arrive_and_upstream_is_the_producer() -> None:
    clock = Clock()
    tee, req, transport, ends = _tee(clock)
    assert req.producer is tee and req.streaming is True
    tee.dataReceived(b"data: 1\n\n")
    assert req.writes == [b"data: 1\n\n"]  # before any further chunk exists
    clock.advance(2)
    tee.dataReceived(b"data: 2\n\n")
    assert req.writes == [b"data: 1\n\n", b"data: 2\n\n"]
    tee.connectionLost(Failure(ResponseDone()))
    assert ends == [(True, 0.0, 2.0, 18)]
    assert req.unregistered == 1


def test_tail_keeps_only_the_end() -> None:
    clock = Clock()
    tee, req, _, _ = _tee(clock)
    for i in range(100):
        tee.dataReceived(b"%03d|" % i)
    assert tee._tail is not None and tee._tail.getvalue().endswith(b"099|")
    assert len(tee._tail.getvalue()) <= 16


def test_close_delimited_body_counts_as_complete_and_failure_does_not() -> None:
    clock = Clock()
    tee, _, _, ends = _tee(clock)
    tee.connectionLost(Failure(PotentialDataLoss()))
    assert ends[0][0] is True
    tee, _, _, ends = _tee(clock)
    tee.dataReceived(b"x")
    tee.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert ends[0][0] is False


def test_abort_stops_upstream_and_writing() -> None:
    clock = Clock()
    tee, req, transport, ends = _tee(clock)
    tee.dataReceived(b"a")
    tee.abort()
    tee.abort()  # idempotent
    assert transport.stopped == 1 and req.unregistered == 1
    tee.dataReceived(b"late")
    assert req.writes == [b"a"]
    tee.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert req.unregistered == 1 and ends[0][0] is False


def test_abort_before_body_starts_stops_upstream_on_connect() -> None:
    req, transport = FakeRequest(), FakeTransport()
    tee = StreamTee(req, None, Clock(), lambda *a: None)  # type: ignore[arg-type]
    tee.abort()
    tee.makeConnection(transport)
    assert transport.stopped == 1 and req.producer is None


class PausableTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1


def test_client_flow_control_reaches_upstream_and_a_stall_is_given_up_on() -> None:
    clock, req, transport, stalls = Clock(), FakeRequest(), PausableTransport(), []
    tee = StreamTee(req, None, clock, lambda *a: None,  # type: ignore[arg-type]
                    stall_timeout=30.0, on_stall=lambda: stalls.append(clock.seconds()))
    tee.makeConnection(transport)
    tee.pauseProducing()  # the client's socket buffer is full
    assert transport.paused == 1
    clock.advance(29)
    tee.resumeProducing()  # it read in time
    assert transport.resumed == 1 and stalls == []
    clock.advance(100)
    assert stalls == []  # the timer went with the resume
    tee.pauseProducing()
    clock.advance(30)
    assert stalls == [159.0]


def test_stop_producing_from_the_client_side_aborts_upstream() -> None:
    clock, req, transport = Clock(), FakeRequest(), PausableTransport()
    tee = StreamTee(req, None, clock, lambda *a: None)  # type: ignore[arg-type]
    tee.makeConnection(transport)
    tee.stopProducing()
    assert transport.stopped == 1
