"""
Groups with a memory budget: which model to load next, which idle residents
to evict for it, and each resident's own idle timer.

:class:`BudgetPlanner` is a base of :class:`jano.scheduler.policy.Policy`:
:meth:`~BudgetPlanner.plan_budget` is what the policy does for a group with a
budget (:meth:`Policy._plan_group` for the others).  :func:`choose_eviction`
is the choice itself, pure.  The rules are described in :mod:`jano.scheduler`.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Collection, Optional, Sequence

from jano.errors import ModelUnavailable
from jano.scheduler.state import Group, Model, Waiter, memory_of, step_ttl_timer
from jano.scheduler.swaps import SwapRunner

__all__ = ["BudgetPlanner", "choose_eviction", "memory_of"]

#: Residents :func:`choose_eviction` considers at most (the least recently used);
#: the search is exact, so exponential in this.
SEARCH_LIMIT = 16


def _used(m: Model) -> float:
    return -math.inf if m.last_used is None else m.last_used


def choose_eviction(need: int, pool: Sequence[Model], *, budget: int,
                    held: Collection[Model] = ()) -> Optional[tuple[Model, ...]]:
    """
    The residents to stop so that ``need`` more MiB are free, or ``None`` if
    all of ``pool`` together do not free that much.

    :param pool: the residents that may be evicted, least recently used first:
        nothing in flight, and nothing queued except, for the ones also in
        ``held``, requests the starvation guard holds back.
    :return: the best set, least recently used first.  Sets are compared by
        (1) how many ``held`` models they stop (such a model is reloaded
        later for its waiters), (2) how many models, (3) how recently they
        were used: the set whose most recently used member was used longest
        ago wins, then the next most recent member decides, and so on,
        (4) the MiB they free, least first, (5) their places in ``pool``.
    """
    pool = list(pool[:SEARCH_LIMIT])
    memory = [memory_of(m, budget) for m in pool]
    if sum(memory) < need:
        return None
    largest = sorted(memory, reverse=True)
    best: Optional[tuple[int, int, tuple[float, ...], int, tuple[int, ...]]] = None
    for k in range(1, len(pool) + 1):
        if best is not None and best[0] == 0:
            break  # nothing larger beats a smaller set of idle models
        if sum(largest[:k]) < need:
            continue
        for picked in combinations(range(len(pool)), k):
            freed = sum(memory[i] for i in picked)
            if freed < need:
                continue
            key = (sum(1 for i in picked if pool[i] in held), k,
                   tuple(sorted((_used(pool[i]) for i in picked), reverse=True)), freed, picked)
            if best is None or key < best:
                best = key
    assert best is not None
    return tuple(pool[i] for i in best[4])


class BudgetPlanner(SwapRunner):
    """Plan a group with a memory budget; keep its residents' idle timers."""

    max_wait: float
    collate: float
    min_residency: float
    _draining: bool
    _groups: dict[str, Group]

    def _dispatch(self, m: Model, g: Optional[Group]) -> None:
        raise NotImplementedError

    def _set_timer(self, g: Group, wake: Optional[float]) -> None:
        raise NotImplementedError

    def _swap_turn_at(self, g: Group, when: float) -> None:
        raise NotImplementedError

    def ttl_of(self, m: Model) -> float:
        raise NotImplementedError

    # --- planning ------------------------------------------------------------------------------

    def plan_budget(self, g: Group) -> None:
        """
        Decide what a group with a budget does now: hand every resident its
        waiters (as the guard allows), keep the guard and the idle timers in
        step, and start (or hold, or wait with) the next load.
        """
        assert g.budget is not None
        now = self.clock.seconds()
        self._forget_leftovers(g)
        if not g.members and not g.residents and not g.busy:
            if self._groups.get(g.name) is g:
                del self._groups[g.name]
            self._set_timer(g, None)
            self._cancel_swap_call(g)
            return
        self._refuse_oversized(g, g.budget)
        oldest = self._oldest_outside(g)
        if oldest is None or self._draining:
            g.latch = None
        elif g.latch is None and now >= oldest.ticket.arrived_at + self.max_wait:
            g.latch = oldest.key
            self.log.info("group {group}: starvation guard engaged for {model} (waiting "
                          "{waited:.1f}s); the residents take no newer requests",
                          group=g.name, model=oldest.model.name,
                          waited=now - oldest.ticket.arrived_at)
        for r in list(g.residents):
            member = r.group is g and not r.removed
            if member:
                self._dispatch(r, g)
            idle = member and not r.in_flight and not r.live and not self._draining
            self._idle_model(r, now if idle else None)
        wake = None
        if oldest is not None and g.latch is None and not self._draining:
            wake = oldest.ticket.arrived_at + self.max_wait
        self._set_timer(g, wake)

        plan = None
        if oldest is not None and not g.busy and not self._draining:
            plan = self._next_load(g, g.budget)
        if plan is None:  # nothing to load, or a load runs, or residents must drain first
            g.want_since = None
            self._cancel_swap_call(g)
            return
        target, evict = plan
        hold = now
        if evict:  # the collation window and minimum residency, as for a swap
            if g.want_since is None:
                g.want_since = now
            hold = g.want_since + self.collate
            if self.min_residency:
                for e in evict:
                    if e.loaded_at is not None:
                        hold = max(hold, e.loaded_at + self.min_residency)
            head = target.head()
            assert head is not None
            hold = min(hold, head.ticket.arrived_at + self.max_wait)
        else:
            g.want_since = None
        if now < hold:
            self._swap_turn_at(g, hold)
        elif g.swap_ready:
            self._start_swap(g, evict[0] if evict else None, target, now, evict)
        else:
            self._swap_turn_at(g, now)  # decide, then look once more a turn later

    def _oldest_outside(self, g: Group) -> Optional[Waiter]:
        """The oldest waiter of a model that is neither resident nor being loaded."""
        oldest: Optional[Waiter] = None
        for m in g.members:
            if m.live and m is not g.swapping_to and m not in g.residents:
                h = m.head()
                if h is not None and (oldest is None or h.key < oldest.key):
                    oldest = h
        return oldest

    def _held(self, g: Group, r: Model) -> bool:
        """Every waiter of resident ``r`` is one the starvation guard holds back."""
        h = r.head()
        return (h is not None and g.latch is not None and h.key > g.latch
                and h.seq >= r.load_seq)

    def _next_load(self, g: Group, budget: int) -> Optional[tuple[Model, tuple[Model, ...]]]:
        """
        The load to start now and the residents it evicts: the waiting model
        with the oldest request that can be loaded now, into free memory or
        by evicting residents (:func:`choose_eviction`).  While the guard is
        engaged, only the model with the oldest request, and then residents
        whose waiters the guard holds back may be evicted too.
        """
        waiting = [(h.key, m) for m in g.members
                   if m.live and m is not g.swapping_to and m not in g.residents
                   for h in (m.head(),) if h is not None]
        waiting.sort(key=lambda km: km[0])
        if g.latch is not None:
            waiting = waiting[:1]
        free = budget - sum(memory_of(r, budget) for r in g.residents)
        lru = sorted(g.residents, key=_used)  # stable: ties go in load order
        idle = [r for r in lru if r.group is g and not r.removed and not r.in_flight
                and not r.live]
        held = [r for r in lru if g.latch is not None and r.group is g and not r.removed
                and not r.in_flight and self._held(g, r)]
        pool = [r for r in lru if r in idle or r in held]
        for _, m in waiting:
            need = memory_of(m, budget) - free
            if need <= 0:
                return m, ()
            evict = choose_eviction(need, pool, budget=budget, held=held)
            if evict is not None:
                return m, evict
        return None

    def _refuse_oversized(self, g: Group, budget: int) -> None:
        """Fail the waiters of a model that can never fit (configuration checks prevent it)."""
        for m in g.members:
            memory = memory_of(m, budget)
            if m.live and memory > budget:
                cause = f"needs {memory} MiB, more than group {g.name!r}'s {budget} MiB"
                self.log.error("{model} {cause}", model=m.name, cause=cause)
                for w in m.take_live():
                    self._fail_waiter(w, ModelUnavailable(m.name, cause, self.retry_backoff))

    def _forget_leftovers(self, g: Group) -> None:
        """
        A resident that left the group (removed, moved, made always_on) stays
        counted until its requests in flight end; then it is not counted as
        loaded any more, as a one-model group's slot becomes unknown.
        """
        for r in list(g.residents):
            if (r.group is not g or r.removed) and not r.in_flight:
                self.log.info("group {group}: {model} left the group; no longer counted "
                              "as loaded", group=g.name, model=r.name)
                g.residents.remove(r)
                r.loaded_at = None
                self._idle_model(r, None)

    # --- idle timers -----------------------------------------------------------------------------

    def _idle_model(self, m: Model, now: Optional[float]) -> None:
        """
        Resident ``m`` of a group with a budget is idle with nothing waiting
        since ``now`` (``None``: it is not, or no longer resident): keep its
        TTL timer in step.
        """
        ttl = self.ttl_of(m) if now is not None else 0.0
        step_ttl_timer(m, ttl, now, self.clock, self._ttl_due_model, m)

    def _ttl_due_model(self, m: Model) -> None:
        m.ttl_call = None
        g = m.group
        if (g is None or self._groups.get(g.name) is not g or g.budget is None
                or m not in g.residents or m.in_flight or m.live or g.busy or self._draining):
            return  # a busy group re-arms the timer (already due) when its swap ends
        self.start_unload(g, m, "idle")
        self._run()

    # --- reconfiguration -----------------------------------------------------------------------

    def set_budget(self, g: Group, budget: Optional[int]) -> None:
        """
        Give ``g`` a memory budget, change it or take it away.  Nothing is
        evicted by force: a budget smaller than the residents only stops new
        loads until enough of them went.  Without a budget any more, a sole
        idle resident becomes the resident; several stay counted until none
        of them has requests in flight, and the slot is unknown after.
        """
        old = g.budget
        g.budget = budget
        if old is None and budget is not None:
            r = g.resident
            self._idle(g, None)
            g.resident = None
            if r is not None and g.swapping_to is not None:
                g.evicting = (r,)  # the running swap stops it
            elif r is not None and g.unloading is not r and r not in g.residents:
                r.loaded_at = g.loaded_at
                r.load_seq = g.load_seq
                g.residents.insert(0, r)
            g.loaded_at = None
        elif old is not None and budget is None:
            for r in g.residents:
                self._idle_model(r, None)
            if len(g.residents) == 1 and not g.busy:
                r = g.residents.pop()
                g.resident = r
                g.loaded_at = r.loaded_at
                g.load_seq = r.load_seq
