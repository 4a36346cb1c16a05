"""
The scheduler's policy, driven by hand: a ``Clock`` for time and a fake
swapper whose swaps the test completes (or fails) explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from jano.records import ModelSpec, SwapEvent
from jano.scheduler import (
    DEFAULT_RETRY_AFTER,
    Draining,
    ModelUnavailable,
    QueueFull,
    Scheduler,
    Ticket,
)


def spec(name: str, group: str = "gpu", conc: int = 4, always_on: bool = False) -> ModelSpec:
    return ModelSpec(name, f"http://127.0.0.1:1/{name}", max_concurrency=conc, group=group,
                     always_on=always_on)


class SwapFailure(Exception):
    """What the real swapper raises: a result and a one-line cause."""

    def __init__(self, result: str, cause: str) -> None:
        super().__init__(cause)
        self.result = result
        self.cause = cause


@dataclass
class SwapCall:
    group: str
    previous: Optional[str]
    target: str
    d: Deferred[Any] = field(default_factory=Deferred)
    #: The ``evict`` names, ``None`` when the scheduler passed none (a group without a budget).
    evict: Optional[tuple[str, ...]] = None

    def succeed(self) -> None:
        self.d.callback(None)

    def fail(self, exc: Exception) -> None:
        self.d.errback(Failure(exc))


#: ``evict``'s default, told apart from an empty tuple passed on purpose.
NOT_GIVEN: Sequence[ModelSpec] = []


class FakeSwapper:
    """Records every swap; the test fires each one by hand."""

    def __init__(self) -> None:
        self.calls: list[SwapCall] = []

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = NOT_GIVEN) -> Deferred[Any]:
        call = SwapCall(group, previous.name if previous else None, target.name,
                        evict=None if evict is NOT_GIVEN else tuple(m.name for m in evict))
        self.calls.append(call)
        return call.d

    def unload(self, group: str, model: ModelSpec) -> Deferred[Any]:
        call = SwapCall(group, model.name, "")  # an unload: no target
        self.calls.append(call)
        return call.d

    @property
    def pending(self) -> list[SwapCall]:
        return [c for c in self.calls if not c.d.called]

    def last(self) -> SwapCall:
        return self.calls[-1]


class Result:
    """What an admit Deferred did: a Ticket, a Failure, or nothing yet."""

    def __init__(self, d: Deferred[Ticket]) -> None:
        self.d = d
        self.value: Any = None
        self.fired = 0

        def got(v: Any) -> None:
            self.fired += 1
            self.value = v

        d.addBoth(got)

    @property
    def ticket(self) -> Ticket:
        assert self.fired == 1, "not dispatched"
        assert isinstance(self.value, Ticket), self.value
        return self.value

    @property
    def waiting(self) -> bool:
        return self.fired == 0

    def failed_with(self, kind: type[BaseException]) -> BaseException:
        assert self.fired == 1 and isinstance(self.value, Failure), self.value
        assert self.value.check(kind), self.value
        exc = self.value.value
        assert exc is not None
        return exc


class Rig:
    def __init__(self, models: Sequence[ModelSpec], *, initial: Optional[Mapping[str, str]] = None,
                 **kw: Any) -> None:
        self.clock = Clock()
        self.swapper = FakeSwapper()
        self.events: list[SwapEvent] = []
        self.s = Scheduler(models, self.swapper, self.clock, initial=initial,
                           on_swap=self.events.append, **kw)

    def admit(self, model: str) -> Result:
        return Result(self.s.admit(model))

    def at(self, t: float) -> None:
        self.clock.advance(t - self.clock.seconds())

    def turn(self) -> None:
        """Let one reactor turn pass (a decided swap starts then)."""
        self.clock.advance(0)

    def state(self, name: str) -> Any:
        return next(m for m in self.s.snapshot().models if m.name == name)

    def group(self, name: str = "gpu") -> Any:
        return next(g for g in self.s.snapshot().groups if g.name == name)


# --- collation ---------------------------------------------------------------------------------


def test_interleaved_burst_with_b_resident_costs_one_swap() -> None:
    rig = Rig([spec("A", conc=1), spec("B", conc=1)], initial={"gpu": "B"})
    order = ["A", "B", "A", "B", "A", "B"]
    results = [(name, rig.admit(name)) for name in order]  # one burst, B idle
    rig.turn()
    a = [r for n, r in results if n == "A"]
    b = [r for n, r in results if n == "B"]
    served: list[str] = []
    # B is resident: its three requests go first, one at a time, ahead of older A requests.
    for i, r in enumerate(b):
        assert not r.waiting and r.ticket.model == "B"
        assert all(x.waiting for x in b[i + 1:])
        assert all(x.waiting for x in a)
        assert rig.swapper.calls == []  # never evicts B while it has a request in flight
        rig.at(rig.clock.seconds() + 1)
        served.append("B")
        rig.s.release(r.ticket)
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("B", "A")]
    assert rig.group().swapping_to == "A"
    rig.at(10)
    rig.swapper.last().succeed()
    for r in a:
        assert not r.waiting
        rig.s.release(r.ticket)
    assert len(rig.swapper.calls) == 1
    assert [e.result for e in rig.events] == ["ok"]
    assert [b_.ticket.waited_for_swap for b_ in b] == [False, False, False]
    assert [a_.ticket.waited_for_swap for a_ in a] == [True, True, True]
    assert a[0].ticket.queue_wait == 10.0
    assert b[0].ticket.queue_wait == 0.0
    g = rig.group()
    assert g.resident == "A" and g.loaded_at == 10 and g.swapping_to is None


def test_burst_arriving_while_b_serves_costs_one_swap() -> None:
    rig = Rig([spec("A", conc=2), spec("B", conc=2)], initial={"gpu": "B"})
    first = rig.admit("B")
    got = []
    for i, name in enumerate("ABABAB"):
        rig.at(0.1 * (i + 1))  # spread over several turns this time
        got.append((name, rig.admit(name)))
    assert rig.swapper.calls == []
    rig.at(1)
    rig.s.release(first.ticket)
    for name, r in got:
        if name == "B":
            rig.s.release(r.ticket)
    rig.turn()
    rig.swapper.last().succeed()
    for name, r in got:
        if name == "A":
            rig.s.release(r.ticket)
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("B", "A")]


def test_a_swap_decided_and_undone_within_one_turn_is_not_started() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "B"})
    a = rig.admit("A")  # B idle: a swap is decided...
    a.d.cancel()  # ...and its only waiter goes away in the same turn
    rig.turn()
    assert rig.swapper.calls == [] and rig.clock.getDelayedCalls() == []


@pytest.mark.parametrize("spacing", [0.0, 0.001, 0.005, 0.01, 0.02, 0.05])
def test_a_jittered_burst_costs_one_swap_with_the_collation_window(spacing: float) -> None:
    # alpha resident and idle; beta alpha beta alpha ... arriving `spacing` apart;
    # each request is answered 5 ms after dispatch, a swap takes 0.5 s.
    rig = Rig([spec("alpha"), spec("beta")], initial={"gpu": "alpha"}, collate=0.25)
    arrivals = [(round(i * spacing, 6), name) for i, name in enumerate(["beta", "alpha"] * 4)]
    results: list[tuple[str, Result]] = []
    released: set[int] = set()
    step = 0.001
    for tick in range(5000):
        now = round(tick * step, 6)
        rig.at(now)
        for at, name in arrivals:
            if at == now:
                results.append((name, rig.admit(name)))
        for _, r in results:
            if (id(r) not in released and not r.waiting
                    and now >= r.ticket.dispatched_at + 0.005):  # type: ignore[operator]
                released.add(id(r))
                rig.s.release(r.ticket)
        for c in rig.swapper.pending:
            started = rig.group().swap_started_at
            if started is not None and now >= started + 0.5:
                c.succeed()
        if len(released) == len(arrivals):
            break
    assert len(released) == len(arrivals)
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("alpha", "beta")]
    assert not any(r.ticket.waited_for_swap for n, r in results if n == "alpha")


def test_without_a_window_the_same_jittered_burst_costs_two_swaps() -> None:
    rig = Rig([spec("alpha"), spec("beta")], initial={"gpu": "alpha"}, collate=0.0)
    b1 = rig.admit("beta")
    rig.at(0.01)  # the lone beta's swap was decided and started a turn later
    a1 = rig.admit("alpha")
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("alpha", "beta")]
    rig.swapper.last().succeed()
    rig.s.release(b1.ticket)
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("alpha", "beta"),
                                                                   ("beta", "alpha")]
    rig.swapper.last().succeed()
    rig.s.release(a1.ticket)


def test_the_window_holds_a_swap_away_from_an_idle_resident_and_never_delays_the_resident() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, collate=0.3)
    b = rig.admit("B")
    rig.turn()
    assert rig.swapper.calls == []  # held: A may still be asked for
    rig.at(0.2)
    a = rig.admit("A")
    assert not a.waiting and a.ticket.queue_wait == 0.0  # the resident is served at once
    rig.at(2.0)  # A busy: no swap, however long
    assert rig.swapper.calls == []
    rig.s.release(a.ticket)
    rig.at(2.29)  # a new window from the moment A went idle
    assert rig.swapper.calls == []
    rig.at(2.3)
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("A", "B")]
    rig.swapper.last().succeed()
    assert not b.waiting and b.ticket.waited_for_swap


def test_the_window_never_stretches_the_starvation_bound() -> None:
    rig = Rig([spec("A", conc=1), spec("B")], initial={"gpu": "A"}, collate=5.0, max_wait=2.0)
    b = rig.admit("B")
    rig.at(1.0)
    assert rig.swapper.calls == []
    rig.at(2.0)  # B has waited max_wait: the hold ends there, not at 5 s
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("A", "B")]
    rig.swapper.last().succeed()
    assert not b.waiting


def test_an_empty_or_unknown_slot_is_filled_without_a_window() -> None:
    rig = Rig([spec("A"), spec("B")], collate=1.0)
    rig.admit("B")
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [(None, "B")]


def test_min_residency_keeps_a_freshly_loaded_model_through_an_idle_gap() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, collate=0.0, min_residency=10.0)
    b1 = rig.admit("B")
    rig.turn()
    rig.at(1.0)
    rig.swapper.last().succeed()  # B loaded at t=1
    rig.s.release(b1.ticket)
    a = rig.admit("A")  # B idle, A waits: B was loaded 0 s ago
    rig.at(5.0)
    b2 = rig.admit("B")  # the conversation goes on: served at once
    assert not b2.waiting and len(rig.swapper.calls) == 1
    rig.s.release(b2.ticket)
    rig.at(10.99)
    assert len(rig.swapper.calls) == 1
    rig.at(11.0)  # 10 s after B was loaded
    assert [(c.previous, c.target) for c in rig.swapper.calls][-1] == ("B", "A")
    rig.swapper.last().succeed()
    assert not a.waiting


def test_reconfigure_changes_the_window() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, collate=0.0)
    rig.s.reconfigure([spec("A"), spec("B")], max_wait=120.0, max_queue=256, collate=1.0,
                      min_residency=3.0)
    assert (rig.s.collate, rig.s.min_residency) == (1.0, 3.0)
    rig.admit("B")
    rig.turn()
    assert rig.swapper.calls == []
    rig.at(1.0)
    assert len(rig.swapper.calls) == 1


def test_unknown_slot_first_request_swaps_from_none() -> None:
    rig = Rig([spec("A"), spec("B")])
    assert rig.group().resident is None
    r = rig.admit("B")
    assert r.waiting and rig.swapper.calls == []
    rig.turn()
    assert [(c.group, c.previous, c.target) for c in rig.swapper.calls] == [("gpu", None, "B")]
    assert rig.group().swapping_to == "B" and rig.group().swap_started_at == 0
    rig.at(3)
    rig.swapper.last().succeed()
    assert r.ticket.waited_for_swap and r.ticket.dispatched_at == 3
    assert rig.events == [SwapEvent("gpu", None, "B", 0.0, 3.0, "ok")]


def test_idle_resident_swaps_to_the_longest_waiting_model() -> None:
    rig = Rig([spec("A"), spec("B"), spec("C")], initial={"gpu": "A"})
    a = rig.admit("A")
    rig.at(1)
    c = rig.admit("C")
    rig.at(2)
    b = rig.admit("B")
    rig.at(3)
    rig.s.release(a.ticket)
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "C")]
    rig.swapper.last().succeed()
    rig.s.release(c.ticket)
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "C"), ("C", "B")]
    rig.swapper.last().succeed()
    assert b.ticket.model == "B"


def test_resident_keeps_the_slot_while_it_has_requests_in_flight() -> None:
    rig = Rig([spec("A", conc=2), spec("B")], initial={"gpu": "A"}, max_wait=100)
    a1 = rig.admit("A")
    rig.at(1)
    b = rig.admit("B")
    rig.at(2)
    a2 = rig.admit("A")  # newer than B, still dispatched: collation
    assert not a2.waiting and b.waiting and rig.swapper.calls == []
    rig.s.release(a1.ticket)
    rig.turn()
    assert rig.swapper.calls == []
    rig.s.release(a2.ticket)
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "B")]


# --- starvation guard ---------------------------------------------------------------------------


def test_starvation_guard_engages_at_max_wait_exactly_and_waits_for_in_flight() -> None:
    rig = Rig([spec("A", conc=2), spec("B")], initial={"gpu": "A"}, max_wait=10)
    a1 = rig.admit("A")
    rig.at(1)
    b1 = rig.admit("B")
    # One timer, due exactly when B1 has waited max_wait: no polling.
    assert [c.getTime() for c in rig.clock.getDelayedCalls()] == [11.0]
    rig.at(10.999)
    a2 = rig.admit("A")
    assert not a2.waiting  # just before the guard: collation goes on
    rig.at(11.0)
    assert rig.clock.getDelayedCalls() == []
    a3 = rig.admit("A")
    assert a3.waiting  # exactly at max_wait: A takes nothing newer than B1
    rig.at(12)
    rig.s.release(a1.ticket)
    rig.turn()
    assert a3.waiting and rig.swapper.calls == []  # A2 still in flight: never evict
    rig.at(13)
    rig.s.release(a2.ticket)
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "B")]
    assert rig.events == []
    rig.at(15)
    rig.swapper.last().succeed()
    assert b1.ticket.queue_wait == 14.0 and b1.ticket.waited_for_swap
    rig.at(16)
    rig.s.release(b1.ticket)
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "B"), ("B", "A")]
    rig.at(18)
    rig.swapper.last().succeed()
    assert a3.ticket.waited_for_swap and a3.ticket.dispatched_at == 18


def test_guard_lets_a_swapped_in_model_serve_its_backlog() -> None:
    """After a long swap both models are overdue; the new resident still serves what it came for."""
    rig = Rig([spec("A", conc=4), spec("B", conc=4)], initial={"gpu": "A"}, max_wait=5)
    a1 = rig.admit("A")
    b = [rig.admit("B") for _ in range(3)]
    rig.at(6)  # guard engaged for B
    a_late = [rig.admit("A") for _ in range(2)]
    assert all(r.waiting for r in a_late)
    rig.s.release(a1.ticket)
    rig.at(30)  # the swap took 24 s: A's waiters are overdue too
    rig.swapper.last().succeed()
    assert all(not r.waiting for r in b)  # B's backlog goes despite A being overdue
    b_new = rig.admit("B")
    assert b_new.waiting  # but nothing newer than A's overdue requests
    for r in b:
        rig.s.release(r.ticket)
    rig.turn()
    assert rig.swapper.last().target == "A"


def test_guard_timer_is_rescheduled_and_cancelled() -> None:
    rig = Rig([spec("A"), spec("B"), spec("C")], initial={"gpu": "A"}, max_wait=10)
    a = rig.admit("A")
    rig.at(1)
    b = rig.admit("B")
    rig.at(2)
    rig.admit("C")
    assert [c.getTime() for c in rig.clock.getDelayedCalls()] == [11.0]
    b.d.cancel()  # C is now the oldest: the timer moves
    assert [c.getTime() for c in rig.clock.getDelayedCalls()] == [12.0]
    rig.s.release(a.ticket)  # A idle: swap to C now, no guard timer needed
    rig.turn()
    assert rig.clock.getDelayedCalls() == []
    assert rig.swapper.last().target == "C"


# --- cancellation ---------------------------------------------------------------------------------


def test_cancel_while_queued_removes_the_waiter_and_prevents_the_swap() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    a = rig.admit("A")
    b1 = rig.admit("B")
    b2 = rig.admit("B")
    assert rig.state("B").queued == 2
    b1.d.cancel()
    b1.failed_with(CancelledError)
    st = rig.state("B")
    assert st.queued == 1 and st.oldest_queued_at == 0
    b2.d.cancel()
    assert rig.state("B").queued == 0 and rig.state("B").oldest_queued_at is None
    rig.s.release(a.ticket)
    rig.turn()
    assert rig.swapper.calls == []  # nobody waits for B any more: no swap


def test_cancel_during_swap_leaves_the_swap_running_and_moves_on() -> None:
    rig = Rig([spec("A"), spec("B"), spec("C")], initial={"gpu": "A"})
    b = rig.admit("B")
    c = rig.admit("C")
    rig.turn()
    assert rig.swapper.last().target == "B"
    b.d.cancel()
    rig.swapper.last().succeed()  # loaded for nobody: straight on to C
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "B"), ("B", "C")]
    rig.swapper.last().succeed()
    assert c.ticket.model == "C"


def test_cancelled_waiters_are_not_counted_and_the_queue_stays_compact() -> None:
    rig = Rig([spec("A", conc=1), spec("B")], initial={"gpu": "A"}, max_queue=3)
    a = rig.admit("A")
    keep = rig.admit("B")
    for _ in range(1000):
        rig.admit("B").d.cancel()
    assert rig.state("B").queued == 1
    queue = rig.s._models["B"].queue
    assert len(queue) <= 2 * 1 + 17
    rig.admit("B")
    rig.admit("B")
    rig.admit("B").failed_with(QueueFull)
    rig.s.release(a.ticket)
    rig.turn()
    rig.swapper.last().succeed()
    assert keep.ticket.model == "B"


def test_a_callback_may_cancel_a_waiter_dispatched_in_the_same_turn() -> None:
    rig = Rig([spec("A"), spec("B", conc=2)], initial={"gpu": "A"})
    b1 = rig.admit("B")
    b2 = rig.admit("B")
    b1.d.addCallback(lambda t: b2.d.cancel())
    rig.turn()
    rig.swapper.last().succeed()
    assert isinstance(b1.ticket, Ticket)
    b2.failed_with(CancelledError)
    assert rig.state("B").in_flight == 1


def test_a_callback_may_release_at_once() -> None:
    rig = Rig([spec("A", conc=1), spec("B")], initial={"gpu": "A"})
    got: list[Ticket] = []

    def gone(t: Ticket) -> None:
        got.append(t)
        rig.s.release(t)  # the client had already disconnected

    for _ in range(3):
        rig.s.admit("A").addCallback(gone)
    assert len(got) == 3 and rig.state("A").in_flight == 0


def test_a_swapper_that_answers_synchronously() -> None:
    clock = Clock()

    class Instant:
        def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
                 evict: Sequence[ModelSpec] = ()) -> Deferred[None]:
            return succeed(None)

        def unload(self, group: str, model: ModelSpec) -> Deferred[None]:
            return succeed(None)

    s = Scheduler([spec("A"), spec("B")], Instant(), clock)
    r = Result(s.admit("B"))
    clock.advance(0)
    assert r.ticket.waited_for_swap
    s.release(r.ticket)
    r2 = Result(s.admit("A"))
    clock.advance(0)
    assert r2.ticket.model == "A"


# --- failures -----------------------------------------------------------------------------------


def test_failed_swap_fails_waiters_fast_marks_down_and_others_go_on() -> None:
    rig = Rig([spec("A"), spec("B"), spec("C")], initial={"gpu": "A"}, retry_backoff=30)
    b1 = rig.admit("B")
    rig.turn()
    rig.at(1)
    c = rig.admit("C")
    b2 = rig.admit("B")
    rig.at(4)
    rig.swapper.last().fail(SwapFailure("timeout", "swap script timed out after 3s (killed)"))
    for r in (b1, b2):
        err = r.failed_with(ModelUnavailable)
        assert isinstance(err, ModelUnavailable)
        assert err.cause == "swap script timed out after 3s (killed)" and err.retry_after == 30
        assert err.model == "B"
    assert rig.events == [SwapEvent("gpu", "A", "B", 0.0, 4.0, "timeout",
                                    "swap script timed out after 3s (killed)", evicted=("A",))]
    st = rig.state("B")
    assert st.down_until == 34 and st.down_reason == "swap script timed out after 3s (killed)"
    # The slot is unknown now; the group is not wedged: C is next, from an unknown slot.
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [("A", "B"), (None, "C")]
    assert rig.group().resident is None and rig.group().swapping_to == "C"
    rig.at(10)
    fast = rig.admit("B")
    err = fast.failed_with(ModelUnavailable)
    assert isinstance(err, ModelUnavailable) and err.retry_after == 24
    rig.swapper.last().succeed()
    rig.s.release(c.ticket)
    rig.at(34)  # the backoff is over: the next request retries the swap
    assert rig.state("B").down_until is None
    b3 = rig.admit("B")
    rig.turn()
    assert [(x.previous, x.target) for x in rig.swapper.calls][-1] == ("C", "B")
    rig.swapper.last().succeed()
    assert b3.ticket.model == "B"
    assert [e.result for e in rig.events] == ["timeout", "ok", "ok"]


def test_any_exception_counts_as_failed_with_its_text() -> None:
    rig = Rig([spec("A"), spec("B")])
    r = rig.admit("B")
    rig.turn()
    rig.swapper.last().fail(ValueError("boom"))
    err = r.failed_with(ModelUnavailable)
    assert isinstance(err, ModelUnavailable) and err.cause == "boom"
    assert rig.events[-1].result == "failed" and rig.events[-1].error == "boom"


def test_a_swapper_that_raises_is_a_failed_swap() -> None:
    clock = Clock()
    events: list[SwapEvent] = []

    class Broken:
        def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
                 evict: Sequence[ModelSpec] = ()) -> Deferred[None]:
            raise RuntimeError("no script")

        def unload(self, group: str, model: ModelSpec) -> Deferred[None]:
            raise RuntimeError("no script")

    s = Scheduler([spec("A")], Broken(), clock, on_swap=events.append)
    r = Result(s.admit("A"))
    clock.advance(0)
    err = r.failed_with(ModelUnavailable)
    assert isinstance(err, ModelUnavailable) and err.cause == "no script"
    assert [(e.result, e.error) for e in events] == [("failed", "no script")]


@pytest.mark.logs_errors
def test_an_on_swap_that_raises_does_not_wedge_the_scheduler(
        error_observer: list[dict[str, Any]]) -> None:
    clock = Clock()
    swapper = FakeSwapper()

    def bad(event: SwapEvent) -> None:
        raise RuntimeError("telemetry broke")

    s = Scheduler([spec("A")], swapper, clock, on_swap=bad)
    r = Result(s.admit("A"))
    clock.advance(0)
    swapper.last().succeed()
    assert r.ticket.model == "A"
    assert [e["log_format"] for e in error_observer] == ["on_swap failed for {group}"]


# --- always_on, groups --------------------------------------------------------------------------


def test_always_on_models_bypass_swaps_and_are_bounded_by_concurrency_and_queue() -> None:
    rig = Rig([spec("A"), spec("B"), spec("E", conc=2, always_on=True)], max_queue=1)
    rig.admit("B")  # a swap runs in the group...
    rig.turn()
    assert rig.group().swapping_to == "B"
    e = [rig.admit("E") for _ in range(3)]  # ...and E does not care
    assert not e[0].waiting and not e[1].waiting and e[2].waiting
    assert not e[0].ticket.waited_for_swap
    rig.admit("E").failed_with(QueueFull)
    rig.s.release(e[0].ticket)
    assert not e[2].waiting
    assert len(rig.swapper.calls) == 1
    st = rig.state("E")
    assert st.resident and st.always_on and st.in_flight == 2
    assert [g.name for g in rig.s.snapshot().groups] == ["gpu"]


def test_two_groups_swap_independently_and_concurrently() -> None:
    rig = Rig([spec("A", "gpu0"), spec("B", "gpu0"), spec("C", "gpu1"), spec("D", "gpu1")])
    a = rig.admit("A")
    c = rig.admit("C")
    rig.turn()
    assert [(x.group, x.target) for x in rig.swapper.pending] == [("gpu0", "A"), ("gpu1", "C")]
    rig.at(2)
    rig.swapper.calls[1].succeed()  # gpu1 first
    assert c.ticket.dispatched_at == 2 and a.waiting
    b = rig.admit("B")  # gpu0 is still swapping: no second swap in that group
    rig.turn()
    assert len(rig.swapper.pending) == 1
    rig.at(5)
    rig.swapper.calls[0].succeed()
    assert a.ticket.dispatched_at == 5 and b.waiting
    rig.s.release(a.ticket)
    rig.turn()
    assert rig.swapper.last().group == "gpu0" and rig.swapper.last().target == "B"
    assert rig.group("gpu1").resident == "C"


# --- admission limits ---------------------------------------------------------------------------


def test_max_queue_gives_queue_full_with_a_retry_after_estimate() -> None:
    rig = Rig([spec("A", conc=2), spec("B", conc=2)], initial={"gpu": "A"}, max_queue=2)
    a = [rig.admit("A") for _ in range(4)]
    err = rig.admit("A").failed_with(QueueFull)
    assert isinstance(err, QueueFull) and err.retry_after == DEFAULT_RETRY_AFTER
    rig.at(8)
    rig.s.release(a[0].ticket)  # one observed service time: 8 s
    rig.s.release(a[1].ticket)
    more = [rig.admit("A"), rig.admit("A")]
    err = rig.admit("A").failed_with(QueueFull)
    # 2 queued x 8 s / 2 slots, resident: no swap term.
    assert isinstance(err, QueueFull) and err.retry_after == 8.0
    # A non-resident model adds the observed swap time (20 s here).
    rig.admit("B")
    for r in a[2:] + more:
        rig.s.release(r.ticket)
    rig.turn()
    rig.at(28)
    rig.swapper.last().succeed()  # A -> B took 20 s
    assert not rig.state("A").resident
    rig.admit("A")
    rig.admit("A")
    err = rig.admit("A").failed_with(QueueFull)
    assert isinstance(err, QueueFull)
    mean = rig.s._models["A"].service_mean
    assert mean is not None
    assert err.retry_after == pytest.approx(2 * mean / 2 + 20.0)


def test_retry_after_is_clamped() -> None:
    rig = Rig([spec("A", conc=1)], initial={"gpu": "A"}, max_queue=1)
    a = rig.admit("A")
    rig.at(0.01)
    rig.s.release(a.ticket)
    a = rig.admit("A")
    rig.admit("A")
    err = rig.admit("A").failed_with(QueueFull)
    assert isinstance(err, QueueFull) and err.retry_after == 1.0


def test_unknown_model_is_a_key_error() -> None:
    rig = Rig([spec("A")])
    with pytest.raises(KeyError):
        rig.s.admit("gpt-9")


def test_a_second_release_is_ignored() -> None:
    rig = Rig([spec("A", conc=1)], initial={"gpu": "A"})
    a1 = rig.admit("A")
    a2 = rig.admit("A")
    rig.s.release(a1.ticket)
    rig.s.release(a1.ticket)
    assert rig.state("A").in_flight == 1 and not a2.waiting


# --- drain --------------------------------------------------------------------------------------


def test_drain_refuses_waiters_and_fires_when_idle() -> None:
    rig = Rig([spec("A", "gpu0", conc=1), spec("B", "gpu1"), spec("C", "gpu1")],
              initial={"gpu0": "A"})
    a1 = rig.admit("A")
    a2 = rig.admit("A")
    c = rig.admit("C")  # a swap runs in gpu1
    rig.turn()
    d = rig.s.drain()
    fired: list[Any] = []
    d.addBoth(fired.append)
    a2.failed_with(Draining)
    c.failed_with(Draining)
    rig.admit("A").failed_with(Draining)
    assert rig.s.snapshot().draining
    rig.s.release(a1.ticket)
    assert fired == []  # the gpu1 swap still runs
    rig.swapper.last().succeed()
    assert fired == [None]
    assert len(rig.swapper.calls) == 1  # no new swap after drain
    rig.s.drain().addBoth(fired.append)  # already drained: fires at once
    assert fired == [None, None]


def test_drain_waits_for_in_flight_and_can_be_cancelled() -> None:
    rig = Rig([spec("A")], initial={"gpu": "A"})
    a = rig.admit("A")
    d = rig.s.drain()
    cancelled: list[Failure] = []
    d.addErrback(cancelled.append)
    d.cancel()
    assert len(cancelled) == 1 and cancelled[0].check(CancelledError)
    rig.s.release(a.ticket)  # the cancelled drain is forgotten, not fired twice
    got: list[Any] = []
    rig.s.drain().addBoth(got.append)
    assert got == [None]


# --- reconfigure --------------------------------------------------------------------------------


def test_reconfigure_removes_models_fails_their_waiters_and_frees_the_slot_after_in_flight() -> None:
    rig = Rig([spec("A", conc=1), spec("B"), spec("C")], initial={"gpu": "A"})
    a1 = rig.admit("A")
    a2 = rig.admit("A")
    b = rig.admit("B")
    rig.s.reconfigure([spec("B"), spec("C")], max_wait=120, max_queue=256)
    err = a2.failed_with(ModelUnavailable)
    assert isinstance(err, ModelUnavailable) and err.cause == "model removed from configuration"
    assert b.waiting and rig.swapper.calls == []  # A still runs a request: no eviction
    with pytest.raises(KeyError):
        rig.s.admit("A")
    st = rig.state("A")  # still shown while in flight
    assert st.in_flight == 1 and st.queued == 0 and st.resident
    assert rig.group().resident == "A"
    rig.s.release(a1.ticket)
    rig.turn()
    assert "A" not in [m.name for m in rig.s.snapshot().models]
    assert [(x.previous, x.target) for x in rig.swapper.calls] == [(None, "B")]


def test_reconfigure_keeps_queued_and_in_flight_requests_and_applies_changes() -> None:
    rig = Rig([spec("A", conc=1), spec("B")], initial={"gpu": "A"}, max_wait=100)
    a = [rig.admit("A") for _ in range(3)]
    assert [r.waiting for r in a] == [False, True, True]
    rig.s.reconfigure([spec("A", conc=3), spec("B"), spec("D", conc=1)], max_wait=50,
                      max_queue=1)
    assert [r.waiting for r in a] == [False, False, False]  # more slots: dispatched now
    d = rig.admit("D")
    assert d.waiting  # a new model in the group: waits for A to go idle
    rig.admit("D").failed_with(QueueFull)  # the new max_queue applies
    assert [c.getTime() for c in rig.clock.getDelayedCalls()] == [50.0]  # new max_wait
    for r in a:
        rig.s.release(r.ticket)
    rig.turn()
    assert rig.swapper.last().target == "D"


def test_reconfigure_moves_a_resident_to_another_group() -> None:
    rig = Rig([spec("A", "gpu0", conc=2), spec("B", "gpu0")], initial={"gpu0": "A"})
    a1 = rig.admit("A")
    b = rig.admit("B")
    rig.s.reconfigure([spec("A", "gpu1", conc=2), spec("B", "gpu0")], max_wait=120,
                      max_queue=256)
    # A still runs a request on gpu0's slot: B must wait for it.
    assert rig.group("gpu0").resident == "A" and rig.swapper.calls == []
    a2 = rig.admit("A")
    rig.turn()
    assert a2.waiting and rig.swapper.last().group == "gpu1"  # gpu1's slot is unknown
    rig.s.release(a1.ticket)
    rig.turn()
    assert [(x.group, x.previous, x.target) for x in rig.swapper.calls] == [
        ("gpu1", None, "A"), ("gpu0", None, "B")]
    assert b.waiting


def test_reconfigure_always_on_toggles() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    a = rig.admit("A")
    b = rig.admit("B")
    rig.s.reconfigure([spec("A"), spec("B", always_on=True)], max_wait=120, max_queue=256)
    assert b.ticket.model == "B" and rig.swapper.calls == []
    rig.s.reconfigure([spec("A", always_on=True), spec("B", always_on=True)], max_wait=120,
                      max_queue=256)
    assert rig.group().resident == "A"  # in flight: keeps the slot until released
    rig.s.release(a.ticket)
    assert rig.s.snapshot().groups == ()


def test_snapshot_fields() -> None:
    rig = Rig([spec("A", conc=1), spec("B"), spec("E", "emb", always_on=True)],
              initial={"gpu": "A"})
    rig.at(5)
    rig.admit("A")
    rig.at(6)
    rig.admit("A")
    rig.admit("B")
    snap = rig.s.snapshot()
    assert snap.at == 6 and not snap.draining
    a, b, e = snap.models
    assert (a.name, a.group, a.queued, a.in_flight, a.oldest_queued_at, a.resident) == (
        "A", "gpu", 1, 1, 6, True)
    assert (b.queued, b.in_flight, b.oldest_queued_at, b.resident) == (1, 0, 6, False)
    assert e.always_on and e.resident and e.group == "emb"
    (g,) = snap.groups
    assert (g.name, g.resident, g.loaded_at, g.swapping_to, g.swap_started_at) == (
        "gpu", "A", None, None, None)


# --- idle unload (TTL), manual load and unload ---------------------------------------------------


def test_an_idle_resident_is_unloaded_after_its_ttl_and_the_slot_is_empty() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, ttl=60.0)
    a = rig.admit("A")
    rig.at(10.0)
    rig.s.release(a.ticket)  # idle from t=10
    rig.at(69.9)
    assert rig.swapper.calls == []
    rig.at(70.0)
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("A", "")]
    assert rig.group().unloading == "A" and rig.group().resident == "A"
    rig.at(71.0)
    rig.swapper.last().succeed()
    g = rig.group()
    assert g.resident is None and g.unloading is None and g.loaded_at is None
    assert [(e.kind, e.from_model, e.to_model, e.result, e.reason, e.duration)
            for e in rig.events] == [("unload", "A", None, "ok", "idle", 1.0)]
    b = rig.admit("B")  # the empty slot is filled at once, from nothing
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls][-1] == (None, "B")
    rig.swapper.last().succeed()
    assert not b.waiting


def test_the_ttl_restarts_with_every_request_and_a_model_spec_overrides_it() -> None:
    a_spec = ModelSpec("A", "http://127.0.0.1:1/A", group="gpu", ttl=5.0)
    rig = Rig([a_spec, spec("B")], initial={"gpu": "A"}, ttl=60.0)
    r = rig.admit("A")
    rig.s.release(r.ticket)
    rig.at(4.0)
    r = rig.admit("A")  # busy again: the clock stops
    rig.at(8.0)
    rig.s.release(r.ticket)
    rig.at(12.9)
    assert rig.swapper.calls == []
    rig.at(13.0)  # 5 s of idleness, the model's own ttl
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("A", "")]


def test_a_request_arriving_during_an_unload_waits_and_loads_the_model_again() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, ttl=1.0)
    rig.at(1.0)
    assert rig.group().unloading == "A"
    a = rig.admit("A")
    assert a.waiting
    rig.swapper.last().succeed()  # unloaded; A waits, so it is loaded again
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("A", ""), (None, "A")]
    rig.swapper.last().succeed()
    assert not a.waiting and a.ticket.waited_for_swap


def test_a_failed_unload_leaves_the_slot_unknown_and_is_reported() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, ttl=1.0)
    rig.at(1.0)
    rig.swapper.last().fail(SwapFailure("failed", "exit status 2"))
    assert rig.group().resident is None
    assert [(e.kind, e.result, e.error) for e in rig.events] == [("unload", "failed", "exit status 2")]


def test_no_ttl_means_never_and_draining_unloads_nothing() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    rig.at(10_000.0)
    assert rig.swapper.calls == []
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, ttl=5.0)
    rig.s.drain()
    rig.at(10.0)
    assert rig.swapper.calls == []


def test_unload_on_request_refuses_work_in_flight_and_always_on_models() -> None:
    from jano.errors import Busy

    rig = Rig([spec("A"), spec("B"), spec("E", always_on=True)], initial={"gpu": "A"})
    a = rig.admit("A")
    with pytest.raises(Busy, match="in flight"):
        rig.s.unload("A")
    with pytest.raises(Busy, match="always_on"):
        rig.s.unload("E")
    assert rig.s.unload("B") is False  # not loaded: nothing to do
    with pytest.raises(KeyError):
        rig.s.unload("nope")
    rig.s.release(a.ticket)
    assert rig.s.unload("A") is True
    assert rig.s.unload("A") is True  # already unloading
    with pytest.raises(Busy, match="swapping"):
        rig.s.unload("B")
    rig.swapper.last().succeed()
    assert rig.events[-1].reason == "requested" and rig.group().resident is None


def test_load_on_request_is_queued_like_a_request_and_fires_when_resident() -> None:
    rig = Rig([spec("A"), spec("B"), spec("E", always_on=True)], initial={"gpu": "A"},
              collate=0.0)
    done: list[object] = []
    rig.s.load("B").addBoth(done.append)
    rig.turn()
    assert [(c.previous, c.target) for c in rig.swapper.calls] == [("A", "B")]
    assert done == []
    rig.swapper.last().succeed()
    assert done == [None]
    assert rig.group().resident == "B" and rig.state("B").in_flight == 0  # it holds no slot
    already: list[object] = []
    rig.s.load("B").addBoth(already.append)
    assert already == [None] and len(rig.swapper.calls) == 1
    from jano.errors import Busy

    with pytest.raises(Busy):
        rig.s.load("E")


# --- a managed server that crashed; what the swapper reports -----------------------------------


def test_a_lost_resident_is_refused_for_the_backoff_then_loaded_again() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    first = rig.admit("A")
    rig.turn()
    rig.s.release(first.ticket)
    rig.s.lost("A", "qwen exited with status 139", 4.0)
    assert rig.group().resident is None
    refused = rig.admit("A")
    err = refused.failed_with(ModelUnavailable)
    assert "status 139" in str(err)
    rig.at(4.0)
    waiting = rig.admit("A")
    rig.turn()
    assert waiting.waiting
    call = rig.swapper.last()
    assert (call.previous, call.target) == (None, "A")  # a fresh start, nothing to stop
    call.succeed()
    assert waiting.ticket.model == "A"


def test_losing_a_model_that_is_not_resident_only_marks_it_down() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    rig.s.lost("B", "gone", 2.0)
    assert rig.group().resident == "A"
    rig.admit("B").failed_with(ModelUnavailable)


def test_phases_reported_by_the_swapper_reach_the_swap_event() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    r = rig.admit("B")
    rig.turn()
    rig.at(3.0)
    rig.swapper.last().d.callback({"stop": 1.0, "start": 0.5, "ready": 1.5})
    assert r.ticket.model == "B"
    assert rig.events[-1].phases == (("stop", 1.0), ("start", 0.5), ("ready", 1.5))


def test_a_failed_swap_may_ask_for_a_longer_backoff_and_keeps_its_phases() -> None:
    from jano.errors import SwapError

    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"}, retry_backoff=5.0)
    r = rig.admit("B")
    rig.turn()
    rig.swapper.last().fail(SwapError("failed", "crashed again", retry_after=40.0,
                                      phases=(("stop", 0.2), ("start", 0.1))))
    err = r.failed_with(ModelUnavailable)
    assert "crashed again" in str(err)
    assert rig.events[-1].phases == (("stop", 0.2), ("start", 0.1))
    rig.at(39.0)
    rig.admit("B").failed_with(ModelUnavailable)
    rig.at(40.0)
    again = rig.admit("B")
    rig.turn()
    assert again.waiting and rig.swapper.last().target == "B"


def test_clear_down_admits_a_model_at_once_without_failing_anyone() -> None:
    rig = Rig([spec("A"), spec("B")], initial={"gpu": "A"})
    rig.s.mark_down("A", "starting", 60.0)
    rig.admit("A").failed_with(ModelUnavailable)
    rig.s.clear_down("A")
    assert rig.admit("A").ticket.model == "A"
    assert rig.state("A").down_until is None
    rig.s.clear_down("nobody")  # unknown: nothing happens
