"""
Groups with a memory budget: several models loaded at once, loads that evict
idle residents, driven by hand on a ``Clock`` with a fake swapper whose loads
the test completes (or fails) explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from jano.errors import Busy, SwapError
from jano.records import GroupState, ModelSpec, ModelState, SchedulerSnapshot, SwapEvent
from jano.scheduler import Draining, ModelUnavailable, Scheduler
from jano.scheduler.budget import choose_eviction
from jano.scheduler.state import Model
from jano.telemetry import Telemetry

from test_scheduler import Result


def spec(name: str, memory: Optional[int], group: str = "gpu", conc: int = 4,
         ttl: Optional[float] = None, always_on: bool = False) -> ModelSpec:
    return ModelSpec(name, f"http://127.0.0.1:1/{name}", max_concurrency=conc, group=group,
                     memory=memory, ttl=ttl, always_on=always_on)


#: ``evict``'s default, told apart from an empty tuple passed on purpose.
NOT_GIVEN: Sequence[ModelSpec] = []


@dataclass
class Call:
    group: str
    previous: Optional[str]
    #: ``""`` for an unload.
    target: str
    #: ``None``: the scheduler passed no ``evict`` (a group without a budget), or an unload.
    evict: Optional[tuple[str, ...]]
    d: Deferred[Any] = field(default_factory=Deferred)

    def succeed(self) -> None:
        self.d.callback(None)

    def fail(self, exc: Exception) -> None:
        self.d.errback(Failure(exc))

    @property
    def shape(self) -> tuple[Optional[str], str, Optional[tuple[str, ...]]]:
        return (self.previous, self.target, self.evict)


class FakeSwapper:
    """Records every load and unload; the test fires each one by hand."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = NOT_GIVEN) -> Deferred[Any]:
        call = Call(group, previous.name if previous else None, target.name,
                    None if evict is NOT_GIVEN else tuple(m.name for m in evict))
        self.calls.append(call)
        return call.d

    def unload(self, group: str, model: ModelSpec) -> Deferred[Any]:
        call = Call(group, model.name, "", None)
        self.calls.append(call)
        return call.d

    def last(self) -> Call:
        return self.calls[-1]

    @property
    def shapes(self) -> list[tuple[Optional[str], str, Optional[tuple[str, ...]]]]:
        return [c.shape for c in self.calls]


class Rig:
    def __init__(self, models: Sequence[ModelSpec], *, budgets: Mapping[str, int],
                 initial: Optional[Mapping[str, str]] = None, **kw: Any) -> None:
        self.clock = Clock()
        self.swapper = FakeSwapper()
        self.events: list[SwapEvent] = []
        self.s = Scheduler(models, self.swapper, self.clock, initial=initial,
                           on_swap=self.events.append, budgets=budgets, **kw)

    def admit(self, model: str) -> Result:
        return Result(self.s.admit(model))

    def at(self, t: float) -> None:
        self.clock.advance(t - self.clock.seconds())

    def turn(self) -> None:
        self.clock.advance(0)

    def load(self, *names: str) -> None:
        """Make ``names`` resident, one load after the other, each evicting nothing."""
        for name in names:
            done: list[object] = []
            self.s.load(name).addBoth(done.append)
            self.turn()
            call = self.swapper.last()
            assert (call.target, call.evict) == (name, ()), call
            call.succeed()
            assert done == [None]

    def use(self, name: str) -> None:
        """One request for resident ``name``, served and ended at once (it was used now)."""
        r = self.admit(name)
        assert not r.waiting
        self.s.release(r.ticket)

    def model(self, name: str) -> ModelState:
        return next(m for m in self.s.snapshot().models if m.name == name)

    def group(self, name: str = "gpu") -> GroupState:
        return next(g for g in self.s.snapshot().groups if g.name == name)


# --- co-residency ---------------------------------------------------------------------------


