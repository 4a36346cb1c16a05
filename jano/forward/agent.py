"""
The ``IAgent`` model traffic is forwarded with: Twisted's ``Agent`` over a
persistent ``HTTPConnectionPool``, the engine under treq without treq's
cookie jar, redirects and gzip decoding.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                        TCP6ClientEndpoint, wrapClientTLS)
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

#: Idle upstream connections kept per backend.
MAX_IDLE_PER_HOST = 64
#: Seconds an idle pooled connection is kept: below llama-server's and Node's
#: 5 s keep-alive, so a pooled connection is rarely reused just as the
#: backend closes it.
IDLE_TIMEOUT = 3.0
CONNECT_TIMEOUT = 10.0


@implementer(IStreamClientEndpoint)
class QuietEndpoint:
    """An endpoint whose connections' factories do not log "Starting factory"."""

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self._wrapped = wrapped

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        protocolFactory.noisy = False  # type: ignore[attr-defined]  # Factory.noisy
        return self._wrapped.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    One client endpoint per upstream, reused.

    ``Agent``'s default factory builds a new ``HostnameEndpoint`` (with an IDNA
    encoding of the host) for every request, even when the pool then hands
    back an idle connection.  Upstreams come from the config, so this cache is
    bounded by the number of configured models.  An IP-literal upstream gets a
    plain TCP endpoint: nothing to resolve.
    """

    def __init__(self, reactor: Any, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("idna")
            plain: IStreamClientEndpoint
            if isIPAddress(host):
                plain = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            elif isIPv6Address(host):
                plain = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            else:
                plain = HostnameEndpoint(self._reactor, uri.host, uri.port,
                                         timeout=self._timeout)
            if uri.scheme == b"https":
                from twisted.internet.ssl import optionsForClientTLS

                plain = wrapClientTLS(optionsForClientTLS(host), plain)
            endpoint = self._cache[key] = QuietEndpoint(plain)
        return endpoint


def make_pool(reactor: Any, *, persistent: bool = True) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = MAX_IDLE_PER_HOST
    pool.cachedConnectionTimeout = IDLE_TIMEOUT  # type: ignore[assignment]  # seconds
    pool.retryAutomatically = True  # Twisted retries only idempotent methods, never a POST
    return pool


def make_agent(reactor: Any, pool: HTTPConnectionPool) -> IAgent:
    """``Agent`` over ``pool`` with :class:`CachedEndpoints`."""
    agent: IAgent = Agent.usingEndpointFactory(reactor, CachedEndpoints(reactor), pool=pool)
    return agent
