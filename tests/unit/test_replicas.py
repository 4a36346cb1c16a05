"""
Replicas: one model on two groups (two GPUs, two hosts).  First the choice
and the failover on a Clock with a fake swapper, then through the real app
in memory: the forward goes to the chosen replica, clients see one model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Optional, Sequence

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from jano.config import parse_config
from jano.errors import Busy, SwapError
from jano.records import HealthState, ModelSpec
from jano.scheduler import ModelUnavailable, QueueFull, Replicas, Scheduler
from jano.service import JanoService
from jano.testing import FakeModelServer, SimulatedSwapper
from jano.testing._memory import MemoryClient
from test_proxy import HostAgent, World
from test_scheduler import FakeSwapper, Result, SwapFailure


def rep(group: str, conc: int = 1, spread: bool = False) -> ModelSpec:
    return ModelSpec(f"qwen@{group}", f"http://{group}.example:8080", group=group,
                     max_concurrency=conc, serves="qwen", spread=spread)


class Rig:
    def __init__(self, models: Sequence[ModelSpec], **kw: Any) -> None:
        self.clock = Clock()
        self.swapper = FakeSwapper()
        self.s = Scheduler(models, self.swapper, self.clock, **kw)
        self.health: dict[str, HealthState] = {}
        self.r = Replicas(self.s, self.clock, models, health=lambda: self.health)

    def admit(self, model: str = "qwen") -> Result:
        return Result(self.r.admit(model))

    def turn(self) -> None:
        self.clock.advance(0)

    def state(self, name: str) -> Any:
        return next(m for m in self.r.snapshot().replicas if m.name == name)


def served_by(r: Result) -> str:
    by = r.ticket.served_by
    assert by is not None
    return by.name


# --- the choice ----------------------------------------------------------------------------


def test_a_loaded_replica_with_a_free_slot_first_then_the_least_loaded() -> None:
    rig = Rig([rep("a", conc=2), rep("b", conc=2)], initial={"a": "qwen@a", "b": "qwen@b"})
    got = [rig.admit() for _ in range(4)]
    assert [served_by(r) for r in got] == ["qwen@a", "qwen@b", "qwen@a", "qwen@b"]
    queued = [rig.admit() for _ in range(3)]  # every slot taken: the least loaded queue
    assert all(r.waiting for r in queued)
    assert (rig.state("qwen@a").queued, rig.state("qwen@b").queued) == (2, 1)
    rig.r.release(got[1].ticket)  # b frees a slot: its first waiter goes
    assert served_by(queued[1]) == "qwen@b" and rig.swapper.calls == []
    assert got[0].ticket.model == "qwen@a" and got[0].ticket.failovers == 0


def test_the_replica_holding_the_model_takes_its_requests_even_when_busy() -> None:
    rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a"})
    first, second, third = rig.admit(), rig.admit(), rig.admit()
    rig.turn()
    assert served_by(first) == "qwen@a" and second.waiting and third.waiting
    assert rig.swapper.calls == []  # no load on b while a holds the model
    rig.r.release(first.ticket)
    assert served_by(second) == "qwen@a"


def test_a_request_joins_the_load_under_way_instead_of_loading_twice() -> None:
    rig = Rig([rep("a"), rep("b")])
    first = rig.admit()
    rig.turn()
    second = rig.admit()
    rig.turn()
    assert [(c.group, c.target) for c in rig.swapper.calls] == [("a", "qwen@a")]
    rig.swapper.last().succeed()
    assert served_by(first) == "qwen@a" and second.waiting


def test_the_load_goes_where_it_can_start_now_then_to_the_faster_group() -> None:
    models = [rep("a"), rep("b"), ModelSpec("llama", "http://a.example:8080", group="a"),
              ModelSpec("mist", "http://b.example:8080", group="b")]
    rig = Rig(models, initial={"a": "llama", "b": "mist"})
    busy = Result(rig.s.admit("llama"))  # a's resident has work in flight: b can load now
    r = rig.admit()
    rig.turn()
    assert [(c.group, c.target) for c in rig.swapper.calls] == [("b", "qwen@b")]
    rig.swapper.last().succeed()
    rig.r.release(r.ticket)
    rig.s.release(busy.ticket)

    # Teach each group its swap time: a swaps in 5 s, b in 2 s.
    rig2 = Rig(models, initial={"a": "qwen@a", "b": "qwen@b"})
    for name, seconds in (("llama", 5.0), ("mist", 2.0)):
        x = Result(rig2.s.admit(name))
        rig2.turn()
        rig2.clock.advance(seconds)
        rig2.swapper.last().succeed()
        rig2.s.release(x.ticket)
    r = rig2.admit()
    rig2.turn()
    assert rig2.swapper.last().target == "qwen@b"  # both idle: the cheaper swap

    # With one swap time unknown, the two are not compared: configuration order.
    rig3 = Rig(models, initial={"a": "qwen@a", "b": "mist"})
    x = Result(rig3.s.admit("llama"))
    rig3.turn()
    rig3.clock.advance(9.0)
    rig3.swapper.last().succeed()
    rig3.s.release(x.ticket)
    rig3.admit()
    rig3.turn()
    assert rig3.swapper.last().target == "qwen@a"


def spread_rig(service: float, *others: ModelSpec, conc_b: int = 1) -> tuple[Rig, Result]:
    """qwen loaded on a after a 3 s load, one request served there in ``service`` s, one in flight."""
    rig = Rig([rep("a", spread=True), rep("b", conc=conc_b, spread=True), *others])
    first = rig.admit()
    rig.turn()
    rig.clock.advance(3.0)
    rig.swapper.last().succeed()
    rig.clock.advance(service)
    rig.r.release(first.ticket)
    busy = rig.admit()
    assert served_by(busy) == "qwen@a"
    return rig, busy


def test_with_spread_a_request_that_would_wait_longer_than_a_load_loads_an_idle_replica() -> None:
    rig, busy = spread_rig(10.0)
    # a's one slot is taken for ~10 s; b is idle and a load took 3 s: load there.
    r1 = rig.admit()
    rig.turn()
    assert [(c.group, c.target) for c in rig.swapper.calls][-1] == ("b", "qwen@b")
    # While b loads, the next one weighs a's queue (10 s) against b's load plus
    # b's own queue (3 + 10 s): it stays on a; the one after that goes to b.
    r2, r3 = rig.admit(), rig.admit()
    assert (rig.state("qwen@a").queued, rig.state("qwen@b").queued) == (1, 2)
    rig.swapper.last().succeed()
    assert served_by(r1) == "qwen@b" and r2.waiting and r3.waiting
    rig.r.release(busy.ticket)
    assert served_by(r2) == "qwen@a"


def test_with_spread_short_requests_stay_in_the_queue_of_the_replica_holding_the_model() -> None:
    rig, busy = spread_rig(1.0)  # a slot frees in ~1 s, a load takes 3 s
    r = rig.admit()
    rig.turn()
    assert r.waiting and len(rig.swapper.calls) == 1
    rig.r.release(busy.ticket)
    assert served_by(r) == "qwen@a"


def test_spread_never_loads_where_another_model_has_work() -> None:
    mist = ModelSpec("mist", "http://b.example:8080", group="b")
    rig, busy = spread_rig(10.0, mist)
    other = Result(rig.s.admit("mist"))  # b loads mist and serves it
    rig.turn()
    rig.swapper.last().succeed()
    assert other.ticket is not None
    r = rig.admit()
    rig.turn()
    assert r.waiting and rig.swapper.last().target == "mist"  # no load of qwen on b
    assert rig.state("qwen@a").queued == 1


def test_a_replica_spread_to_is_handed_back_when_another_model_waits_there() -> None:
    mist = ModelSpec("mist", "http://b.example:8080", group="b")
    rig, busy = spread_rig(10.0, mist, conc_b=2)
    spilled = rig.admit()  # loads qwen on the idle b
    rig.turn()
    rig.swapper.last().succeed()
    assert served_by(spilled) == "qwen@b"
    waiting = Result(rig.s.admit("mist"))  # b's other model now waits
    r = rig.admit()  # b has a free slot, but it goes to a's queue: b drains for mist
    assert r.waiting and rig.state("qwen@a").queued == 1
    rig.r.release(spilled.ticket)
    rig.turn()
    assert rig.swapper.last().target == "mist" and waiting.waiting
    rig.swapper.last().succeed()
    assert waiting.ticket is not None


def test_without_spread_the_replica_holding_the_model_keeps_its_queue() -> None:
    rig, busy = spread_rig(10.0)
    rig.r.set_models([replace(s, spread=False) for s in (rep("a"), rep("b"))])
    for name in ("qwen@a", "qwen@b"):
        m = rig.s.record(name)
        assert m is not None
        m.spec = replace(m.spec, spread=False)
    r = rig.admit()
    rig.turn()
    assert r.waiting and len(rig.swapper.calls) == 1


def test_a_loaded_replica_probed_down_is_skipped_while_another_is_left() -> None:
    rig = Rig([rep("a", conc=4), rep("b", conc=4)], initial={"a": "qwen@a", "b": "qwen@b"})
    rig.health = {"qwen@a": "down", "qwen@b": "up"}
    assert [served_by(rig.admit()) for _ in range(3)] == ["qwen@b"] * 3
    rig.health["qwen@b"] = "stalled"  # both look down: the probe does not refuse requests
    assert served_by(rig.admit()) == "qwen@a"


# --- failover ------------------------------------------------------------------------------


def test_queued_requests_go_to_the_other_replica_when_the_swap_fails() -> None:
    rig = Rig([rep("a"), rep("b")], retry_backoff=30.0)
    waiting = [rig.admit() for _ in range(3)]
    rig.turn()
    rig.clock.advance(4.0)
    rig.swapper.last().fail(SwapFailure("failed", "qwen@a would not start"))
    rig.turn()
    assert [(c.group, c.target) for c in rig.swapper.calls] == [("a", "qwen@a"), ("b", "qwen@b")]
    rig.clock.advance(2.0)
    rig.swapper.last().succeed()
    first = waiting[0].ticket
    assert served_by(waiting[0]) == "qwen@b"
    assert (first.failovers, first.arrived_at, first.requeued_at) == (1, 0.0, 4.0)
    assert first.queue_wait == 6.0  # the whole wait, both replicas
    for i in range(1, 3):
        rig.r.release(waiting[i - 1].ticket)
        assert served_by(waiting[i]) == "qwen@b"
    rig.r.release(waiting[2].ticket)
    assert served_by(rig.admit()) == "qwen@b"  # a new one: a is down, b loaded


def test_queued_requests_move_when_their_replica_is_marked_down_or_lost() -> None:
    for how in ("mark_down", "lost"):
        rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a"})
        running, q1, q2 = rig.admit(), rig.admit(), rig.admit()
        assert served_by(running) == "qwen@a" and q1.waiting and q2.waiting
        getattr(rig.r, how)("qwen@a", "stalled", 30.0)  # the forwarder's or the keeper's call
        rig.turn()
        assert rig.swapper.last().target == "qwen@b"
        rig.swapper.last().succeed()
        assert served_by(q1) == "qwen@b" and q1.ticket.failovers == 1 and q2.waiting
        rig.r.release(running.ticket)  # the request in flight on a ends as its connection does
        rig.r.release(q1.ticket)
        assert served_by(q2) == "qwen@b"
        assert rig.r.choose("qwen") == "qwen@b"  # a is down: new requests go to b too
        later = rig.admit()
        rig.r.release(q2.ticket)
        assert served_by(later) == "qwen@b"


def test_a_replica_that_fails_its_health_check_sends_its_queue_to_the_other() -> None:
    rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a", "b": "qwen@b"})
    on_a, on_b, queued = rig.admit(), rig.admit(), rig.admit()
    assert (served_by(on_a), served_by(on_b)) == ("qwen@a", "qwen@b") and queued.waiting
    assert rig.state("qwen@a").queued == 1  # a tie between busy replicas: the first listed

    def down(name: str) -> bool:
        until = rig.state(name).down_until
        return until is not None and until > rig.clock.seconds()

    rig.r.probed("qwen@b", "unknown", "down", 30.0)  # never answered yet: nothing to act on
    assert not down("qwen@b")
    rig.r.probed("qwen@a", "up", "down", 30.0)  # answered before, fails now
    assert down("qwen@a") and "failed its health check" in (rig.state("qwen@a").down_reason or "")
    assert queued.waiting and rig.state("qwen@b").queued == 1, "its queue went to b"
    assert rig.r.choose("qwen") == "qwen@b"
    rig.r.release(on_b.ticket)
    assert served_by(queued) == "qwen@b" and queued.ticket.failovers == 1
    rig.r.probed("qwen@a", "down", "up", 30.0)  # answers again: let back at once
    assert not down("qwen@a") and rig.r.choose("qwen") == "qwen@a"


def test_a_model_without_replicas_is_not_marked_down_by_its_probe() -> None:
    spec = ModelSpec("solo", "http://solo.example:8080")
    rig = Rig([spec], initial={"default": "solo"})
    rig.r.probed("solo", "up", "down", 30.0)
    assert Result(rig.r.admit("solo")).ticket.model == "solo"


def test_each_replica_is_tried_once_then_the_request_fails_like_one_model() -> None:
    rig = Rig([rep("a"), rep("b")], retry_backoff=10.0)
    r = rig.admit()
    for _ in range(2):
        rig.turn()
        rig.swapper.last().fail(SwapFailure("failed", "no GPU at http://a.example:8080"))
    exc = r.failed_with(ModelUnavailable)
    assert len(rig.swapper.calls) == 2
    assert isinstance(exc, ModelUnavailable) and exc.model == "qwen"
    assert "every replica is down" in exc.cause and "http://" not in exc.cause
    assert "qwen@a" in exc.cause and exc.retry_after == 10.0
    # Fail fast while both are down, as one model would.
    again = rig.admit()
    assert isinstance(again.failed_with(ModelUnavailable), ModelUnavailable)
    assert rig.s.snapshot().models[0].queued == 0


def test_a_full_queue_sends_the_request_to_the_other_replica() -> None:
    rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a"}, max_queue=1)
    running, queued, spill = rig.admit(), rig.admit(), rig.admit()
    rig.turn()
    assert served_by(running) == "qwen@a" and queued.waiting and spill.waiting
    assert rig.swapper.last().target == "qwen@b"
    rig.swapper.last().succeed()
    assert served_by(spill) == "qwen@b"
    rig2 = Rig([rep("a"), rep("b")], initial={"a": "qwen@a", "b": "qwen@b"}, max_queue=1)
    for _ in range(4):
        rig2.admit()
    assert isinstance(rig2.admit().failed_with(QueueFull), QueueFull)  # both full: 429


def test_a_client_that_leaves_while_queued_leaves_no_waiter_behind() -> None:
    rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a"})
    running, queued = rig.admit(), rig.admit()
    queued.d.cancel()
    assert rig.state("qwen@a").queued == 0 and queued.fired == 1
    rig.r.release(running.ticket)
    assert rig.state("qwen@a").in_flight == 0


def test_load_unload_and_the_snapshot_speak_of_the_model() -> None:
    rig = Rig([rep("a", conc=2), rep("b", conc=3)], initial={"b": "qwen@b"})
    done: list[object] = []
    rig.r.load("qwen").addBoth(done.append)
    assert done == [None] and rig.swapper.calls == []  # loaded on b already
    r = rig.admit()
    snap = rig.r.snapshot()
    (model,) = snap.models
    assert (model.name, model.in_flight, model.resident, model.max_concurrency) == (
        "qwen", 1, True, 5)
    assert [(x.name, x.resident, x.serves) for x in snap.replicas] == [
        ("qwen@a", False, "qwen"), ("qwen@b", True, "qwen")]
    try:
        rig.r.unload("qwen")
    except Busy:
        pass
    else:
        raise AssertionError("b has a request in flight")
    rig.r.release(r.ticket)
    assert rig.r.unload("qwen") is True
    assert rig.swapper.last().previous == "qwen@b"


# --- through the app, in memory ---------------------------------------------------------------

HOST_A, HOST_B = "127.0.0.2:9001", "127.0.0.3:9001"
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class FlakySwapper(SimulatedSwapper):
    """The simulated swapper, failing swaps to the models in ``failing``."""

    failing: set[str] = set()

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = ()) -> Deferred[None]:
        if target.name in self.failing:
            return fail(SwapError("failed", f"cannot reach {target.upstream}"))
        return super().swap(group, previous, target)


class ReplicaWorld(World):
    """Jano with ``qwen`` on two hosts (groups ``host-a`` and ``host-b``), in memory."""

    def __init__(self, *, agents: Optional[dict[str, Any]] = None, initial: bool = False,
                 stall_cooldown: float = 30.0) -> None:
        self.clock = Clock()
        self.fake_kw = {}
        self.fakes = {name: FakeModelServer(self.clock, models=("qwen",), start_loaded=initial)
                      for name in ("qwen@host-a", "qwen@host-b")}
        upstream = agents or {}
        upstream.setdefault(HOST_A, RequestTraversalAgent(self.fakes["qwen@host-a"].resource()))
        upstream.setdefault(HOST_B, RequestTraversalAgent(self.fakes["qwen@host-b"].resource()))
        upstream["user:secret@" + HOST_A] = upstream[HOST_A]  # host a's URL carries credentials
        self.agent = HostAgent(upstream)
        sched: dict[str, Any] = {"collate": 0, "retry_backoff": 20}
        if initial:
            sched["initial_model"] = {"host-a": "qwen@host-a", "host-b": "qwen@host-b"}
        self.config = parse_config({
            "server": {"stall_cooldown": stall_cooldown},
            "scheduler": sched, "telemetry": {"database": ""},
            "swap": {"command": ["true"]},
            "models": [{"name": "qwen", "max_concurrency": 1, "upstreams": [
                {"url": f"http://user:secret@{HOST_A}", "group": "host-a"},
                {"url": f"http://{HOST_B}", "group": "host-b"}]}]})
        self.flaky = FlakySwapper(self.clock, self.fakes, delay=2.0)
        self.flaky.failing = set()
        self.swapper = self.flaky
        self.svc = JanoService(self.config, self.clock, swapper=self.swapper, agent=self.agent,
                               probe=lambda url: fail(ConnectionRefusedError()), listen=False)
        self.client = MemoryClient(self.svc.site)

    def chat(self) -> tuple[IResponse, bytes]:
        return self.call("POST", "/v1/chat/completions", CHAT, advance=0.5)

    def hosts(self) -> list[str]:
        return [uri.decode().split("/")[2].rsplit("@", 1)[-1] for _, uri, _ in self.agent.seen]


def test_the_forward_goes_to_the_chosen_replica_and_clients_see_one_model() -> None:
    w = ReplicaWorld()
    resp, body = w.chat()
    assert resp.code == 200, body
    assert w.hosts() == [HOST_A]  # nothing loaded: the first replica listed
    models = json.loads(w.call("GET", "/v1/models")[1])["data"]
    assert [(m["id"], m["status"]["value"]) for m in models] == [("qwen", "loaded")]
    assert [m["name"] for m in json.loads(w.call("GET", "/api/tags")[1])["models"]] == ["qwen"]
    assert [m["name"] for m in json.loads(w.call("GET", "/api/ps")[1])["models"]] == ["qwen"]
    assert w.usage()[0]["model"] == "qwen"
    status = json.loads(w.call("GET", "/status")[1])
    assert set(status["queueDepthByModel"]) == {"qwen"} and status["modelStatus"] == {
        "qwen": "loaded"}
    assert set(status["backendHealth"]) == {"qwen"}
    a, b = status["replicas"]["qwen"]
    assert (a["name"], a["group"], a["status"], a["upstream"]) == (
        "qwen@host-a", "host-a", "loaded", f"http://{HOST_A}")  # never the credentials
    assert (b["name"], b["status"], b["down"]) == ("qwen@host-b", "unloaded", None)
    assert "secret" not in json.dumps(status)
    assert status["recentSwaps"][0]["to"] == "qwen" and status["recentSwaps"][0]["group"] == \
        "host-a"
    text = w.call("GET", "/metrics")[1].decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("jano_replica_resident", (("model", "qwen"), ("replica", "host-a")))] == 1.0
    assert samples[("jano_replica_resident", (("model", "qwen"), ("replica", "host-b")))] == 0.0
    assert samples[("jano_model_loaded", (("model", "qwen"),))] == 1.0
    assert not [k for k in samples if any("@" in v for _, v in k[1])]  # replicas stay inside
    # GET routes that need no admission go to a replica too, never to an empty URL.
    resp, _ = w.call("GET", "/props", headers={"X-Jano-Model": "qwen"})
    assert w.hosts()[-1] == HOST_A


def test_a_failed_load_fails_over_and_all_down_is_a_503_without_urls() -> None:
    w = ReplicaWorld()
    w.flaky.failing = {"qwen@host-a"}
    resp, body = w.chat()
    assert resp.code == 200, body
    assert w.hosts() == [HOST_B]
    status = json.loads(w.call("GET", "/status")[1])
    assert status["replicas"]["qwen"][0]["down"]["reason"].startswith("cannot reach")
    assert status["modelsDown"] == {}  # one replica is up: the model is not down

    w2 = ReplicaWorld()
    w2.flaky.failing = {"qwen@host-a", "qwen@host-b"}
    resp, body = w2.chat()
    assert resp.code == 503
    message = json.loads(body)["error"]["message"]
    assert "every replica is down" in message and "127.0.0." not in message, message
    assert "secret" not in message


def test_a_replica_that_refuses_connections_sends_the_next_requests_to_the_other() -> None:
    @implementer(IAgent)
    class Refusing:
        def request(self, *a: Any, **k: Any) -> "Deferred[IResponse]":
            return fail(ConnectionRefusedError())

    w = ReplicaWorld(agents={HOST_A: Refusing()}, initial=True)
    w.clock.advance(100.0)
    for _ in range(3):  # the first never reached host a: it is queued again, on b
        resp, body = w.chat()
        assert resp.code == 200, body
    assert w.hosts() == [HOST_A, HOST_B, HOST_B, HOST_B]
    status = json.loads(w.call("GET", "/status")[1])
    assert status["replicas"]["qwen"][0]["down"] is not None
    records = w.usage()
    assert [r["model"] for r in records] == ["qwen"] * 3
    assert [r["outcome"] for r in records] == ["completed"] * 3

    # With every replica refusing, each is tried once, then the answer is a 502 as today.
    w2 = ReplicaWorld(agents={HOST_A: Refusing(), HOST_B: Refusing()}, initial=True)
    resp, body = w2.chat()
    assert resp.code == 502 and "127.0.0." not in body.decode()
    assert w2.hosts() == [HOST_A, HOST_B]
    resp, body = w2.chat()
    assert resp.code == 503 and "every replica is down" in body.decode()


@implementer(IAgent)
class Scripted:
    """An upstream that fails its first requests as ``script`` says, then acts as ``then``."""

    def __init__(self, script: list[Exception], then: Any) -> None:
        self.script = script
        self.then = then

    def request(self, *a: Any, **k: Any) -> "Deferred[IResponse]":
        if self.script:
            return fail(self.script.pop(0))
        if isinstance(self.then, Exception):
            return fail(self.then)
        d: Deferred[IResponse] = self.then.request(*a, **k)
        return d


def lost() -> ResponseNeverReceived:
    return ResponseNeverReceived([Failure(ConnectionLost("gone in a non-clean fashion"))])


def test_a_replica_that_dies_as_a_request_reaches_it_sends_the_request_elsewhere() -> None:
    # Its server was killed as the request was sent (the connection closes,
    # no answer), then refuses: the request goes to the other replica.  This
    # is the race the multi-host process test met when a host's server died.
    w = ReplicaWorld(initial=True)
    w.agent.agents[HOST_A] = w.agent.agents["user:secret@" + HOST_A] = Scripted(
        [lost()], ConnectionRefusedError())
    w.clock.advance(100.0)
    resp, body = w.chat()
    assert resp.code == 200, body
    assert w.hosts() == [HOST_A, HOST_A, HOST_B]
    record = w.usage()[0]
    assert (record["model"], record["outcome"]) == ("qwen", "completed")
    assert json.loads(w.call("GET", "/status")[1])["replicas"]["qwen"][0]["down"] is not None


def test_a_replica_that_closed_a_pooled_connection_is_asked_again() -> None:
    # An idle keep-alive connection closed by the server just as it was reused:
    # the same replica answers on a new connection, and nothing is marked down.
    w = ReplicaWorld(initial=True)
    real = w.agent.agents[HOST_A]
    w.agent.agents[HOST_A] = w.agent.agents["user:secret@" + HOST_A] = Scripted(
        [RequestTransmissionFailed([Failure(ConnectionLost("closed while idle"))])], real)
    w.clock.advance(100.0)
    resp, body = w.chat()
    assert resp.code == 200, body
    assert w.hosts() == [HOST_A, HOST_A]
    assert json.loads(w.call("GET", "/status")[1])["replicas"]["qwen"][0]["down"] is None


def test_a_replica_that_keeps_dropping_connections_gets_one_more_try_then_a_502() -> None:
    w = ReplicaWorld(initial=True)
    w.agent.agents[HOST_A] = w.agent.agents["user:secret@" + HOST_A] = Scripted([], lost())
    w.clock.advance(100.0)
    resp, body = w.chat()
    assert resp.code == 502, body
    message = json.loads(body)["error"]["message"]
    assert "closed the connection without answering" in message and "127.0.0." not in message
    assert w.hosts() == [HOST_A, HOST_A]
    assert w.usage()[0]["outcome"] == "upstream_error"


def test_a_connection_closed_after_the_server_worked_on_it_is_not_sent_again() -> None:
    w = ReplicaWorld(initial=True)

    @implementer(IAgent)
    class LateClose:
        def request(self, *a: Any, **k: Any) -> "Deferred[IResponse]":
            d: Deferred[IResponse] = Deferred()
            w.clock.callLater(5.0, d.errback, lost())  # its own timeout, say: it may have run
            return d

    w.agent.agents[HOST_A] = w.agent.agents["user:secret@" + HOST_A] = LateClose()
    w.clock.advance(100.0)
    resp, body = w.call("POST", "/v1/chat/completions", CHAT, advance=6.0)
    assert resp.code == 502, body
    assert w.hosts() == [HOST_A]


def test_a_reload_that_turns_a_model_into_replicas_moves_its_queue_onto_them() -> None:
    one = ModelSpec("qwen", "http://a.example:8080", group="a", max_concurrency=1)
    rig = Rig([one], initial={"a": "qwen"})
    running, queued = rig.admit(), rig.admit()
    assert running.ticket.model == "qwen" and queued.waiting
    rig.clock.advance(5.0)
    new = [rep("a"), rep("b")]
    rig.r.set_models(new)
    rig.s.reconfigure(new, max_wait=120.0, max_queue=256)
    rig.turn()
    # Not a 503: queued again on a replica (b can load it now; a still serves the old request).
    assert rig.swapper.last().target == "qwen@b"
    rig.swapper.last().succeed()
    assert served_by(queued) == "qwen@b"
    assert queued.ticket.arrived_at == 0.0 and queued.ticket.requeued_at == 5.0
    rig.r.release(running.ticket)
    rig.r.release(queued.ticket)


def test_a_reload_that_turns_replicas_into_one_model_moves_their_queue_onto_it() -> None:
    rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a", "b": "qwen@b"})
    running = [rig.admit(), rig.admit()]
    queued = rig.admit()
    assert queued.waiting
    one = [ModelSpec("qwen", "http://a.example:8080", group="a", max_concurrency=1)]
    rig.r.set_models(one)
    rig.s.reconfigure(one, max_wait=120.0, max_queue=256)
    rig.turn()
    for r in running:  # the replicas' requests in flight end as usual
        rig.r.release(r.ticket)
    rig.turn()
    rig.swapper.last().succeed()
    assert queued.ticket is not None and queued.ticket.model == "qwen"


def test_a_reload_that_removes_a_replica_moves_its_queue_to_the_others() -> None:
    rig = Rig([rep("a"), rep("b")], initial={"a": "qwen@a"})
    running, queued = rig.admit(), rig.admit()
    assert served_by(running) == "qwen@a" and queued.waiting
    new = [rep("b"), rep("c")]
    rig.r.set_models(new)  # first, as the service does: the queue may go to qwen@c already
    rig.s.reconfigure(new, max_wait=120.0, max_queue=256)
    rig.turn()
    assert rig.swapper.last().target == "qwen@b"
    rig.swapper.last().succeed()
    assert served_by(queued) == "qwen@b" and queued.ticket.failovers == 1
    rig.r.release(running.ticket)  # the request in flight on the removed replica ends as usual
