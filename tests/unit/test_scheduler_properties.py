"""
Random arrival traces through the real :class:`jano.scheduler.Scheduler`.

A ``Clock`` drives everything: requests arrive at their trace times, a fake
service holds each dispatched request for its service time and then releases
it, and a fake swapper takes a drawn duration and sometimes fails.  The fake
swapper and service keep their own idea of which model is physically loaded,
so the checks do not trust the scheduler's bookkeeping.  They record
violations instead of raising: an exception inside ``swap()`` or a Deferred
callback would be taken by the scheduler (or the Deferred) and never reach
the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from jano.records import ModelSpec, SwapEvent
from jano.scheduler import ModelUnavailable, QueueFull, Replicas, Scheduler, Ticket

SETTINGS = settings(max_examples=250, deadline=None, database=None)
#: Groups with a memory budget: fewer examples, to keep the run short.
BUDGET_SETTINGS = settings(max_examples=120, deadline=None, database=None)
EPS = 1e-9
#: ``evict``'s default, told apart from an empty tuple passed on purpose.
NOT_GIVEN: Sequence[ModelSpec] = []


class SwapFailure(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.result = "failed"
        self.cause = cause


@dataclass
class Req:
    at: float
    model: str
    service: float
    cancel_after: Optional[float] = None
    # filled in by the run
    seq: int = -1
    outcomes: list[str] = field(default_factory=list)
    ticket: Optional[Ticket] = None
    d: Optional[Deferred[Ticket]] = None


@dataclass
class Setup:
    models: list[ModelSpec]
    initial: dict[str, str]
    max_wait: float
    max_queue: int
    reqs: list[Req]
    swap_durations: list[float]
    swap_failures: list[bool]
    #: The collation window and the minimum residency (seconds; 0: off).
    collate: float = 0.0
    min_residency: float = 0.0
    #: Group name to its memory budget (MiB); every model of such a group has ``memory``.
    budgets: dict[str, int] = field(default_factory=dict)
    #: Seconds idle before a resident is unloaded (0: never).
    ttl: float = 0.0

    def spec(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def group_of(self, name: str) -> Optional[str]:
        spec = next(m for m in self.models if m.name == name)
        return None if spec.always_on else spec.group

    def members(self, group: str) -> list[str]:
        return [m.name for m in self.models if not m.always_on and m.group == group]


class World:
    """The fake GPU(s), swap script and model servers around one Scheduler."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.clock = Clock()
        self.loaded: dict[str, Optional[str]] = {}  # group -> physically loaded model
        #: Groups with a budget: every physically loaded model.
        self.loaded_set: dict[str, set[str]] = {g: set() for g in setup.budgets}
        self.swapping: set[str] = set()
        self.in_flight: dict[str, int] = {m.name: 0 for m in setup.models}
        self.swaps: list[tuple[str, Optional[str], str, bool]] = []
        self.events: list[SwapEvent] = []
        self.n_swaps = 0
        self.unloads = 0
        #: Per load in a group with a budget: the models it evicted.
        self.evicted: list[tuple[str, tuple[str, ...]]] = []
        for group, name in setup.initial.items():
            if group in setup.budgets:
                self.loaded_set[group].add(name)
            else:
                self.loaded[group] = name
        self.s = Scheduler(setup.models, self, self.clock, max_wait=setup.max_wait,
                           max_queue=setup.max_queue, retry_backoff=3.0,
                           initial=setup.initial, on_swap=self.events.append,
                           collate=setup.collate, min_residency=setup.min_residency,
                           ttl=setup.ttl, budgets=setup.budgets)
        #: Where requests are admitted (the scheduler, or replicas over it).
        self.admission: Scheduler | Replicas = self.s
        self.seq = 0
        self.violations: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(f"t={self.clock.seconds()}: {what}")

    def is_loaded(self, group: str, name: str) -> bool:
        if group in self.setup.budgets:
            return name in self.loaded_set[group]
        return self.loaded.get(group) == name

    def queued(self, name: str) -> list[Req]:
        """Requests for ``name`` that arrived and have not ended in any way yet."""
        return [r for r in self.setup.reqs if r.model == name and r.seq >= 0 and not r.outcomes]

    # the Swapper
    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = NOT_GIVEN) -> Deferred[None]:
        if group in self.setup.budgets:
            return self.load(group, previous, target, evict)
        self.expect(evict is NOT_GIVEN, f"evict passed to {group}, which has no budget")
        self.expect(group not in self.swapping, f"two swaps of {group} at once")
        prev = previous.name if previous else None
        self.expect(prev == self.loaded.get(group),
                    f"swap names previous={prev}, but {self.loaded.get(group)} is loaded")
        for name in self.setup.members(group):
            self.expect(self.in_flight[name] == 0,
                        f"evicting while {name} has {self.in_flight[name]} requests in flight")
        i = self.n_swaps
        self.n_swaps += 1
        duration = self.setup.swap_durations[i % len(self.setup.swap_durations)]
        failed = self.setup.swap_failures[i % len(self.setup.swap_failures)]
        self.swapping.add(group)
        self.loaded[group] = None  # nothing can be served while the script runs
        self.swaps.append((group, prev, target.name, failed))
        d: Deferred[None] = Deferred()

        def finish() -> None:
            self.swapping.discard(group)
            if failed:
                d.errback(Failure(SwapFailure(f"{target.name} would not start")))
            else:
                self.loaded[group] = target.name
                d.callback(None)

        self.clock.callLater(duration, finish)
        return d

    def load(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec]) -> Deferred[None]:
        """A swap in a group with a budget: stop ``evict``, then load ``target`` beside the rest."""
        self.expect(group not in self.swapping, f"two loads of {group} at once")
        self.expect(evict is not NOT_GIVEN, f"no evict passed to {group}, which has a budget")
        names = [m.name for m in evict]
        prev = previous.name if previous else None
        self.expect(prev == (names[0] if names else None), f"previous={prev}, evict={names}")
        loaded = self.loaded_set[group]
        self.expect(target.name not in loaded, f"loading {target.name}, already loaded")
        now = self.clock.seconds()
        for e in evict:
            self.expect(e.name in loaded, f"evicting {e.name}, which is not loaded")
            self.expect(self.in_flight[e.name] == 0,
                        f"evicting {e.name} with {self.in_flight[e.name]} in flight")
            queued = self.queued(e.name)
            if queued:
                # Only requests the starvation guard holds back: each is newer than a
                # request of another model of the group that has waited max_wait.
                first = min(q.seq for q in queued)
                self.expect(any(x.seq < first and x.model != e.name
                                and self.setup.group_of(x.model) == group
                                and x.at + self.setup.max_wait <= now + EPS
                                for x in self.setup.reqs if x.seq >= 0),
                            f"evicting {e.name} with {len(queued)} requests queued")
        loaded.difference_update(names)
        used = sum(self.setup.spec(n).memory or 0 for n in loaded)
        budget = self.setup.budgets[group]
        self.expect(used + (target.memory or 0) <= budget,
                    f"{target.name} ({target.memory}) does not fit beside {sorted(loaded)}")
        i = self.n_swaps
        self.n_swaps += 1
        duration = self.setup.swap_durations[i % len(self.setup.swap_durations)]
        failed = self.setup.swap_failures[i % len(self.setup.swap_failures)]
        self.swapping.add(group)
        self.swaps.append((group, prev, target.name, failed))
        self.evicted.append((group, tuple(names)))
        d: Deferred[None] = Deferred()

        def finish() -> None:
            self.swapping.discard(group)
            if failed:
                d.errback(Failure(SwapFailure(f"{target.name} would not start")))
            else:
                loaded.add(target.name)
                d.callback(None)

        self.clock.callLater(duration, finish)
        return d

    def unload(self, group: str, model: ModelSpec) -> Deferred[None]:
        self.expect(group not in self.swapping, f"an unload during a swap of {group}")
        self.expect(self.is_loaded(group, model.name),
                    f"unloading {model.name}, but {self.loaded.get(group)} is loaded")
        self.expect(self.in_flight[model.name] == 0 and not self.queued(model.name),
                    f"unloading {model.name} with {self.in_flight[model.name]} in flight")
        self.swapping.add(group)
        self.unloads += 1
        if group in self.setup.budgets:
            self.loaded_set[group].discard(model.name)
        else:
            self.loaded[group] = None
        d: Deferred[None] = Deferred()

        def finish() -> None:
            self.swapping.discard(group)
            d.callback(None)

        self.clock.callLater(0.5, finish)
        return d

    def arrive(self, r: Req) -> None:
        r.seq = self.seq
        self.seq += 1
        d = self.admission.admit(r.model)
        r.d = d
        d.addCallbacks(lambda t: self.served(r, t), lambda f: self.refused(r, f))
        if r.cancel_after is not None:
            self.clock.callLater(r.cancel_after, d.cancel)

    def served(self, r: Req, t: Ticket) -> None:
        r.outcomes.append("served")
        r.ticket = t
        self.expect(t.model == r.model and t.dispatched_at == self.clock.seconds(), f"bad {t}")
        group = self.setup.group_of(r.model)
        if group in self.setup.budgets:
            self.expect(r.model in self.loaded_set[group],
                        f"{r.model} dispatched while {self.loaded_set[group]} are loaded")
        elif group is not None:
            self.expect(group not in self.swapping and self.loaded.get(group) == r.model,
                        f"{r.model} dispatched while {self.loaded.get(group)} is loaded")
        self.in_flight[r.model] += 1
        spec = next(m for m in self.setup.models if m.name == r.model)
        self.expect(self.in_flight[r.model] <= spec.max_concurrency,
                    f"{r.model} over max_concurrency")

        def done() -> None:
            self.in_flight[r.model] -= 1
            self.s.release(t)

        self.clock.callLater(r.service, done)

    def refused(self, r: Req, f: Failure) -> None:
        kind = f.check(ModelUnavailable, QueueFull, CancelledError)
        self.expect(kind is not None, f"unexpected failure {f!r}")
        r.outcomes.append(kind.__name__ if kind is not None else repr(f))

    def run(self) -> None:
        for r in self.setup.reqs:
            self.clock.callLater(r.at, self.arrive, r)
        steps = 0
        while True:
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            nxt = min(c.getTime() for c in calls)
            self.clock.advance(max(0.0, nxt - self.clock.seconds()))
            steps += 1
            assert steps < 100_000, "the run does not settle"

    def check_common(self) -> None:
        assert self.violations == []
        setup = self.setup
        for r in setup.reqs:
            assert len(r.outcomes) == 1, (r, r.outcomes)
            if r.outcomes[0] == "CancelledError":
                assert r.cancel_after is not None
        snap = self.s.snapshot()
        assert all(m.queued == 0 and m.in_flight == 0 for m in snap.models), snap
        assert all(g.swapping_to is None for g in snap.groups)
        assert self.swapping == set()
        swaps = [e for e in self.events if e.kind == "swap"]
        assert len(swaps) == len(self.swaps)
        assert len(self.events) - len(swaps) == self.unloads
        for ev in self.events:
            assert ev.result in ("ok", "failed")
        assert sorted((e.group, e.to_model, e.result != "ok") for e in swaps) == \
            sorted((g, t, failed) for g, _, t, failed in self.swaps)
        for g in snap.groups:  # the scheduler's residents are what is physically loaded
            if g.name in setup.budgets:
                assert set(g.residents) == self.loaded_set[g.name], (g, self.loaded_set)
                assert g.memory_used == sum(setup.spec(n).memory or 0 for n in g.residents)
        self.check_refused({t for _, _, t, failed in self.swaps if failed})

    def check_refused(self, failed_targets: set[str]) -> None:
        """A request fails with 503 only when a swap to its model failed."""
        for r in self.setup.reqs:
            if r.outcomes[0] == "ModelUnavailable":
                assert r.model in failed_targets


