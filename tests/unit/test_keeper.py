"""
The managed servers' life outside a swap, on the fake process reactor:
always_on starts and restarts, crashes told to the scheduler, servers a
reload removed or changed stopped once their requests are done, and the end.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed

from jano.records import ModelSpec, ModelState, SchedulerSnapshot
from jano.swap.keeper import ServerKeeper
from jano.swap.managed import ManagedSwapper
from jano.swap.supervisor import Supervisor
from jano.testing import FakeProcessReactor

CMD = ("llama-server", "--port", "{port}")
CHAT = ModelSpec("chat", "http://127.0.0.1:10100", port=10100, command=CMD)
EMBED = ModelSpec("embed", "http://127.0.0.1:10101", port=10101, command=CMD, always_on=True)


class FakeScheduler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, float]] = []
        self.in_flight: dict[str, int] = {}

    def lost(self, model: str, cause: str, seconds: float) -> None:
        self.calls.append(("lost", model, cause, seconds))

    def mark_down(self, model: str, cause: str, seconds: float) -> None:
        self.calls.append(("down", model, cause, seconds))

    def clear_down(self, model: str) -> None:
        self.calls.append(("up", model, "", 0.0))

    def snapshot(self) -> SchedulerSnapshot:
        models = tuple(ModelState(name=n, group="default", queued=0, in_flight=k,
                                  max_concurrency=4, resident=True, always_on=False,
                                  oldest_queued_at=None, down_until=None, down_reason=None)
                       for n, k in self.in_flight.items())
        return SchedulerSnapshot(at=0.0, models=models, groups=())


class Rig:
    def __init__(self) -> None:
        self.reactor = FakeProcessReactor()
        self.supervisor = Supervisor(self.reactor, backoff=2.0, backoff_max=8.0,
                                     killpg=self.reactor.killpg, is_free=lambda port: True,
                                     env={"PATH": "/bin"})
        self.swapper = ManagedSwapper(self.reactor, self.supervisor, None,
                                      lambda url: succeed(200), ready_timeout=10.0)
        self.health: list[tuple[str, str]] = []
        self.keeper = ServerKeeper(self.reactor, self.swapper,
                                   lambda m, s: self.health.append((m, s)))
        self.scheduler = FakeScheduler()
        self.keeper.scheduler = self.scheduler

    def pid(self, model: str) -> Any:
        return self.supervisor.children[model].pid


def test_an_always_on_server_starts_with_jano_and_restarts_after_its_backoff() -> None:
    rig = Rig()
    rig.keeper.start([CHAT, EMBED])
    assert [p.args[-1] for p in rig.reactor.processes] == ["10101"], "only always_on starts"
    assert rig.scheduler.calls[0][:3] == ("down", "embed", "embed is starting")
    assert rig.scheduler.calls[-1] == ("up", "embed", "", 0.0), "admitted once it answers"
    assert rig.health == [("embed", "up")]
    rig.reactor.processes[-1].stderr(b"ggml_cuda: out of memory\n")
    rig.reactor.processes[-1].killed(signal.SIGKILL)
    assert rig.scheduler.calls[-1][:2] == ("down", "embed") and rig.scheduler.calls[-1][3] == 2.0
    assert "out of memory" in rig.scheduler.calls[-1][2]
    assert len(rig.reactor.processes) == 1
    rig.reactor.advance(2.0)
    assert len(rig.reactor.processes) == 2 and rig.supervisor.children["embed"].state == "running"


def test_a_crash_of_a_swappable_model_is_told_to_the_scheduler_as_lost() -> None:
    rig = Rig()
    rig.swapper.swap("default", None, CHAT)
    rig.reactor.processes[-1].exit(139)
    kind, model, cause, backoff = rig.scheduler.calls[-1]
    assert (kind, model, backoff) == ("lost", "chat", 2.0)
    assert cause == "chat exited with status 139"
    assert ("chat", "down") in rig.health


def test_a_reload_stops_a_removed_server_once_its_requests_are_done() -> None:
    rig = Rig()
    rig.keeper.start([CHAT])
    rig.swapper.swap("default", None, CHAT)
    chat = rig.reactor.processes[-1]
    rig.scheduler.in_flight["chat"] = 1
    rig.keeper.reload([])
    assert rig.reactor.killpg_calls == [], "a request is still streaming from it"
    rig.reactor.advance(1.0)
    assert rig.reactor.killpg_calls == []
    rig.scheduler.in_flight["chat"] = 0
    rig.reactor.advance(1.0)
    assert rig.reactor.killpg_calls == [(chat.original_pid, signal.SIGTERM)]
    chat.exit(0)
    assert not any(c[0] == "lost" for c in rig.scheduler.calls), "a removed model is gone anyway"


def test_a_reload_that_changes_a_command_restarts_the_model_with_the_new_one() -> None:
    rig = Rig()
    rig.keeper.start([CHAT])
    rig.swapper.swap("default", None, CHAT)
    old = rig.reactor.processes[-1]
    changed = replace(CHAT, command=(*CMD, "-c", "16384"))
    rig.keeper.reload([changed])
    assert rig.reactor.killpg_calls == [(old.original_pid, signal.SIGTERM)]
    assert rig.scheduler.calls[-1] == ("lost", "chat", "chat restarts with its new configuration",
                                       0.0)
    old.exit(0)
    d: Deferred[Any] = rig.swapper.swap("default", None, changed)
    assert rig.reactor.processes[-1].args[-2:] == ["-c", "16384"]
    assert d.called


def test_stop_cancels_pending_restarts_and_stops_every_server() -> None:
    rig = Rig()
    rig.keeper.start([EMBED])
    rig.reactor.processes[-1].exit(1)  # a crash: a restart is now pending
    assert rig.reactor.getDelayedCalls()
    rig.swapper.swap("default", None, CHAT)
    done = rig.keeper.stop()
    assert rig.reactor.killpg_calls[-1] == (rig.reactor.processes[-1].original_pid, signal.SIGTERM)
    assert not done.called
    rig.reactor.processes[-1].exit(0)
    assert done.called
    rig.reactor.advance(10.0)
    assert len(rig.reactor.processes) == 2, "no restart after stop"