def test_two_small_models_are_loaded_side_by_side_and_served_at_once() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 12)], budgets={"gpu": 24})
    a = rig.admit("A")
    rig.turn()
    assert rig.swapper.shapes == [(None, "A", ())]  # nothing loaded, nothing to evict
    rig.at(1.0)
    rig.swapper.last().succeed()
    b = rig.admit("B")  # A is busy: B fits beside it, no need to wait for A
    rig.turn()
    assert rig.swapper.last().shape == (None, "B", ())
    a2 = rig.admit("A")  # A is served during B's load
    assert not a2.waiting and not a2.ticket.waited_for_swap
    rig.at(2.0)
    rig.swapper.last().succeed()
    assert not b.waiting and b.ticket.waited_for_swap and a.ticket.waited_for_swap
    b2, a3 = rig.admit("B"), rig.admit("A")
    assert not b2.waiting and not a3.waiting  # both resident: both dispatched at once
    assert len(rig.swapper.calls) == 2
    g = rig.group()
    assert g.residents == ("A", "B") and g.resident == "B" and g.loaded_at == 2.0
    assert (g.memory_budget, g.memory_used) == (24, 16)
    assert rig.model("A").resident and rig.model("B").resident and not rig.model("C").resident
    assert [(e.from_model, e.to_model, e.result) for e in rig.events] == [
        (None, "A", "ok"), (None, "B", "ok")]


def test_a_model_that_does_not_fit_evicts_the_least_recently_used_idle_resident() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 12)], budgets={"gpu": 24})
    rig.load("A", "B")
    rig.at(1.0)
    rig.use("B")
    rig.at(2.0)
    rig.use("A")  # B is now the least recently used
    c = rig.admit("C")
    rig.turn()
    assert rig.swapper.last().shape == ("B", "C", ("B",))
    g = rig.group()
    assert (g.swapping_to, g.evicting, g.residents, g.memory_used) == ("C", ("B",), ("A",), 8)
    assert not rig.model("B").resident
    rig.swapper.last().succeed()
    assert not c.waiting
    assert rig.group().residents == ("A", "C")
    assert [(e.from_model, e.to_model) for e in rig.events][-1] == ("B", "C")


def test_the_smallest_set_is_evicted_not_the_least_recently_used_models() -> None:
    # budget 24; A 4 (used at 1), B 6 (at 2), C 12 (at 3): 22 used, 2 free.
    # D needs 12: 10 more.  A+B free exactly 10 and are older, but C alone frees 12.
    rig = Rig([spec("A", 4), spec("B", 6), spec("C", 12), spec("D", 12)], budgets={"gpu": 24})
    rig.load("A", "B", "C")
    for t, name in ((1.0, "A"), (2.0, "B"), (3.0, "C")):
        rig.at(t)
        rig.use(name)
    rig.admit("D")
    rig.turn()
    assert rig.swapper.last().shape == ("C", "D", ("C",))


def test_when_two_models_are_needed_the_least_recently_used_pair_goes() -> None:
    # budget 24; A 6 (used at 3), B 6 (at 1), C 6 (at 2), 6 free; D needs 16: two of them.
    rig = Rig([spec("A", 6), spec("B", 6), spec("C", 6), spec("D", 16)], budgets={"gpu": 24})
    rig.load("A", "B", "C")
    for t, name in ((1.0, "B"), (2.0, "C"), (3.0, "A")):
        rig.at(t)
        rig.use(name)
    rig.admit("D")
    rig.turn()
    assert rig.swapper.last().shape == ("B", "D", ("B", "C"))


def test_a_model_that_fits_is_loaded_without_evicting_and_without_the_window() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 16)], budgets={"gpu": 24}, collate=5.0)
    rig.load("A")
    rig.admit("B")
    rig.turn()  # fits: no collation window, only the one turn of "look once more"
    assert rig.swapper.last().shape == (None, "B", ())


def test_an_evicting_load_respects_the_window_and_a_request_meanwhile_saves_the_resident() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 12)], budgets={"gpu": 24}, collate=0.5)
    rig.load("A", "B")
    rig.at(1.0)
    rig.use("A")  # B is the least recently used
    c = rig.admit("C")
    rig.at(1.3)
    assert len(rig.swapper.calls) == 2  # held: B may still be asked for
    b = rig.admit("B")
    assert not b.waiting  # served at once; B is busy now, so A goes instead
    rig.at(1.49)
    assert len(rig.swapper.calls) == 2
    rig.at(1.5)  # the window runs from when the eviction was first wanted
    assert rig.swapper.last().shape == ("A", "C", ("A",))
    rig.swapper.last().succeed()
    assert not c.waiting