# --- strategies --------------------------------------------------------------------------------

LAYOUTS = [
    (("gpu", 2),),
    (("gpu", 3),),
    (("gpu", 2), ("gpu1", 2)),
    (("gpu", 3), ("gpu1", 2)),
]


#: Layouts with a memory budget on ``gpu`` (MiB); ``gpu1`` holds one model at a time.
BUDGET_LAYOUTS = [
    (("gpu", 3),),
    (("gpu", 4),),
    (("gpu", 3), ("gpu1", 2)),
]
MEMORIES = [4, 6, 8, 12, 16, 20, 24, 32]


@st.composite
def setups(draw: Any, *, failures: bool, cancels: bool, ample: bool,
           max_queue: Optional[int] = None, budgeted: bool = False,
           ttl: bool = False) -> Setup:
    layout = draw(st.sampled_from(BUDGET_LAYOUTS if budgeted else LAYOUTS))
    budgets = {"gpu": draw(st.sampled_from([24, 32]))} if budgeted else {}
    with_always_on = draw(st.booleans())
    n_reqs = draw(st.integers(1, 40))
    models: list[ModelSpec] = []
    for group, count in layout:
        for i in range(count):
            conc = 64 if ample else draw(st.integers(1, 3))
            memory = None
            if group in budgets:
                memory = draw(st.sampled_from([m for m in MEMORIES if m <= budgets[group]]))
            models.append(ModelSpec(f"{group}-m{i}", "http://127.0.0.1:1", max_concurrency=conc,
                                    group=group, memory=memory))
    if with_always_on:
        models.append(ModelSpec("emb", "http://127.0.0.1:2", always_on=True,
                                max_concurrency=64 if ample else draw(st.integers(1, 3))))
    names = [m.name for m in models]
    initial: dict[str, str] = {}
    for group, count in layout:
        pick = draw(st.sampled_from([None] + [f"{group}-m{i}" for i in range(count)]))
        if pick is not None:
            initial[group] = pick
    # Arrival gaps: many zeros make bursts within one turn.
    gaps = st.one_of(st.just(0.0), st.floats(0.0, 0.5), st.floats(0.0, 8.0))
    reqs: list[Req] = []
    t = 0.0
    for _ in range(n_reqs):
        t += draw(gaps)
        cancel = None
        if cancels and draw(st.integers(0, 4)) == 0:
            cancel = draw(st.floats(0.0, 20.0))
        reqs.append(Req(at=t, model=draw(st.sampled_from(names)),
                        service=draw(st.floats(0.05, 10.0)), cancel_after=cancel))
    durations = draw(st.lists(st.floats(0.01, 25.0), min_size=1, max_size=8))
    fails = [False]
    if failures:
        fails = draw(st.lists(st.integers(0, 3).map(lambda x: x == 0), min_size=1, max_size=8))
    return Setup(models, initial, max_wait=draw(st.floats(0.0, 40.0)),
                 max_queue=max_queue if max_queue is not None else draw(st.integers(1, 40)),
                 reqs=reqs, swap_durations=durations, swap_failures=fails,
                 collate=draw(st.sampled_from([0.0, 0.0, 0.25, draw(st.floats(0.0, 5.0))])),
                 min_residency=draw(st.sampled_from([0.0, 0.0, draw(st.floats(0.0, 30.0))])),
                 budgets=budgets,
                 ttl=draw(st.sampled_from([0.0, draw(st.floats(0.1, 20.0))])) if ttl else 0.0)


