"""
The composition root: one place that builds Jano's pieces and wires them.

Two doors in:

* :func:`make_service` returns a ``MultiService`` (listener, health probes,
  graceful drain) for ``twistd`` or an application's own service tree;
* :func:`make_resource` returns the ``IResource`` alone, for an existing
  ``Site`` to ``putChild`` (it starts the background probes itself and stops
  them at reactor shutdown).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, URI, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource

from jano import __version__
from jano.api import Jano, JanoResource, JanoSite
from jano.config import Config, ConfigError, load_config
from jano.h1 import JanoHTTPFactory
from jano.proxy import Forwarder
from jano.records import ModelSpec
from jano.scheduler import Scheduler
from jano.swap import ScriptSwapper, SwapCommandError, check_swap_command, http_probe
from jano.telemetry import HealthMonitor, Telemetry
from jano.upstream import UpstreamAgent

#: Probes and readiness checks get their own short timeout.
PROBE_TIMEOUT = 5.0


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection


class QuietPool(HTTPConnectionPool):
    """A connection pool that does not log every connection it opens."""

    _factory = _QuietFactory


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    One client endpoint per upstream, reused.

    ``Agent``'s default factory builds a new ``HostnameEndpoint`` (with an IDNA
    encoding of the host) for every request, even when the pool then hands
    back an idle connection.  Upstreams come from the config, so this cache is
    bounded by the number of configured models.
    """

    def __init__(self, reactor: Any, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("idna")
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                from twisted.internet.ssl import optionsForClientTLS

                endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
            self._cache[key] = endpoint
        return endpoint


@implementer(IAgent)
class ForwardingAgent:
    """
    The agent model traffic is forwarded with: ``http://`` upstreams through
    :class:`jano.upstream.UpstreamAgent` (lean, pooled), ``https://`` ones
    through Twisted's ``Agent`` with a persistent pool, which brings TLS.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        # idle_timeout stays below llama-server's and Node's 5 s keep-alive, so a
        # pooled connection is rarely reused just as the backend closes it.
        self.plain = UpstreamAgent(reactor, max_idle_per_host=64, idle_timeout=3.0)
        self._tls: Optional[Agent] = None
        self._tls_pool: Optional[HTTPConnectionPool] = None

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None,
                bodyProducer: Optional[IBodyProducer] = None) -> Deferred[IResponse]:
        if uri[:8].lower() == b"https://":
            if self._tls is None:
                pool = self._tls_pool = QuietPool(self._reactor, persistent=True)
                pool.cachedConnectionTimeout = 3
                pool.maxPersistentPerHost = 64
                self._tls = Agent.usingEndpointFactory(self._reactor,
                                                       CachedEndpoints(self._reactor), pool=pool)
            return self._tls.request(method, uri, headers, bodyProducer)
        return self.plain.request(method, uri, headers, bodyProducer)

    def close_idle(self) -> Deferred[Any]:
        closing: list[Deferred[Any]] = [self.plain.close_idle()]
        if self._tls_pool is not None:
            closing.append(self._tls_pool.closeCachedConnections())
        return DeferredList(closing, consumeErrors=True)


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return reactor


class JanoService(MultiService):
    """
    All of one Jano: scheduler, telemetry, health monitor, proxy, and
    (optionally) its listening port.

    :param swapper: replaces the ``[swap] command`` script runner (demo mode and
        tests use a simulated one).
    :param agent: replaces the upstream HTTP agent (tests pass a
        ``treq.testing.RequestTraversalAgent``).
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any = None, *, swapper: Any = None,
                 agent: Optional[IAgent] = None,
                 probe: Optional[Callable[[str], Deferred[int]]] = None,
                 listen: bool = True) -> None:
        super().__init__()
        reactor = _reactor(reactor)
        self.reactor = reactor
        self.config = config
        self._pools: list[HTTPConnectionPool] = []
        self._upstream: Optional[ForwardingAgent] = None
        if agent is None:
            agent = self._upstream = ForwardingAgent(reactor)
        if probe is None:
            import treq.client

            probe_pool = QuietPool(reactor, persistent=False)
            self._pools.append(probe_pool)
            probe = http_probe(treq.client.HTTPClient(Agent(reactor, pool=probe_pool)),
                               timeout=PROBE_TIMEOUT)
        self.probe = probe
        if swapper is None:
            if config.swap.command:
                check_swap_command(config.swap.command)
            swapper = ScriptSwapper(reactor, config.swap.command,
                                    swap_timeout=config.scheduler.swap_timeout,
                                    ready_timeout=config.scheduler.ready_timeout, probe=probe)
        self.swapper = swapper
        started_at = reactor.seconds()
        self.scheduler = Scheduler(config.models, swapper, reactor,
                                   max_wait=config.scheduler.max_wait,
                                   max_queue=config.scheduler.max_queue,
                                   retry_backoff=config.scheduler.retry_backoff,
                                   initial=config.scheduler.initial_model,
                                   on_swap=self._swap_finished)
        self.health = HealthMonitor(reactor, config.models, probe,
                                    interval=config.telemetry.health_interval,
                                    is_resident=self._is_resident)
        self.health.setServiceParent(self)
        self.telemetry = Telemetry(reactor, config.models, version=__version__,
                                   snapshot=self.scheduler.snapshot, health=self.health.states,
                                   usage_ring=config.telemetry.usage_ring)
        self.forwarder = Forwarder(agent, reactor, self.scheduler, self.telemetry,
                                   upstream_timeout=config.server.upstream_timeout,
                                   idle_write_timeout=config.server.idle_write_timeout,
                                   strip_authorization=config.server.api_key is not None)
        self.jano = Jano(config.models, self.forwarder, self.telemetry, self._fallback,
                         clock=reactor, api_key=config.server.api_key,
                         telemetry_key=config.server.telemetry_key, started_at=started_at,
                         usage_ring=config.telemetry.usage_ring,
                         thrash_swaps_per_hour=config.telemetry.thrash_swaps_per_hour)
        self.resource = JanoResource(self.jano)
        self.site = JanoSite(self.resource, max_body_bytes=config.server.max_body_bytes)
        self.listener: Optional[Any] = None
        if listen:
            self.factory = JanoHTTPFactory(self.site, reactor)
            self.listener = strports.service(config.server.listen, self.factory, reactor=reactor)
            self.listener.setServiceParent(self)

    # --- wiring helpers -------------------------------------------------------------

    def _swap_finished(self, event: Any) -> None:
        level = self.log.info if event.result == "ok" else self.log.warn
        level("swap {group}: {from_model} -> {to_model} {result} in {duration:.2f}s{error}",
              group=event.group, from_model=event.from_model, to_model=event.to_model,
              result=event.result, duration=event.duration,
              error=f" ({event.error})" if event.error else "")
        self.telemetry.swap_finished(event)
        if event.result == "ok":  # the swap waited for health 200 itself
            self.health.observed(event.to_model, "up")

    def _residents(self) -> Mapping[str, Optional[str]]:
        return {g.name: g.resident for g in self.scheduler.snapshot().groups}

    def _is_resident(self, spec: ModelSpec) -> bool:
        return spec.always_on or self._residents().get(spec.group) == spec.name

    def _fallback(self) -> Optional[ModelSpec]:
        """The loaded model for requests that name none: the first group's resident, else the first model."""
        models = self.jano.models
        residents = self._residents()
        for spec in models:
            if not spec.always_on and residents.get(spec.group) == spec.name:
                return spec
        return models[0] if models else None

    # --- reload -------------------------------------------------------------------------

    def reload_from(self, path: Optional[str]) -> bool:
        """``SIGHUP``: re-read the config file; on any error keep running the old one."""
        if path is None:
            return False
        try:
            new = load_config(path)
            if new.swap.command and new.swap.command != self.config.swap.command:
                check_swap_command(new.swap.command)
        except (ConfigError, SwapCommandError) as e:
            self.log.error("config reload refused, keeping the running config: {error}", error=e)
            return False
        self.reload(new)
        return True

    def reload(self, new: Config) -> None:
        """Apply a validated config without dropping queued or in-flight requests."""
        old = self.config
        if new.server.listen != old.server.listen:
            self.log.warn("server.listen changed to {listen}: takes effect at the next restart",
                          listen=new.server.listen)
        self.scheduler.reconfigure(new.models, max_wait=new.scheduler.max_wait,
                                   max_queue=new.scheduler.max_queue)
        if isinstance(self.swapper, ScriptSwapper):
            self.swapper = ScriptSwapper(self.reactor, new.swap.command,
                                         swap_timeout=new.scheduler.swap_timeout,
                                         ready_timeout=new.scheduler.ready_timeout,
                                         probe=self.probe)
            self.scheduler.swapper = self.swapper
        self.telemetry.set_models(new.models)
        self.health.set_models(new.models)
        self.forwarder.upstream_timeout = new.server.upstream_timeout
        self.forwarder.idle_write_timeout = new.server.idle_write_timeout
        self.forwarder.strip_authorization = new.server.api_key is not None
        self.site.max_body_bytes = new.server.max_body_bytes
        jano = self.jano
        jano.api_key = new.server.api_key
        jano.telemetry_key = new.server.telemetry_key
        jano.thrash_swaps_per_hour = new.telemetry.thrash_swaps_per_hour
        jano.set_models(new.models)
        self.config = new
        self.log.info("config reloaded from {source}: {n} models", source=new.source,
                      n=len(new.models))

    # --- lifecycle ----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let in-flight requests finish (up to the grace period), then close."""
        self.jano.draining = True
        stops: list[Deferred[Any]] = []
        if self.listener is not None and self.listener.running:
            stops.append(maybeDeferred(self.listener.stopService))
        drained = self.scheduler.drain()
        grace = self.config.server.shutdown_grace
        timer = self.reactor.callLater(grace, drained.cancel) if grace > 0 else None
        if timer is None:
            drained.cancel()

        def finish(_: object) -> Deferred[Any]:
            if timer is not None and timer.active():
                timer.cancel()
            others = [s for s in self if s is not self.listener]
            for s in others:
                if s.running:
                    stops.append(maybeDeferred(s.stopService))
            self.running = False
            for pool in self._pools:
                stops.append(pool.closeCachedConnections())
            if self._upstream is not None:
                stops.append(self._upstream.close_idle())
            return DeferredList(stops, consumeErrors=True)

        drained.addErrback(lambda _: None)
        return drained.addCallback(finish).addCallback(lambda _: None)


def make_service(config: Config, reactor: Any = None, **kw: Any) -> JanoService:
    """A ``MultiService`` running Jano on ``config.server.listen``."""
    return JanoService(config, reactor, **kw)


def make_resource(config: Config, reactor: Any = None, **kw: Any) -> IResource:
    """
    Jano as a resource for an existing ``Site`` (``root.putChild(b"llm", ...)``).

    The health probes start now and stop when the reactor shuts down.  Mount it
    on a ``jano.api.JanoSite`` to get Jano's bounded in-memory request bodies;
    on a plain ``Site``, Twisted's own body handling applies.
    """
    reactor = _reactor(reactor)
    svc = JanoService(config, reactor, listen=False, **kw)
    svc.startService()
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    resource = svc.resource
    resource.service = svc  # type: ignore[attr-defined]
    return resource