def test_min_residency_protects_a_freshly_loaded_resident_from_eviction() -> None:
    rig = Rig([spec("A", 12), spec("B", 12), spec("C", 12)], budgets={"gpu": 24},
              min_residency=10.0)
    rig.load("A")
    rig.at(5.0)
    rig.load("B")  # B loaded at 5, A at 0
    rig.at(6.0)
    rig.use("A")  # B is the least recently used, but young
    rig.admit("C")
    rig.at(14.99)
    assert len(rig.swapper.calls) == 2
    rig.at(15.0)
    assert rig.swapper.last().shape == ("B", "C", ("B",))


# --- never evict work ---------------------------------------------------------------------------


def test_a_resident_with_requests_in_flight_is_never_evicted() -> None:
    rig = Rig([spec("A", 12), spec("B", 12), spec("C", 12)], budgets={"gpu": 24})
    rig.load("A", "B")
    rig.at(1.0)
    a = rig.admit("A")
    rig.at(2.0)
    b = rig.admit("B")  # both busy; A is the least recently used
    c = rig.admit("C")
    rig.at(10.0)
    assert len(rig.swapper.calls) == 2 and c.waiting  # waits: nothing may go
    rig.s.release(b.ticket)  # B idle first: it goes, though A is older
    rig.turn()
    assert rig.swapper.last().shape == ("B", "C", ("B",))
    rig.swapper.last().succeed()
    assert not c.waiting and not a.waiting and rig.group().residents == ("A", "C")


def test_a_resident_with_waiters_of_its_own_is_not_evicted() -> None:
    rig = Rig([spec("A", 12, conc=1), spec("B", 12), spec("C", 12)], budgets={"gpu": 24})
    rig.load("A", "B")
    rig.at(1.0)
    rig.use("B")
    a1, a2 = rig.admit("A"), rig.admit("A")  # A: one in flight, one queued (conc 1)
    rig.s.release(a1.ticket)  # a2 goes at once: A is never idle
    assert not a2.waiting
    rig.admit("C")
    rig.turn()
    assert rig.swapper.last().shape == ("B", "C", ("B",))


def test_when_even_every_idle_resident_is_not_enough_the_load_waits() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 8), spec("D", 20)], budgets={"gpu": 24})
    rig.load("A", "B", "C")
    a = rig.admit("A")
    d = rig.admit("D")  # needs 20: B and C idle free only 16
    rig.at(5.0)
    assert len(rig.swapper.calls) == 3 and d.waiting
    rig.s.release(a.ticket)
    rig.turn()
    assert rig.swapper.last().shape == ("B", "D", ("B", "C", "A"))  # A was used at 5


def test_a_younger_model_that_can_load_goes_ahead_of_an_older_one_that_cannot() -> None:
    rig = Rig([spec("A", 12), spec("B", 4), spec("C", 24)], budgets={"gpu": 24}, max_wait=30.0)
    rig.load("A")
    a = rig.admit("A")
    c = rig.admit("C")  # needs A gone; A is busy
    rig.at(1.0)
    b = rig.admit("B")  # fits beside A
    rig.turn()
    assert rig.swapper.last().shape == (None, "B", ())
    rig.swapper.last().succeed()
    assert not b.waiting and c.waiting
    rig.s.release(a.ticket)
    rig.s.release(b.ticket)
    rig.turn()
    assert rig.swapper.last().shape == ("A", "C", ("A", "B"))


# --- the starvation guard -----------------------------------------------------------------------