# --- properties --------------------------------------------------------------------------------


def assert_guard_bound(setup: Setup) -> None:
    """Every dispatched request waited at most ``max_wait + k * (S + D)`` of its group."""
    max_swap = max(setup.swap_durations)
    for r in setup.reqs:
        if r.ticket is None:
            continue
        group = setup.group_of(r.model)
        wait = r.ticket.queue_wait
        assert wait is not None
        if group is None:
            assert wait == 0.0
            continue
        members = setup.members(group)
        d_max = max(x.service for x in setup.reqs if x.model in members)
        bound = setup.max_wait + len(members) * (max_swap + d_max)
        assert wait <= bound + EPS, (r, wait, bound)


@SETTINGS
@given(setups(failures=True, cancels=True, ample=False))
def test_every_request_ends_exactly_once_and_swaps_never_evict(setup: Setup) -> None:
    """
    Served exactly once, or refused/failed, or cancelled; never two swaps of
    one group at once; never a swap while any model of the group has a request
    in flight; a request is dispatched only to its physically loaded model and
    within its ``max_concurrency`` (all asserted by the fakes as they run).
    """
    world = World(setup)
    world.run()
    world.check_common()


@SETTINGS
@given(setups(failures=True, cancels=True, ample=True, max_queue=1000))
def test_no_request_waits_beyond_the_guard_bound(setup: Setup) -> None:
    """
    With free slots (``max_concurrency`` above any model's request count, so
    nobody waits for a slot of its own model), a served request ``X`` of a
    group with ``k`` swappable models waited at most::

        max_wait + k * (S + D)

    ``S`` is the longest swap (failed or not) and ``D`` the longest service
    time of the group.  Why: from the moment ``T`` when ``X`` has waited
    ``max_wait``, the guard holds back every request newer than the oldest
    overdue one, except a freshly loaded model's backlog.  After ``T``:

    1. whatever holds the slot finishes: the resident's in-flight requests
       drain (``D``), or a swap already running ends (``S``) and its model
       serves the backlog it was loaded for (``D``);
    2. the slot goes to the model with the oldest waiter; each model other
       than ``X``'s gets at most one such visit, a swap plus its backlog
       (``S + D``), because after a visit it only holds requests that arrived
       after ``T``, newer than ``X`` -- at most ``k - 1`` visits;
    3. the swap to ``X``'s model (``S``), which dispatches ``X`` at once.

    The worst case is (1) as a drain, ``D + (k - 1)(S + D) + S``.  It includes
    ``X``'s own model being resident but held back by the guard for an older
    request of another model (hypothesis found that one: with ``k = 2`` the
    brief's "one swap plus the resident's drain" becomes ``2S + 2D``).
    """
    world = World(setup)
    world.run()
    world.check_common()
    assert_guard_bound(setup)


