"""
The :class:`Scheduler`: the seam the web layer calls (``admit``, ``release``,
``snapshot``, ``drain``, ``reconfigure``) and the configuration tables, on top
of :class:`jano.scheduler.policy.Policy`, which decides and acts.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime

from jano.errors import Busy, Draining, ModelRemoved, ModelUnavailable, QueueFull
from jano.interfaces import Swapper
from jano.records import ModelSpec, SchedulerSnapshot, SwapEvent, Ticket
from jano.scheduler.policy import Policy
from jano.scheduler.state import (
    Group,
    Model,
    Waiter,
    estimate_retry_after,
    ewma,
    group_state,
    model_state,
)

__all__ = ["Scheduler"]


class Scheduler(Policy):
    """
    Per-model FIFO queues, per-group slots (or memory budgets), the collation
    policy and the starvation guard (see :mod:`jano.scheduler`).

    :param models: every configured model.
    :param swapper: runs swaps; a public attribute, replaced on reload.
    :param clock: the only source of time and timers.
    :param max_wait: seconds a request may wait before the starvation guard
        stops the resident model from taking newer requests.
    :param max_queue: live waiters per model before :class:`QueueFull`.
    :param retry_backoff: seconds a model stays down after a failed swap.
    :param initial: group name to the model known to be resident at start-up.
    :param on_swap: called once with a :class:`SwapEvent` when any swap attempt ends.
    :param collate: seconds a swap away from an idle resident is held back
        (0: decided at once, as before collation windows existed).
    :param min_residency: seconds a model swapped in is not evicted for an idle gap.
    :param ttl: seconds idle before a resident is unloaded, unless its spec says
        otherwise (0: never).
    :param budgets: group name to its memory budget in MiB; such a group holds
        any set of models whose ``memory`` fits (the others hold one model).
    """

    def __init__(self, models: Sequence[ModelSpec], swapper: Swapper, clock: IReactorTime, *,
                 max_wait: float = 120.0, max_queue: int = 256, retry_backoff: float = 5.0,
                 initial: Optional[Mapping[str, str]] = None,
                 on_swap: Optional[Callable[[SwapEvent], None]] = None,
                 collate: float = 0.0, min_residency: float = 0.0, ttl: float = 0.0,
                 budgets: Mapping[str, int] = {}) -> None:
        super().__init__(swapper, clock, max_wait=max_wait, retry_backoff=retry_backoff,
                         on_swap=on_swap, collate=collate, min_residency=min_residency, ttl=ttl)
        self.max_queue = max_queue
        self.budgets: dict[str, int] = dict(budgets)
        #: Removed models that still have requests in flight.
        self._retired: dict[str, Model] = {}
        self._install(models)
        for group_name, model_name in (initial or {}).items():
            m = self._models.get(model_name)
            if m is None or m.group is None:
                self.log.warn("initial model {model} for group {group} is not a swappable "
                              "configured model; the slot stays unknown",
                              model=model_name, group=group_name)
                continue
            if m.group.name != group_name and group_name:
                self.log.warn("initial model {model} is in group {actual}, not {group}",
                              model=model_name, actual=m.group.name, group=group_name)
            if m.group.budget is None:
                m.group.resident = m
            elif m not in m.group.residents:
                m.group.residents.append(m)
        for g in self._groups.values():  # an idle initial resident's TTL runs from now
            self._dirty[g] = None
        self._run()

    # --- the seam --------------------------------------------------------------------------

    def admit(self, model: str) -> Deferred[Ticket]:
        """
        Queue a request for ``model``.

        :raises KeyError: when ``model`` is not configured.
        :return: fires with a :class:`Ticket` when the request may be forwarded;
            fails with :class:`QueueFull`, :class:`ModelUnavailable` or
            :class:`Draining`.  Cancel it when the client goes away.
        """
        m = self._models[model]
        if self._draining:
            return fail(Draining("Jano is shutting down"))
        now = self.clock.seconds()
        if m.down_until is not None:
            if now < m.down_until:
                return fail(ModelUnavailable(model, m.down_reason or "swap failed",
                                             m.down_until - now))
            m.down_until = None
            m.down_reason = None
        if m.live >= self.max_queue:
            retry_after = estimate_retry_after(m)
            self.log.info("queue for {model} is full ({queued} waiting): retry after {retry_after:.0f}s",
                          model=model, queued=m.live, retry_after=retry_after)
            return fail(QueueFull(model, retry_after))
        self._seq += 1
        w = Waiter(m, Ticket(model, now), self._seq, m.group)
        m.queue.append(w)
        m.live += 1
        self._touch(m)
        self._run()
        return w.deferred

    def release(self, ticket: Ticket) -> None:
        """The forwarded request ended (any way): free its slot and re-evaluate."""
        m = self._owner.pop(ticket, None)
        if m is None:
            self.log.warn("release of a ticket for {model} that is not in flight (released twice?)",
                          model=ticket.model)
            return
        m.in_flight -= 1
        now = self.clock.seconds()
        m.last_used = now
        if ticket.dispatched_at is not None:
            m.service_mean = ewma(m.service_mean, now - ticket.dispatched_at)
        if m.removed and m.in_flight == 0:
            self._retired.pop(m.name, None)
        self._touch(m)
        self._run()

    def load(self, model: str) -> Deferred[None]:
        """
        Make ``model`` its group's resident (one of them, in a group with a
        memory budget), as a request for it would: it queues behind what
        waits, the starvation guard applies, and it never evicts work.

        :raises KeyError: when ``model`` is not configured.
        :raises Busy: when ``model`` is ``always_on`` (always loaded).
        :return: fires when ``model`` is resident; fails as an admission would
            (:class:`ModelUnavailable` after a failed swap, :class:`Draining`).
        """
        m = self._models[model]
        if m.group is None:
            raise Busy(f"model {model!r} is always_on: it is always loaded")
        # The load holds a slot for no time at all.
        loaded: Deferred[None] = self.admit(model).addCallback(self.release)
        return loaded

    def unload(self, model: str) -> bool:
        """
        Unload ``model`` now, leaving its group's slot empty (in a group with
        a memory budget, only ``model`` goes; the other residents stay).

        :raises KeyError: when ``model`` is not configured.
        :raises Busy: when ``model`` is always_on, has requests in flight or
            waiting, or its group is swapping.
        :return: ``True`` if an unload started, ``False`` if ``model`` was not
            loaded (nothing to do).
        """
        m = self._models[model]
        g = m.group
        if g is None:
            raise Busy(f"model {model!r} is always_on: it cannot be unloaded")
        if g.unloading is m:
            return True
        if g.busy:
            raise Busy(f"group {g.name!r} is swapping; try again when it is done")
        if not g.holds(m):
            return False
        if m.in_flight or m.live:
            raise Busy(f"model {model!r} has {m.in_flight} requests in flight and {m.live} "
                       "waiting; it is never evicted while it has work")
        if self._draining:
            raise Draining()
        self.start_unload(g, m, "requested")
        self._run()
        return True

    def mark_down(self, model: str, cause: str, seconds: float) -> None:
        """
        Refuse ``model`` for ``seconds`` (as after a failed swap): its waiting
        requests fail now with :class:`ModelUnavailable` and ``cause``, and
        new ones fail fast until then.  Used when the model stalls.
        """
        m = self._models.get(model)
        if m is None:
            return
        m.down_until = self.clock.seconds() + seconds
        m.down_reason = cause
        for w in m.take_live():
            self._fail_waiter(w, ModelUnavailable(model, cause, seconds))
        self._touch(m)
        self._run()

    def clear_down(self, model: str) -> None:
        """Admit ``model`` again now (it answers again): undo :meth:`mark_down`."""
        m = self._models.get(model)
        if m is None or m.down_until is None:
            return
        m.down_until = None
        m.down_reason = None
        self._touch(m)
        self._run()

    def lost(self, model: str, cause: str, seconds: float) -> None:
        """
        ``model``'s server went away on its own (a crash): its group no longer
        holds it, so the next request for it loads it again, after ``seconds``
        of refusing it as :meth:`mark_down` does.  Requests in flight end as
        their connections do.
        """
        m = self._models.get(model)
        if m is None:
            return
        g = m.group
        if g is not None and g.resident is m:
            self._idle(g, None)
            g.resident = None
            g.loaded_at = None
            g.latch = None
            self._dirty[g] = None
        elif g is not None and m in g.residents:
            self._idle_model(m, None)
            g.residents.remove(m)
            m.loaded_at = None
            self._dirty[g] = None
        self.mark_down(model, cause, seconds)

    @property
    def draining(self) -> bool:
        """:meth:`drain` was called: every admission fails with :class:`Draining`."""
        return self._draining

    def is_loaded(self, model: str) -> bool:
        """``model`` is loaded now (always, for always_on): cheaper than a snapshot."""
        m = self._models.get(model)
        if m is None:
            return False
        g = m.group
        return g is None or g.resident is m or m in g.residents

    def record(self, model: str) -> Optional[Model]:
        """
        The scheduler's own record of ``model`` (``None``: not configured), for
        :mod:`jano.scheduler.replicas` to read; nothing outside this package
        should, and nobody may change it.
        """
        return self._models.get(model)

    def snapshot(self) -> SchedulerSnapshot:
        """Everything telemetry shows about queues, slots and swaps, right now."""
        now = self.clock.seconds()
        residents: set[int] = set()
        unload_at: dict[int, float] = {}
        for g in self._groups.values():
            r = g.resident
            if r is not None:
                residents.add(id(r))
                if g.idle_since is not None:
                    unload_at[id(r)] = g.idle_since + self.ttl_of(r)
            for r in g.residents:
                residents.add(id(r))
                if r.idle_since is not None:
                    unload_at[id(r)] = r.idle_since + self.ttl_of(r)
        models = [model_state(m, now, residents, unload_at.get(id(m)))
                  for ms in (self._models, self._retired) for m in ms.values()]
        groups = tuple(group_state(g, unload_at) for g in self._groups.values())
        return SchedulerSnapshot(at=now, models=tuple(models), groups=groups,
                                 draining=self._draining, last_dispatch_at=self.last_dispatch_at)

    def drain(self) -> Deferred[None]:
        """
        Stop admitting and start no new swap; fail every queued waiter with
        :class:`Draining`.

        :return: fires when nothing is in flight and no swap runs.  Cancelling
            it only stops the wait.
        """
        if not self._draining:
            self._draining = True
            failed = 0
            for m in self._models.values():
                for w in m.take_live():
                    self._fail_waiter(w, Draining("Jano is shutting down"))
                    failed += 1
            for g in self._groups.values():
                g.latch = None
                self._set_timer(g, None)
                self._cancel_swap_call(g)
            self.log.info("draining: {failed} queued requests refused, {in_flight} in flight",
                          failed=failed, in_flight=len(self._owner))

        def forget(d: Deferred[None]) -> None:
            if d in self._drain_waiters:
                self._drain_waiters.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._drain_waiters.append(d)
        self._run()
        return d

    def reconfigure(self, models: Sequence[ModelSpec], *, max_wait: float, max_queue: int,
                    collate: Optional[float] = None,
                    min_residency: Optional[float] = None, ttl: Optional[float] = None,
                    budgets: Optional[Mapping[str, int]] = None) -> None:
        """
        Apply a reloaded configuration.  Queued and in-flight requests of models
        that still exist are kept; waiters of removed models fail with
        :class:`ModelRemoved` (a :class:`ModelUnavailable`).  A model that leaves its group (removed,
        moved, made always_on) while resident keeps the slot until its
        in-flight requests end; the slot is unknown after that.  ``budgets``
        (``None``: unchanged) replaces every group's memory budget; nothing
        is evicted to fit a smaller one (see :meth:`Policy.set_budget`).
        """
        if budgets is not None:
            self.budgets = dict(budgets)
        self.max_wait = max_wait
        self.max_queue = max_queue
        if collate is not None:
            self.collate = collate
        if min_residency is not None:
            self.min_residency = min_residency
        if ttl is not None:
            self.ttl = ttl
        wanted = {spec.name for spec in models}
        for name in [n for n in self._models if n not in wanted]:
            m = self._models.pop(name)
            m.removed = True
            for w in m.take_live():
                self._fail_waiter(w, ModelRemoved(name, "model removed from configuration",
                                                  self.retry_backoff))
            if m.in_flight:
                self._retired[name] = m
            self.log.info("model {model} removed from configuration ({in_flight} in flight)",
                          model=name, in_flight=m.in_flight)
        self._install(models)
        for g in self._groups.values():
            self._dirty[g] = None
        for m in self._models.values():
            self._touch(m)
        self._run()

    # --- configuration -------------------------------------------------------------------------

    def _install(self, specs: Sequence[ModelSpec]) -> None:
        """(Re)build the name and group tables from ``specs``, keeping existing records."""
        ordered: dict[str, Model] = {}
        for spec in specs:
            m = self._models.get(spec.name)
            if m is None:
                m = self._retired.pop(spec.name, None)
                if m is not None:
                    m.removed = False
                else:
                    m = Model(spec, self._waiter_cancelled)
            m.spec = spec
            if spec.always_on:
                m.group = None
            else:
                g = self._groups.get(spec.group)
                if g is None:
                    g = self._groups[spec.group] = Group(spec.group, self.budgets.get(spec.group))
                m.group = g
            ordered[spec.name] = m
        self._models = ordered
        for g in self._groups.values():
            g.members = [m for m in ordered.values() if m.group is g]
            if g.budget != self.budgets.get(g.name):
                self.set_budget(g, self.budgets.get(g.name))
        for name in [n for n, g in self._groups.items()
                     if not g.members and g.resident is None and not g.residents
                     and not g.busy]:
            g = self._groups.pop(name)
            self._set_timer(g, None)
            self._cancel_swap_call(g)


    def __repr__(self) -> str:
        groups = ", ".join(
            f"{g.name}="
            + (f"{g.resident.name if g.resident else None}" if g.budget is None
               else "+".join(r.name for r in g.residents) or "()")
            + (f"->{g.swapping_to.name}" if g.swapping_to else "")
            for g in self._groups.values())
        return f"<Scheduler {groups} queued={sum(m.live for m in self._models.values())}>"