def test_a_stream_for_the_residents_cannot_starve_a_model_that_needs_their_memory() -> None:
    """C waits at most max_wait, then the residents' last service time, then its load."""
    rig = Rig([spec("A", 12, conc=8), spec("B", 12, conc=8), spec("C", 12)],
              budgets={"gpu": 24}, max_wait=10.0)
    rig.load("A", "B")
    service, swap = 3.0, 2.0
    c: Optional[Result] = None
    results: list[Result] = []
    released: set[int] = set()
    t = 0.0
    while t < 60.0:
        rig.at(t)
        for r in results:  # every request holds its slot for `service` seconds
            if (id(r) not in released and not r.waiting
                    and t >= r.ticket.dispatched_at + service):  # type: ignore[operator]
                released.add(id(r))
                rig.s.release(r.ticket)
        if t == 1.0:
            c = rig.admit("C")
            results.append(c)
        if t < 40.0:
            results += [rig.admit("A"), rig.admit("B")]  # one each every half second
        call = rig.swapper.last()
        started = rig.group().swap_started_at
        if not call.d.called and started is not None and t >= started + swap:
            call.succeed()
        t += 0.5
    assert c is not None and c.ticket.queue_wait is not None
    assert c.ticket.queue_wait <= 10.0 + service + swap
    assert all(not r.waiting for r in results)
    # C evicted one of them, whose requests held back meanwhile made it load again.
    assert [(x.target, len(x.evict or ())) for x in rig.swapper.calls[2:]] == [
        ("C", 1), ("A", 1)]


def test_the_guard_may_evict_a_resident_whose_only_waiters_it_holds_back() -> None:
    rig = Rig([spec("A", 12, conc=1), spec("B", 12, conc=1), spec("C", 24)],
              budgets={"gpu": 24}, max_wait=5.0)
    rig.load("A", "B")
    a1 = rig.admit("A")
    b1 = rig.admit("B")
    rig.at(1.0)
    c = rig.admit("C")  # needs both A and B gone
    rig.at(6.0)  # C overdue: the guard engages
    a2 = rig.admit("A")
    rig.s.release(a1.ticket)
    rig.turn()
    assert a2.waiting  # held back: newer than C's request
    assert len(rig.swapper.calls) == 2  # B still runs a request
    rig.at(7.0)
    rig.s.release(b1.ticket)
    rig.turn()
    assert rig.swapper.last().shape == ("A", "C", ("A", "B"))  # A too, though a2 waits for it
    rig.swapper.last().succeed()
    assert not c.waiting and a2.waiting
    rig.s.release(c.ticket)
    rig.turn()
    assert rig.swapper.last().shape == ("C", "A", ("C",))
    rig.swapper.last().succeed()
    assert a2.ticket.waited_for_swap


def test_the_guard_timer_fires_exactly_when_the_oldest_outsider_is_due() -> None:
    rig = Rig([spec("A", 12), spec("B", 12), spec("C", 12)], budgets={"gpu": 24}, max_wait=10.0)
    rig.load("A", "B")
    a = rig.admit("A")
    b = rig.admit("B")
    rig.at(2.0)
    rig.admit("C")
    assert [x.getTime() for x in rig.clock.getDelayedCalls()] == [12.0]
    rig.at(11.99)
    assert not rig.admit("A").waiting
    rig.at(12.0)
    assert rig.clock.getDelayedCalls() == []
    assert rig.admit("A").waiting and rig.admit("B").waiting
    rig.s.release(a.ticket)
    rig.s.release(b.ticket)


# --- failures, unloads, lost models -------------------------------------------------------------


def test_a_failed_load_marks_the_target_down_and_forgets_only_the_evicted() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 12)], budgets={"gpu": 24},
              retry_backoff=5.0)
    rig.load("A", "B")
    rig.at(1.0)
    rig.use("B")
    c1, c2 = rig.admit("C"), rig.admit("C")
    rig.turn()
    assert rig.swapper.last().shape == ("A", "C", ("A",))
    rig.at(3.0)
    rig.swapper.last().fail(SwapError("failed", "out of memory", retry_after=30.0))
    for r in (c1, c2):
        err = r.failed_with(ModelUnavailable)
        assert isinstance(err, ModelUnavailable) and err.retry_after == 30.0
    g = rig.group()
    assert g.residents == ("B",) and g.swapping_to is None and g.evicting == ()
    assert rig.model("C").down_until == 33.0 and not rig.model("A").resident
    assert [(e.from_model, e.to_model, e.result, e.error) for e in rig.events][-1] == (
        "A", "C", "failed", "out of memory")
    rig.admit("C").failed_with(ModelUnavailable)
    a = rig.admit("A")  # A is not counted as loaded any more: loaded again, beside B
    rig.turn()
    assert rig.swapper.last().shape == (None, "A", ())
    rig.swapper.last().succeed()
    assert not a.waiting