def test_guard_bound_when_the_own_model_is_resident_but_held_back() -> None:
    """The case hypothesis found: X's model is loaded, yet X waits two swaps and two drains."""
    models = [ModelSpec(f"gpu-m{i}", "http://127.0.0.1:1", max_concurrency=64) for i in (0, 1)]
    reqs = [Req(0.0, "gpu-m0", 1.0), Req(0.0, "gpu-m1", 1.0), Req(1.5, "gpu-m0", 1.0)]
    setup = Setup(models, {}, max_wait=0.0, max_queue=1000, reqs=reqs, swap_durations=[1.0],
                  swap_failures=[False])
    world = World(setup)
    world.run()
    world.check_common()
    # m0 loads 0-1 and serves 1-2; m1 was overdue at once, so X (1.5) is held back;
    # m1 loads 2-3, serves 3-4; m0 loads 4-5: X waited 3.5 = max_wait + 2S + 1.5D.
    x = reqs[2].ticket
    assert x is not None and x.queue_wait == 3.5
    assert [(g, p, t) for g, p, t, _ in world.swaps] == [
        ("default", None, "gpu-m0"), ("default", "gpu-m0", "gpu-m1"), ("default", "gpu-m1", "gpu-m0")]


def fifo_cost(setup: Setup, world: World) -> dict[str, int]:
    """Swaps a plain FIFO would make: model changes along the admitted arrival order."""
    current: dict[str, Optional[str]] = {g: None for g in {m.group for m in setup.models}}
    current.update(setup.initial)
    cost = {g: 0 for g in current}
    for r in sorted(setup.reqs, key=lambda x: x.seq):
        group = setup.group_of(r.model)
        if group is None or r.outcomes == ["QueueFull"]:
            continue
        if current[group] != r.model:
            cost[group] += 1
            current[group] = r.model
    return cost


