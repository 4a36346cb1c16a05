"""The composition root: make_service / make_resource wiring, reload, drain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import IResource

from jano.config import Config, SchedulerConfig, ServerConfig
from jano.records import ModelSpec
from jano.service import JanoService, make_resource, make_service
from jano.testing import SimulatedSwapper

A = ModelSpec("a", "http://127.0.0.1:9001")
B = ModelSpec("b", "http://127.0.0.1:9002")


def _config(**kw: Any) -> Config:
    return Config(models=(A, B), scheduler=SchedulerConfig(initial_model={"default": "a"}), **kw)


def _refuse(url: str) -> Any:
    return fail(ConnectionRefusedError())


def test_make_service_listens_on_loopback_and_probes_health() -> None:
    reactor = MemoryReactorClock()
    svc = make_service(_config(), reactor, swapper=SimulatedSwapper(reactor, {}), probe=_refuse)
    assert isinstance(svc, JanoService)
    svc.startService()
    port, _factory, _backlog, interface = reactor.tcpServers[0]
    assert (port, interface) == (8000, "127.0.0.1")
    reactor.advance(0)
    assert svc.health.states()["a"] == "down" and svc.health.states()["b"] == "unloaded"
    done: list[Any] = []
    svc.stopService().addBoth(done.append)
    reactor.advance(0)
    assert done == [None] and svc.app.draining


def test_make_resource_is_a_resource_that_stops_with_the_reactor() -> None:
    reactor = MemoryReactorClock()
    resource = make_resource(_config(), reactor, swapper=SimulatedSwapper(reactor, {}), probe=_refuse)
    assert IResource.providedBy(resource)
    svc = resource.service  # type: ignore[attr-defined]
    assert svc.running and svc.listener is None and reactor.tcpServers == []
    triggers = reactor.triggers["before"]["shutdown"]
    assert any(getattr(f, "__self__", None) is svc for f, _, _ in triggers)


def test_reload_adds_models_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    svc = JanoService(_config(), reactor, swapper=SimulatedSwapper(reactor, {}), probe=_refuse,
                      listen=False)
    good = tmp_path / "good.toml"
    good.write_text('[scheduler]\ninitial_model = "a"\n'
                    '[[models]]\nname = "a"\nupstream = "http://127.0.0.1:9001"\n'
                    '[[models]]\nname = "c"\nupstream = "http://127.0.0.1:9003"\nalways_on = true\n'
                    '[server]\nmax_body_bytes = 2048\n')
    assert svc.reload_from(str(good)) is True
    assert [m.name for m in svc.app.models] == ["a", "c"] and svc.site.max_body_bytes == 2048
    assert {m.name for m in svc.scheduler.snapshot().models} == {"a", "c"}
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]]\nname = 3\n")
    assert svc.reload_from(str(bad)) is False
    assert [m.name for m in svc.app.models] == ["a", "c"]
    assert svc.reload_from(str(tmp_path / "missing.toml")) is False


def test_listen_endpoint_comes_from_the_config() -> None:
    reactor = MemoryReactorClock()
    svc = make_service(_config(server=ServerConfig(listen="tcp:9999:interface=127.0.0.2")), reactor,
                       swapper=SimulatedSwapper(reactor, {}), probe=_refuse)
    svc.startService()
    assert reactor.tcpServers[0][0] == 9999 and reactor.tcpServers[0][3] == "127.0.0.2"


def test_upstream_endpoints_are_built_once_per_upstream() -> None:
    from twisted.web.client import URI

    from jano.forward.agent import CachedEndpoints

    factory = CachedEndpoints(MemoryReactorClock())
    a1 = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/v1/chat/completions"))
    a2 = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/completion?x=1"))
    b = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/health"))
    tls = factory.endpointForURI(URI.fromBytes(b"https://example.test/v1/models"))
    assert a1 is a2 and a1 is not b and tls is not b


def test_the_upstream_endpoints_for_ip_literals_need_no_resolver_and_log_nothing() -> None:
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol
    from twisted.web.client import URI

    from jano.forward.agent import CachedEndpoints, QuietEndpoint

    reactor = MemoryReactorClock()
    factory = CachedEndpoints(reactor)
    ip = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/x"))
    named = factory.endpointForURI(URI.fromBytes(b"http://gpu-box:8080/x"))
    assert isinstance(ip, QuietEndpoint) and isinstance(named, QuietEndpoint)
    assert isinstance(ip._wrapped, TCP4ClientEndpoint)
    assert isinstance(named._wrapped, HostnameEndpoint)
    f = Factory.forProtocol(Protocol)
    assert f.noisy
    ip.connect(f)
    assert f.noisy is False and reactor.tcpClients[0][:2] == ("127.0.0.1", 8080)


def test_forwarding_uses_twisteds_agent_over_one_persistent_pool() -> None:
    from twisted.web.client import Agent

    svc = JanoService(_config(), MemoryReactorClock(), swapper=SimulatedSwapper(MemoryReactorClock(), {}),
                      probe=_refuse, listen=False)
    assert isinstance(svc.forwarder.agent, Agent)
    assert svc._pools[0].persistent and svc._pools[0].maxPersistentPerHost == 64


def test_the_listener_gets_the_configured_limits_and_a_reload_changes_them() -> None:
    reactor = MemoryReactorClock()
    server = ServerConfig(max_connections=3, max_connections_per_client=2, idle_timeout=7.0,
                          api_key="k", max_body_bytes=4096)
    svc = JanoService(_config(server=server), reactor, swapper=SimulatedSwapper(reactor, {}),
                      probe=_refuse, listen=False)
    site = svc.site
    assert (site.max_connections, site.max_connections_per_client, site.timeOut,
            site.max_body_bytes) == (3, 2, 7.0, 4096)
    assert not site.keys.open and not svc.app.keys.open
    svc.reload(_config(server=ServerConfig(max_connections=5, api_key=None)))
    assert site.max_connections == 5 and site.keys.open and svc.app.keys.open


def test_a_reload_that_adds_the_first_managed_model_starts_its_keeper(tmp_path: Path) -> None:
    import sys

    from twisted.internet.defer import succeed

    from jano.config import parse_config
    from jano.swap.startup import with_ports
    from jano.testing import FakeProcessReactor

    base = {"telemetry": {"database": ""}, "processes": {"runs_dir": str(tmp_path / "runs")}}
    plain = {"name": "a", "upstream": "http://127.0.0.1:9", "always_on": True}
    managed = {"name": "m", "command": [sys.executable, "-c", "pass", "{port}"],
               "always_on": True}
    reactor = FakeProcessReactor()
    svc = JanoService(parse_config({**base, "models": [plain]}), reactor,
                      probe=lambda url: succeed(200), listen=False)
    svc.startService()
    assert svc.keeper is None
    svc.reload(with_ports(parse_config({**base, "models": [plain, managed]})))
    reactor.advance(0)
    assert svc.keeper is not None
    assert [p.args[-2] for p in reactor.processes] == ["pass"], "the always_on server started"
    assert len(list((tmp_path / "runs").glob("*.run"))) == 1, "and the run is recorded"
    stopped = svc.stopService()
    reactor.processes[-1].exit(0)
    reactor.advance(1)
    assert stopped.called
    assert list((tmp_path / "runs").glob("*.run")) == []