def test_each_resident_has_its_own_ttl_and_an_unload_keeps_the_others() -> None:
    rig = Rig([spec("A", 8, ttl=60.0), spec("B", 8), spec("C", 8)], budgets={"gpu": 24},
              ttl=100.0)
    rig.load("A", "B")
    rig.at(30.0)
    b = rig.admit("B")
    rig.at(40.0)
    rig.s.release(b.ticket)  # B idle from 40: unloaded at 140; A idle from 0: at 60
    assert rig.model("A").unload_at == 60.0 and rig.model("B").unload_at == 140.0
    assert rig.group().unload_at == 60.0
    rig.at(60.0)
    assert rig.swapper.last().shape == ("A", "", None)
    g = rig.group()
    assert g.unloading == "A" and g.residents == ("B",)
    assert not rig.admit("B").waiting  # B serves during A's unload
    rig.swapper.last().succeed()
    assert [(e.kind, e.from_model, e.reason) for e in rig.events][-1] == ("unload", "A", "idle")
    assert rig.group().residents == ("B",)


def test_a_ttl_due_during_a_load_unloads_when_the_load_is_done() -> None:
    rig = Rig([spec("A", 8, ttl=5.0), spec("B", 8), spec("C", 8)], budgets={"gpu": 24})
    rig.load("A")
    rig.at(4.0)
    rig.admit("B")
    rig.turn()
    rig.at(6.0)  # A is due, but B is being loaded: one at a time
    assert rig.swapper.last().shape == (None, "B", ())
    rig.swapper.last().succeed()
    rig.turn()
    assert rig.swapper.last().shape == ("A", "", None)


def test_unload_on_request_in_a_budget_group() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 8)], budgets={"gpu": 24})
    rig.load("A", "B")
    b = rig.admit("B")
    with pytest.raises(Busy, match="in flight"):
        rig.s.unload("B")
    assert rig.s.unload("C") is False
    assert rig.s.unload("A") is True
    assert rig.s.unload("A") is True  # already unloading
    with pytest.raises(Busy, match="swapping"):
        rig.s.unload("B")
    rig.swapper.last().succeed()
    assert rig.group().residents == ("B",) and rig.events[-1].reason == "requested"
    rig.s.release(b.ticket)


def test_a_lost_resident_leaves_the_others_loaded() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 8)], budgets={"gpu": 24})
    rig.load("A", "B")
    rig.s.lost("A", "A exited with status 139", 4.0)
    g = rig.group()
    assert g.residents == ("B",) and g.memory_used == 8
    rig.admit("A").failed_with(ModelUnavailable)
    assert not rig.admit("B").waiting
    rig.at(4.0)
    a = rig.admit("A")
    rig.turn()
    assert rig.swapper.last().shape == (None, "A", ())
    rig.swapper.last().succeed()
    assert not a.waiting
    rig.s.lost("C", "never loaded", 1.0)  # not resident: only marked down
    assert rig.group().residents == ("B", "A")


# --- load, drain, reconfigure --------------------------------------------------------------------


def test_load_on_request_fills_the_budget_one_model_after_the_other() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 8)], budgets={"gpu": 24})
    done: list[object] = []
    for name in "ABC":
        rig.s.load(name).addBoth(done.append)
    for name in "ABC":
        rig.turn()
        assert rig.swapper.last().shape == (None, name, ())
        rig.swapper.last().succeed()
    assert done == [None, None, None]
    assert rig.group().residents == ("A", "B", "C") and rig.group().memory_used == 24
    with pytest.raises(Busy, match="always_on"):
        Rig([spec("E", None, always_on=True)], budgets={"gpu": 24}).s.load("E")


