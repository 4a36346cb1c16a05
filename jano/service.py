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
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from jano import __version__
from jano.config import Config, ConfigError, load_config
from jano.errors import SwapCommandError
from jano.forward import Forwarder
from jano.forward.agent import make_agent, make_pool
from jano.records import HealthState, ModelSpec, SwapEvent
from jano.scheduler import Replicas, Scheduler
from jano.swap import ScriptSwapper, http_probe
from jano.swap.health import HealthMonitor
from jano.swap.keeper import ServerKeeper
from jano.swap.logring import LogRing
from jano.swap.managed import ManagedSwapper
from jano.swap.startup import check_commands, managed_servers, with_ports
from jano.telemetry import Telemetry
from jano.telemetry.history import HistorySampler
from jano.telemetry.store import UsageStore
from jano.web.app import JanoApp
from jano.web.limits import CallerLimits
from jano.web.site import JanoSite, Keys

#: Probes and readiness checks get their own short timeout.
PROBE_TIMEOUT = 5.0


def _keys(config: Config) -> Keys:
    srv = config.server
    return Keys(srv.api_key, [(k.name, k.key) for k in srv.api_keys])


def _stuck_after(config: Config) -> float:
    """Longer than any legitimate wait: ``max_wait`` plus a whole swap and readiness wait."""
    sch = config.scheduler
    return sch.max_wait + sch.swap_timeout + sch.ready_timeout