@SETTINGS
@given(setups(failures=False, cancels=False, ample=False, max_queue=1000))
def test_never_more_swaps_than_fifo(setup: Setup) -> None:
    """
    Without failures or cancellations, each group swaps at most as often as
    FIFO order would: once per change of model along the arrival order, plus
    one for the first load from an unknown slot.
    """
    world = World(setup)
    world.run()
    world.check_common()
    assert all(r.outcomes == ["served"] for r in setup.reqs)
    cost = fifo_cost(setup, world)
    for group, fifo in cost.items():
        jano = sum(1 for g, *_ in world.swaps if g == group)
        assert jano <= fifo, (group, jano, fifo)


@SETTINGS
@given(setups(failures=False, cancels=False, ample=False, max_queue=1000))
def test_without_a_guard_each_model_loads_at_most_once_per_burst(setup: Setup) -> None:
    """A burst that arrives in one turn, with no guard (max_wait inf), loads each model at most once."""
    for r in setup.reqs:
        r.at = 0.0
    setup.max_wait = math.inf
    world = World(setup)
    world.run()
    world.check_common()
    for group in {m.group for m in setup.models if not m.always_on}:
        targets = [t for g, _, t, _ in world.swaps if g == group]
        assert len(targets) == len(set(targets)), targets


# --- groups with a memory budget -----------------------------------------------------------------