def test_drain_starts_no_load_and_waits_for_residents_in_flight() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 8)], budgets={"gpu": 24}, ttl=1.0)
    rig.load("A", "B")
    a = rig.admit("A")
    c = rig.admit("C")
    fired: list[object] = []
    rig.s.drain().addBoth(fired.append)
    c.failed_with(Draining)
    rig.at(10.0)
    assert len(rig.swapper.calls) == 2 and fired == []  # no load, no TTL unload
    rig.s.release(a.ticket)
    assert fired == [None]


def test_a_shrunk_budget_evicts_nothing_by_force_and_loads_only_when_it_fits() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 4)], budgets={"gpu": 24})
    rig.load("A", "B")
    a, b = rig.admit("A"), rig.admit("B")
    models = [spec("A", 8), spec("B", 8), spec("C", 4)]
    rig.s.reconfigure(models, max_wait=120.0, max_queue=256, budgets={"gpu": 12})
    g = rig.group()
    assert (g.residents, g.memory_budget, g.memory_used) == (("A", "B"), 12, 16)
    c = rig.admit("C")  # 4 free before, -4 now: needs one of them gone
    rig.at(5.0)
    assert len(rig.swapper.calls) == 2 and c.waiting
    rig.s.release(b.ticket)
    rig.turn()
    assert rig.swapper.last().shape == ("B", "C", ("B",))
    rig.swapper.last().succeed()
    rig.s.reconfigure(models, max_wait=120.0, max_queue=256, budgets={"gpu": 24})
    b2 = rig.admit("B")  # 12 used, 12 free: fits again
    rig.turn()
    assert rig.swapper.last().shape == (None, "B", ())
    rig.swapper.last().succeed()
    for r in (a, c, b2):
        rig.s.release(r.ticket)


def test_a_budget_given_to_a_one_model_group_keeps_its_resident_and_can_be_taken_away() -> None:
    models = [spec("A", 8), spec("B", 8)]
    rig = Rig(models, budgets={}, initial={"gpu": "A"})
    assert rig.group().memory_budget is None and rig.group().residents == ("A",)
    rig.s.reconfigure(models, max_wait=120.0, max_queue=256, budgets={"gpu": 24})
    assert rig.group().residents == ("A",) and rig.group().memory_used == 8
    b = rig.admit("B")
    rig.turn()
    assert rig.swapper.shapes == [(None, "B", ())]  # beside A
    rig.swapper.last().succeed()
    rig.s.reconfigure(models, max_wait=120.0, max_queue=256, budgets={})
    g = rig.group()
    assert g.memory_budget is None and g.memory_used is None
    assert g.residents == ("A", "B")  # counted until B is idle; the slot is unknown then
    assert rig.model("A").resident and rig.model("B").resident
    rig.s.release(b.ticket)
    assert rig.group().resident is None and rig.group().residents == ()
    a = rig.admit("A")
    rig.turn()
    assert rig.swapper.last().shape == (None, "A", None)  # one model at a time again: no evict
    rig.swapper.last().succeed()
    assert not a.waiting


def test_taking_the_budget_away_from_a_group_with_one_resident_keeps_it_resident() -> None:
    models = [spec("A", 8), spec("B", 8)]
    rig = Rig(models, budgets={"gpu": 24})
    rig.load("A")
    rig.s.reconfigure(models, max_wait=120.0, max_queue=256, budgets={})
    assert rig.group().resident == "A" and rig.group().residents == ("A",)
    rig.admit("B")
    rig.turn()
    assert rig.swapper.last().shape == ("A", "B", None)


def test_a_removed_resident_stays_counted_until_its_requests_end() -> None:
    rig = Rig([spec("A", 12), spec("B", 12), spec("C", 12)], budgets={"gpu": 24})
    rig.load("A", "B")
    a = rig.admit("A")
    rig.use("B")
    rig.s.reconfigure([spec("B", 12), spec("C", 12)], max_wait=120.0, max_queue=256,
                      budgets={"gpu": 24})
    c = rig.admit("C")
    rig.turn()
    assert rig.swapper.last().shape == ("B", "C", ("B",))  # A still runs: B goes
    rig.swapper.last().succeed()
    assert rig.group().residents == ("A", "C")
    rig.s.release(a.ticket)
    assert rig.group().residents == ("C",)
    assert "A" not in [m.name for m in rig.s.snapshot().models]
    rig.s.release(c.ticket)


