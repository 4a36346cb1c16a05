"""jano.writethrough on real loopback TCP connections, in the test's reactor."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from jano.writethrough import send_now

reactor: Any = _reactor


class Sink(Protocol):
    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.got = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.expect and not self.done.called:
            self.done.callback(bytes(self.got))


async def _pair(expect: int) -> tuple[Protocol, Sink, Any]:
    sinks: list[Sink] = []

    def build() -> Sink:
        sinks.append(Sink(expect))
        return sinks[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build))
    sender = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                                   Protocol())
    while not sinks:
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    return sender, sinks[0], port


@pytest_twisted.ensureDeferred
async def test_a_write_on_an_idle_connection_leaves_at_once() -> None:
    sender, sink, port = await _pair(5)
    try:
        t: Any = sender.transport
        send_now(t, b"hello")
        assert t.dataBuffer == b"" and not t._tempDataLen  # nothing left for the reactor to send
        assert await sink.done == b"hello"
    finally:
        t.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bytes_queued_before_keep_their_order() -> None:
    big = bytes(range(256)) * 64 * 1024  # 16 MiB: more than the socket buffer takes at once
    sender, sink, port = await _pair(len(big) + 5)
    try:
        t: Any = sender.transport
        t.write(big)  # queued on the transport, not yet sent
        send_now(t, b"after")
        assert t._tempDataLen or t.dataBuffer  # it waited its turn
        got = await sink.done
        assert got[:len(big)] == big and got[len(big):] == b"after"
    finally:
        t.loseConnection()
        await port.stopListening()


def test_other_transports_get_a_plain_write() -> None:
    from twisted.internet.testing import StringTransport

    t = StringTransport()
    send_now(t, b"x")
    assert t.value() == b"x"