@BUDGET_SETTINGS
@given(setups(failures=True, cancels=True, ample=False, budgeted=True, ttl=True))
def test_budget_groups_never_evict_work_and_end_every_request_once(setup: Setup) -> None:
    """
    As above, with a group holding any set of models that fits its budget:
    every request ends exactly once; a request is dispatched only to a loaded
    model; a load never overcommits the budget, never evicts a model with a
    request in flight, nor one with requests queued unless the starvation
    guard holds them back for an older, overdue request of another model; the
    scheduler's residents are what is loaded.  Idle residents are unloaded
    (TTL) one at a time, never during a load (all asserted by the fakes).
    """
    world = World(setup)
    world.run()
    world.check_common()


@BUDGET_SETTINGS
@given(setups(failures=True, cancels=True, ample=True, max_queue=1000, budgeted=True))
def test_budget_groups_keep_the_guard_bound(setup: Setup) -> None:
    """
    The bound of :func:`test_no_request_waits_beyond_the_guard_bound` holds
    for a group with a budget too: ``max_wait + k * (S + D)``.  After ``T``,
    when ``X`` has waited ``max_wait``, the residents take no request newer
    than the oldest overdue one, so they drain within ``D`` (they drain side
    by side); each load takes ``S``, evicting whatever is needed, idle or held
    back; each other model gets at most one such visit before ``X``'s.
    """
    world = World(setup)
    world.run()
    world.check_common()
    assert_guard_bound(setup)


@BUDGET_SETTINGS
@given(setups(failures=False, cancels=False, ample=True, max_queue=1000, budgeted=True))
def test_models_that_fit_together_are_loaded_once(setup: Setup) -> None:
    """Without failures, when the whole group fits its budget no model is loaded twice."""
    world = World(setup)
    world.run()
    world.check_common()
    assert all(r.outcomes == ["served"] for r in setup.reqs)
    for group, budget in setup.budgets.items():
        if sum(setup.spec(n).memory or 0 for n in setup.members(group)) <= budget:
            targets = [t for g, _, t, _ in world.swaps if g == group]
            assert len(targets) == len(set(targets)), targets
            assert all(e == () for g, e in world.evicted if g == group)


# --- replicas: one model on two groups, through jano.scheduler.Replicas ------------------------

#: The model served by replicas, one in each group of the layout.
PUBLIC = "R"


class ReplicaWorld(World):
    """
    :class:`World` with requests admitted through :class:`Replicas`: ``R`` is
    served by ``R@gpu`` and ``R@gpu1``, each a model of its group to the
    scheduler; the fakes check each instance as they check a model.  ``marks``
    mark a replica down at a time (a stall, a crash), which fails its queue
    over to the other.
    """

    def __init__(self, setup: Setup, marks: Sequence[tuple[float, str]]) -> None:
        super().__init__(setup)
        self.r = Replicas(self.s, self.clock, setup.models)
        self.admission = self.r
        self.marked: set[str] = set()
        for at, name in marks:
            self.clock.callLater(at, self.mark, name)

    def mark(self, name: str) -> None:
        self.marked.add(name)
        self.r.mark_down(name, "stalled", 3.0)

    def served(self, r: Req, t: Ticket) -> None:
        by = t.served_by
        self.expect(by is not None and by.name == t.model, f"served_by {by} for {t}")
        if r.model == PUBLIC:
            self.expect(t.model in (f"{PUBLIC}@gpu", f"{PUBLIC}@gpu1"), f"{t.model} for R")
            self.expect(t.failovers < 2, f"{t.failovers} failovers with two replicas")
            r.model = t.model  # from now on, the instance it holds a slot of
        super().served(r, t)

    def check_refused(self, failed_targets: set[str]) -> None:
        """``R`` is refused only when a swap of a replica failed or a replica was marked down."""
        down = (failed_targets | self.marked) & {f"{PUBLIC}@gpu", f"{PUBLIC}@gpu1"}
        for r in self.setup.reqs:
            if r.outcomes[0] == "ModelUnavailable":
                assert (r.model == PUBLIC and down) or r.model in failed_targets, (r, down)