def test_a_model_bigger_than_its_budget_is_refused_rather_than_waiting_forever() -> None:
    rig = Rig([spec("A", 8), spec("B", 32)], budgets={"gpu": 24})
    b = rig.admit("B")
    err = b.failed_with(ModelUnavailable)
    assert "32 MiB" in str(err)
    assert rig.swapper.calls == []


# --- snapshot, call shapes ----------------------------------------------------------------------


def test_snapshot_of_a_load_in_progress_and_of_a_group_without_budget() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("C", 16), spec("X", None, group="solo"),
               spec("Y", None, group="solo")],
              budgets={"gpu": 24}, initial={"solo": "X"})
    rig.load("A", "B")
    rig.at(1.0)
    rig.use("A")
    rig.at(2.0)
    rig.admit("C")
    rig.turn()
    snap = rig.s.snapshot()
    gpu, solo = snap.groups
    assert gpu == GroupState(name="gpu", resident="A", loaded_at=0.0, swapping_to="C",
                             swap_started_at=2.0, swap_mean=0.0, residents=("A",),
                             memory_budget=24,
                             memory_used=8, evicting=("B",))
    assert solo == GroupState(name="solo", resident="X", loaded_at=None, residents=("X",))
    assert [m.name for m in snap.models if m.resident] == ["A", "X"]
    assert "gpu=A->C" in repr(rig.s)


def test_a_group_without_budget_is_called_without_evict_beside_a_budget_group() -> None:
    rig = Rig([spec("A", 8), spec("B", 8), spec("X", None, group="solo"),
               spec("Y", None, group="solo")], budgets={"gpu": 24}, initial={"solo": "X"})
    rig.admit("Y")
    rig.admit("A")
    rig.turn()
    assert sorted((c.group, c.previous, c.target, c.evict) for c in rig.swapper.calls) == [
        ("gpu", None, "A", ()), ("solo", "X", "Y", None)]


# --- the choice, pure ----------------------------------------------------------------------------


def resident(name: str, memory: int, last_used: Optional[float]) -> Model:
    m = Model(spec(name, memory), lambda w: None)
    m.last_used = last_used
    return m


def names(chosen: Optional[tuple[Model, ...]]) -> Optional[list[str]]:
    return None if chosen is None else [m.name for m in chosen]


def test_choose_eviction_prefers_fewest_then_least_recently_used_then_least_memory() -> None:
    a, b, c = resident("a", 4, 1.0), resident("b", 6, 2.0), resident("c", 12, 3.0)
    assert names(choose_eviction(10, [a, b, c], budget=24)) == ["c"]  # one beats two
    assert names(choose_eviction(4, [a, b, c], budget=24)) == ["a"]  # least recently used
    assert names(choose_eviction(23, [a, b, c], budget=24)) is None  # all of them free 22
    x, y, z = resident("x", 10, None), resident("y", 8, None), resident("z", 8, 5.0)
    assert names(choose_eviction(8, [x, y, z], budget=24)) == ["y"]  # same age: less memory
    # Two needed: the pair whose most recent member is oldest, LRU order inside.
    p, q, r, s = (resident(n, 6, t) for n, t in (("p", 4.0), ("q", 1.0), ("r", 2.0), ("s", 3.0)))
    assert names(choose_eviction(12, [q, r, s, p], budget=24)) == ["q", "r"]


def test_choose_eviction_stops_a_model_with_held_waiters_only_when_it_must() -> None:
    a, b, c = resident("a", 12, 1.0), resident("b", 6, 2.0), resident("c", 6, 3.0)
    assert names(choose_eviction(12, [a, b, c], budget=24, held=[a])) == ["b", "c"]
    assert names(choose_eviction(13, [a, b, c], budget=24, held=[a])) == ["a", "b"]


