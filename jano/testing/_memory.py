"""
An ``IAgent`` that talks HTTP, in memory, to a server factory.

``treq.testing.StubTreq`` puts a resource behind a plain ``Site`` of its own;
:class:`MemoryAgent` takes the factory itself, so a test drives the listener
users run (``jano.web.site.JanoSite``: its limits, its early refusals, its
connection caps) with Twisted's real HTTP client on the other side, and
bytes move only when the test pumps them.
"""

from __future__ import annotations

from itertools import count
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

_ports = count(40000)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, agent: "MemoryAgent") -> None:
        self._agent = agent

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        return self._agent.connect(protocolFactory)


@implementer(IAgent, IAgentEndpointFactory)
class MemoryAgent:
    """
    Every request becomes a new in-memory connection to ``factory``.

    :param factory: the server side, e.g. ``JanoService(...).site``.
    :param client_host: the address the server sees as the peer.
    :param persistent: keep client connections in a pool between requests.

    Call :meth:`flush` to move bytes (the Deferreds fire as bytes arrive).
    """

    def __init__(self, factory: IProtocolFactory, *, client_host: str = "127.0.0.1",
                 persistent: bool = False) -> None:
        self.factory = factory
        self.client_host = client_host
        self.reactor = MemoryReactorClock()
        self.pumps: list[iosim.IOPump] = []
        #: Connections the server refused (its ``buildProtocol`` returned ``None``).
        self.refused = 0
        pool = HTTPConnectionPool(self.reactor, persistent=persistent)
        self._agent = Agent.usingEndpointFactory(self.reactor, self, pool=pool)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _Endpoint(self)

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        peer = IPv4Address("TCP", self.client_host, next(_ports))
        host = IPv4Address("TCP", "127.0.0.1", 8000)
        server = self.factory.buildProtocol(peer)
        if server is None:
            self.refused += 1
            return fail(ConnectionRefusedError("the server refused the connection"))
        client = protocolFactory.buildProtocol(host)
        if client is None:
            return fail(ConnectionRefusedError("the client factory built no protocol"))
        pump = iosim.connect(
            server, iosim.FakeTransport(server, isServer=True, hostAddress=host, peerAddress=peer),
            client, iosim.FakeTransport(client, isServer=False, hostAddress=peer, peerAddress=host),
            greet=False)
        self.pumps.append(pump)
        return succeed(client)

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None,
                bodyProducer: Optional[IBodyProducer] = None) -> "Deferred[IResponse]":
        d: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return d

    def flush(self) -> None:
        """Move every pending byte both ways, until nothing moves."""
        for pump in list(self.pumps):
            pump.flush(advanceClock=False)
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self.pumps.remove(pump)

    def raw(self, data: bytes) -> "RawConnection":
        """A connection on which the test writes ``data`` itself and reads the raw answer."""
        conn = RawConnection(self, data)
        return conn


class RawConnection:
    """Raw bytes in, raw bytes out: for requests no HTTP client would send."""

    def __init__(self, agent: MemoryAgent, data: bytes) -> None:
        from twisted.internet.testing import StringTransport

        peer = IPv4Address("TCP", agent.client_host, next(_ports))
        self.transport = StringTransport(peerAddress=peer,
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
        self.protocol: Any = agent.factory.buildProtocol(peer)
        self.refused = self.protocol is None
        if self.protocol is not None:
            self.protocol.makeConnection(self.transport)
            if data:
                self.protocol.dataReceived(data)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def output(self) -> bytes:
        return bytes(self.transport.value())

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


class MemoryClient:
    """
    treq's ``HTTPClient`` over a :class:`MemoryAgent`: ``get``/``post``/
    ``request`` as in treq, plus :meth:`flush` to move the bytes, and treq's
    ``content``/``collect``/``json_content`` for reading answers.
    """

    def __init__(self, factory: IProtocolFactory, **kw: Any) -> None:
        from treq.client import HTTPClient

        from jano.forward import BytesProducer

        self.agent = MemoryAgent(factory, **kw)
        # Bodies are written at once (treq's default producer runs on the global reactor).
        self._http = HTTPClient(self.agent, data_to_body_producer=BytesProducer)

    def request(self, method: str, url: str, **kw: Any) -> "Deferred[Any]":
        return self._http.request(method, url, **kw)

    def get(self, url: str, **kw: Any) -> "Deferred[Any]":
        return self._http.get(url, **kw)

    def post(self, url: str, **kw: Any) -> "Deferred[Any]":
        return self._http.post(url, **kw)

    def flush(self) -> None:
        self.agent.flush()

    def disconnect(self) -> None:
        """Close every client connection, as a client process that went away would."""
        for pump in self.agent.pumps:
            pump.clientIO.loseConnection()
        self.flush()

    @staticmethod
    def content(response: Any) -> "Deferred[bytes]":
        import treq

        d: Deferred[bytes] = treq.content(response)
        return d

    @staticmethod
    def collect(response: Any, collector: Any) -> "Deferred[None]":
        import treq

        d: Deferred[None] = treq.collect(response, collector)
        return d

    @staticmethod
    def json_content(response: Any) -> "Deferred[Any]":
        import treq

        return treq.json_content(response)