@st.composite
def replica_setups(draw: Any, *, failures: bool, cancels: bool, ample: bool
                   ) -> tuple[Setup, list[tuple[float, str]]]:
    models: list[ModelSpec] = []
    spread = draw(st.booleans())  # models[].spread: a long queue may load an idle replica
    for group in ("gpu", "gpu1"):
        conc = 64 if ample else draw(st.integers(1, 3))
        models.append(ModelSpec(f"{PUBLIC}@{group}", "http://127.0.0.1:1", group=group,
                                max_concurrency=conc, serves=PUBLIC, spread=spread))
        for i in range(draw(st.integers(0, 2))):
            models.append(ModelSpec(f"{group}-m{i}", "http://127.0.0.1:1", group=group,
                                    max_concurrency=64 if ample else draw(st.integers(1, 3))))
    initial: dict[str, str] = {}
    for group in ("gpu", "gpu1"):
        pick = draw(st.sampled_from([None] + [m.name for m in models if m.group == group]))
        if pick is not None:
            initial[group] = pick
    names = [PUBLIC, PUBLIC] + [m.name for m in models if m.serves is None]
    gaps = st.one_of(st.just(0.0), st.floats(0.0, 0.5), st.floats(0.0, 8.0))
    reqs: list[Req] = []
    t = 0.0
    for _ in range(draw(st.integers(1, 30))):
        t += draw(gaps)
        cancel = None
        if cancels and draw(st.integers(0, 4)) == 0:
            cancel = draw(st.floats(0.0, 20.0))
        reqs.append(Req(at=t, model=draw(st.sampled_from(names)),
                        service=draw(st.floats(0.05, 10.0)), cancel_after=cancel))
    fails = [False]
    if failures:
        fails = draw(st.lists(st.integers(0, 3).map(lambda x: x == 0), min_size=1, max_size=8))
    marks = draw(st.lists(st.tuples(st.floats(0.0, t + 10.0),
                                    st.sampled_from([f"{PUBLIC}@gpu", f"{PUBLIC}@gpu1"])),
                          max_size=3 if failures else 0))
    setup = Setup(models, initial, max_wait=draw(st.floats(0.0, 40.0)),
                  max_queue=1000 if ample else draw(st.integers(1, 40)), reqs=reqs,
                  swap_durations=draw(st.lists(st.floats(0.01, 25.0), min_size=1, max_size=8)),
                  swap_failures=fails,
                  collate=draw(st.sampled_from([0.0, 0.25, draw(st.floats(0.0, 5.0))])))
    return setup, marks


@SETTINGS
@given(replica_setups(failures=True, cancels=True, ample=False))
def test_replicas_end_every_request_once_and_never_evict_work(
        drawn: tuple[Setup, list[tuple[float, str]]]) -> None:
    """
    With replicas, swap failures and replicas marked down: every request is
    served, refused or cancelled exactly once (a request failed over is still
    one request); a request for ``R`` is served by one of its replicas, after
    at most one failover; no swap evicts a request in flight; a request for
    ``R`` is refused with 503 only when a replica's swap failed or it was
    marked down (all asserted by the fakes as they run).
    """
    setup, marks = drawn
    world = ReplicaWorld(setup, marks)
    world.run()
    world.check_common()


@SETTINGS
@given(replica_setups(failures=True, cancels=False, ample=True))
def test_replicas_keep_the_guard_bound_per_queue_they_wait_in(
        drawn: tuple[Setup, list[tuple[float, str]]]) -> None:
    """
    The guard bound of :func:`test_no_request_waits_beyond_the_guard_bound`
    holds for each queue a request waits in: from its last (re)admission,
    ``max_wait + k * (S + D)`` of the replica's group.  A failover restarts
    the wait on the other replica (a new arrival there), so the whole wait,
    from the arrival at Jano, is bounded only by the sum over the replicas
    tried: ``(failovers + 1)`` times the larger bound.
    """
    setup, marks = drawn
    world = ReplicaWorld(setup, marks)
    world.run()
    world.check_common()
    max_swap = max(setup.swap_durations)
    bounds: dict[str, float] = {}
    for group in ("gpu", "gpu1"):
        members = setup.members(group)
        d_max = max((x.service for x in setup.reqs if x.model in members), default=0.0)
        bounds[group] = setup.max_wait + len(members) * (max_swap + d_max)
    for r in setup.reqs:
        t = r.ticket
        if t is None:
            continue
        where = setup.group_of(t.model)
        assert where is not None and t.dispatched_at is not None and t.queue_wait is not None
        since = t.requeued_at if t.requeued_at is not None else t.arrived_at
        assert t.dispatched_at - since <= bounds[where] + EPS, (r, t, bounds)
        assert t.queue_wait <= (t.failovers + 1) * max(bounds.values()) + EPS, (r, t, bounds)