def test_a_model_without_stated_memory_takes_the_whole_budget() -> None:
    m = Model(spec("m", None), lambda w: None)
    assert names(choose_eviction(24, [m], budget=24)) == ["m"]
    assert names(choose_eviction(25, [m], budget=24)) is None


# --- what a swap reports as evicted -------------------------------------------------------------


def _two_to_evict() -> Rig:
    """Budget 24: A 6 (used at 3), B 6 (at 1), C 6 (at 2); D (16) evicts B and C, in that order."""
    rig = Rig([spec("A", 6), spec("B", 6), spec("C", 6), spec("D", 16)], budgets={"gpu": 24},
              retry_backoff=5.0)
    rig.load("A", "B", "C")
    for t, name in ((1.0, "B"), (2.0, "C"), (3.0, "A")):
        rig.at(t)
        rig.use(name)
    rig.admit("D")
    rig.turn()
    assert rig.swapper.last().shape == ("B", "D", ("B", "C"))
    return rig


def test_a_load_that_evicts_two_residents_reports_both_evicted() -> None:
    rig = _two_to_evict()
    assert [e.evicted for e in rig.events] == [(), (), ()]  # loads beside: nothing evicted
    rig.at(5.0)
    rig.swapper.last().succeed()
    e = rig.events[-1]
    assert (e.kind, e.from_model, e.to_model, e.result, e.evicted) == (
        "swap", "B", "D", "ok", ("B", "C"))
    assert rig.group().residents == ("A", "D")


def test_a_failed_load_that_evicted_two_residents_reports_both_evicted() -> None:
    rig = _two_to_evict()
    rig.swapper.last().fail(SwapError("failed", "out of memory"))
    e = rig.events[-1]
    assert (e.from_model, e.to_model, e.result, e.evicted) == ("B", "D", "failed", ("B", "C"))


def test_a_one_resident_group_reports_the_previous_model_as_evicted() -> None:
    rig = Rig([spec("A", None), spec("B", None)], budgets={})
    a = rig.admit("A")
    rig.turn()
    assert rig.swapper.last().shape == (None, "A", None)
    rig.swapper.last().succeed()
    rig.s.release(a.ticket)
    b = rig.admit("B")
    rig.turn()
    assert rig.swapper.last().shape == ("A", "B", None)
    rig.swapper.last().succeed()
    rig.s.release(b.ticket)
    a = rig.admit("A")
    rig.turn()
    rig.swapper.last().fail(SwapError("timeout", "too slow"))
    assert [(e.from_model, e.to_model, e.result, e.evicted) for e in rig.events] == [
        (None, "A", "ok", ()), ("A", "B", "ok", ("A",)), ("B", "A", "timeout", ("B",))]


def test_an_unload_reports_the_unloaded_model_as_evicted() -> None:
    rig = Rig([spec("A", 8), spec("B", 8)], budgets={"gpu": 24})
    rig.load("A", "B")
    assert rig.s.unload("A") is True
    rig.swapper.last().succeed()
    assert rig.s.unload("B") is True
    rig.swapper.last().fail(SwapError("failed", "kill failed"))
    assert [(e.kind, e.from_model, e.result, e.evicted) for e in rig.events][-2:] == [
        ("unload", "A", "ok", ("A",)), ("unload", "B", "failed", ("B",))]


def test_status_recent_swaps_list_every_evicted_model() -> None:
    rig = _two_to_evict()
    rig.swapper.last().succeed()
    snap = SchedulerSnapshot(at=0.0, models=(), groups=())
    t = Telemetry(Clock(), (), version="x", snapshot=lambda: snap, health=lambda: {})
    for e in rig.events:
        t.swap_finished(e)
    status = t.status()
    swaps: Any = status["recentSwaps"]
    assert [(s["from"], s["to"], s["evicted"]) for s in swaps] == [
        ("B", "D", ["B", "C"]), (None, "C", []), (None, "B", []), (None, "A", [])]
    last: Any = status["lastSwap"]
    assert last["evicted"] == ["B", "C"]