def _budgets(config: Config) -> dict[str, int]:
    """Each group's memory budget, MiB (groups without one hold one model at a time)."""
    return {name: g.memory for name, g in config.groups.items() if g.memory is not None}


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
    :param listen: listen on ``config.server.listen`` (``False`` when
        embedded with :func:`make_resource`).
    :param store_runner: runs the usage store's work (default: its own writer
        thread; tests with a file database pass ``maybeDeferred``).
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any = None, *, swapper: Any = None,
                 agent: Optional[IAgent] = None,
                 probe: Optional[Callable[[str], Deferred[int]]] = None,
                 listen: bool = True, store_runner: Optional[Any] = None) -> None:
        super().__init__()
        reactor = _reactor(reactor)
        self.reactor = reactor
        config = with_ports(config)
        self.config = config
        self._pools: list[HTTPConnectionPool] = []
        if agent is None:
            pool = make_pool(reactor)
            self._pools.append(pool)
            agent = make_agent(reactor, pool)
        if probe is None:
            import treq.client

            probe_pool = make_pool(reactor, persistent=False)
            self._pools.append(probe_pool)
            probe = http_probe(treq.client.HTTPClient(make_agent(reactor, probe_pool)),
                               timeout=PROBE_TIMEOUT)
        self.probe = probe
        self.keeper: Optional[ServerKeeper] = None
        if swapper is None:
            check_commands(config)
            swapper = self._swapper(config)
        self.swapper = swapper
        started_at = reactor.seconds()
        self.scheduler = Scheduler(config.models, swapper, reactor,
                                   max_wait=config.scheduler.max_wait,
                                   max_queue=config.scheduler.max_queue,
                                   retry_backoff=config.scheduler.retry_backoff,
                                   initial=config.scheduler.initial_model,
                                   on_swap=self._swap_finished,
                                   collate=config.scheduler.collate,
                                   min_residency=config.scheduler.min_residency,
                                   ttl=config.scheduler.ttl, budgets=_budgets(config))
        #: The scheduler's seam as clients' names need it: a model served by
        #: replicas goes to one of them.  The keeper and health probes use
        #: the scheduler itself, which knows each replica as a model.
        self.replicas = Replicas(self.scheduler, reactor, config.models,
                                 health=lambda: self.health.states())
        self.health = HealthMonitor(reactor, config.models, probe,
                                    interval=config.telemetry.health_interval,
                                    is_resident=self._is_resident)
        self.health.setServiceParent(self)
        self.health.on_probed = lambda name, old, new: self.replicas.probed(
            name, old, new, self.config.server.stall_cooldown)
        if self.keeper is not None:
            self.keeper.scheduler = self.scheduler
        self.telemetry = Telemetry(reactor, config.client_models(), version=__version__,
                                   snapshot=self.replicas.snapshot, health=self._health_states,
                                   usage_ring=config.telemetry.usage_ring,
                                   max_wait=config.scheduler.max_wait,
                                   stuck_after=_stuck_after(config),
                                   reload_threshold=config.telemetry.reload_threshold)
        self.telemetry.set_callers([k.name for k in config.server.api_keys])
        if self.keeper is not None:
            self.telemetry.set_processes(self.keeper.supervisor.statuses)
        tel = config.telemetry
        # A memory-only store does no disk I/O: it runs in the reactor thread,
        # and is open at once; a file is opened (in its writer thread) at start.
        memory = tel.database in ("", ":memory:")
        self.store = UsageStore(tel.database or ":memory:", reactor,
                                run_in_thread=maybeDeferred if memory else store_runner,
                                retention_days=tel.retention_days or None,
                                max_rows=tel.max_rows or None)
        self._store_opening: Optional[Deferred[None]] = self.store.start() if memory else None
        self.telemetry.store = self.store
        HistorySampler(reactor, self.telemetry.sample, self.store).setServiceParent(self)
        srv = config.server
        self.forwarder = Forwarder(agent, reactor, self.replicas, self.telemetry,
                                   upstream_timeout=srv.upstream_timeout,
                                   idle_write_timeout=srv.idle_write_timeout,
                                   strip_authorization=not _keys(config).open,
                                   stall_timeout=srv.stall_timeout,
                                   stall_threshold=srv.stall_threshold,
                                   stall_cooldown=srv.stall_cooldown,
                                   request_id_header=srv.request_id_header.encode("latin-1")
                                   or None)
        self.forwarder.instance_for = self.replicas.instance_for
        self.app = JanoApp(config.client_models(), self.forwarder, self.telemetry, self._fallback,
                           lifecycle=self.replicas, clock=reactor, store=self.store,
                           keys=_keys(config), admin_key=config.server.admin_key,
                           telemetry_key=config.server.telemetry_key, started_at=started_at,
                           usage_ring=config.telemetry.usage_ring,
                           thrash_swaps_per_hour=config.telemetry.thrash_swaps_per_hour)
        self.app.limits = CallerLimits.from_keys(config.server.api_keys, self.forwarder.queued_by)
        self.app.logs_of = self._log_ring
        self.resource = self.app.resource()
        srv = config.server
        self.site = JanoSite(self.resource, max_body_bytes=srv.max_body_bytes,
                             keys=_keys(config), max_connections=srv.max_connections,
                             max_connections_per_client=srv.max_connections_per_client,
                             idle_timeout=srv.idle_timeout, reactor=reactor)
        self.site.on_refused = self.telemetry.queue_rejected
        self.listener: Optional[Any] = None
        if listen:
            self.listener = strports.service(srv.listen, self.site, reactor=reactor)
            self.listener.setServiceParent(self)

    # --- wiring helpers -------------------------------------------------------------

    def _swapper(self, config: Config) -> Any:
        """The swap script's runner; with managed models, the managed swapper around it."""
        sch = config.scheduler
        script = ScriptSwapper(self.reactor, config.swap.command, swap_timeout=sch.swap_timeout,
                               ready_timeout=sch.ready_timeout, probe=self.probe,
                               unload_command=config.swap.unload)
        if not any(m.managed for m in config.models):
            return script
        self.keeper = managed_servers(self.reactor, config,
                                      script if config.swap.command else None, self.probe,
                                      self._observed, self.keeper)
        return self.keeper.swapper

    def _log_ring(self, model: str) -> Optional[LogRing]:
        return self.keeper.supervisor.ring(model) if self.keeper is not None else None

    def _observed(self, model: str, state: HealthState) -> None:
        self.health.observed(model, state)


    def _swap_finished(self, event: SwapEvent) -> None:
        level = self.log.info if event.result == "ok" else self.log.warn
        level("{kind} {group}: {from_model} -> {to_model} {result} in {duration:.2f}s{error}",
              kind=event.kind, group=event.group, from_model=event.from_model,
              to_model=event.to_model or "(nothing)",
              result=event.result, duration=event.duration,
              error=f" ({event.error})" if event.error else "")
        self.telemetry.swap_finished(self.replicas.public_event(event))
        if event.result == "ok" and event.to_model is not None:  # it waited for health 200
            self.health.observed(event.to_model, "up")
        elif event.kind == "unload" and event.from_model is not None:
            self.health.observed(event.from_model, "unloaded")

    def _health_states(self) -> Mapping[str, HealthState]:
        """
        The probes' view, with the models the forward stage found stalled;
        for a model served by replicas, each replica's and the model's (the
        best of its replicas').
        """
        states: dict[str, HealthState] = dict(self.health.states())
        for model in self.forwarder.stalled_now():
            states[model] = "stalled"
        return self.replicas.health_of(states)

    def _is_resident(self, spec: ModelSpec) -> bool:
        return spec.always_on or self.scheduler.is_loaded(spec.name)

    def _fallback(self) -> Optional[ModelSpec]:
        """The loaded model for requests that name none: the first group's resident, else the first model."""
        models = self.app.models
        loaded = {m.name for m in self.replicas.snapshot().models
                  if m.resident and not m.always_on}
        for spec in models:
            if not spec.always_on and spec.name in loaded:
                return spec
        return models[0] if models else None

    # --- reload -------------------------------------------------------------------------

    def reload_from(self, path: Optional[str]) -> bool:
        """``SIGHUP``: re-read the config file; on any error keep running the old one."""
        if path is None:
            return False
        try:
            new = load_config(path)
            new = with_ports(new, keep={m.name: m.port for m in self.config.models
                                        if m.managed and m.port is not None})
            check_commands(new, self.config)
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
        # Replicas first: requests of removed replicas fail over to the new ones.
        self.replicas.set_models(new.models)
        self.scheduler.reconfigure(new.models, max_wait=new.scheduler.max_wait,
                                   max_queue=new.scheduler.max_queue,
                                   collate=new.scheduler.collate,
                                   min_residency=new.scheduler.min_residency,
                                   ttl=new.scheduler.ttl, budgets=_budgets(new))
        if isinstance(self.swapper, (ScriptSwapper, ManagedSwapper)):
            keeper = self.keeper
            self.swapper = self._swapper(new)
            self.scheduler.swapper = self.swapper
            if self.keeper is not None:
                self.keeper.scheduler = self.scheduler
                self.telemetry.set_processes(self.keeper.supervisor.statuses)
                if keeper is None and self.running:  # the first managed model came by reload
                    self.keeper.start(new.models)
                else:
                    self.keeper.reload(new.models)
        self.telemetry.set_models(new.client_models())
        self.health.set_models(new.models)
        self.forwarder.upstream_timeout = new.server.upstream_timeout
        self.forwarder.stall_timeout = new.server.stall_timeout
        self.forwarder.stall_threshold = new.server.stall_threshold
        self.forwarder.stall_cooldown = new.server.stall_cooldown
        self.forwarder.request_id_header = new.server.request_id_header.encode("latin-1") or None
        self.telemetry.max_wait = new.scheduler.max_wait
        self.telemetry.stuck_after = _stuck_after(new)
        self.telemetry.reload_threshold = new.telemetry.reload_threshold
        self.telemetry.set_callers([k.name for k in new.server.api_keys])
        self.forwarder.idle_write_timeout = new.server.idle_write_timeout
        self.forwarder.strip_authorization = not _keys(new).open
        site = self.site
        site.max_body_bytes = new.server.max_body_bytes
        site.keys = _keys(new)
        site.max_connections = new.server.max_connections
        site.max_connections_per_client = new.server.max_connections_per_client
        app = self.app
        app.keys = _keys(new)
        app.limits.limits = CallerLimits.from_keys(new.server.api_keys, self.forwarder.queued_by).limits
        app.admin_key = new.server.admin_key
        app.telemetry_key = new.server.telemetry_key
        app.thrash_swaps_per_hour = new.telemetry.thrash_swaps_per_hour
        app.set_models(new.client_models())
        self.config = new
        self.log.info("config reloaded from {source}: {n} models", source=new.source,
                      n=len(new.models))

    # --- lifecycle ----------------------------------------------------------------------

    def startService(self) -> None:
        """Open the usage store, start listening and probing, then load the ``preload`` models."""
        if self._store_opening is None:
            self._store_opening = self.store.start()
            self._store_opening.addErrback(
                lambda f: self.log.failure("the usage store could not start; history is off", f))
        super().startService()
        if self.keeper is not None:
            self.keeper.start(self.config.models)
        for name in self.config.scheduler.preload:
            self.log.info("preloading {model}", model=name)
            self.replicas.load(name).addErrback(self._preload_failed, name)

    def _preload_failed(self, failure: Any, name: str) -> None:
        self.log.warn("preloading {model} failed: {cause}", model=name,
                      cause=failure.getErrorMessage())

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let in-flight requests finish (up to the grace period), then close."""
        self.app.draining = True
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
            self.app.log_followers.close_all()
            if self.keeper is not None:
                stops.append(self.keeper.stop())
            others = [s for s in self if s is not self.listener]
            for s in others:
                if s.running:
                    stops.append(maybeDeferred(s.stopService))
            self.running = False
            for pool in self._pools:
                stops.append(pool.closeCachedConnections())
            stops.append(self.store.stop())  # the last records are written, then closed
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
    on a :class:`jano.web.site.JanoSite` to get Jano's limits (bounded
    in-memory bodies, refusal before the body is read, connection caps); on a
    plain ``Site``, Twisted's own body handling applies.
    """
    reactor = _reactor(reactor)
    svc = JanoService(config, reactor, listen=False, **kw)
    svc.startService()
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    resource = svc.resource
    resource.service = svc  # type: ignore[attr-defined]
    return resource
