"""
Which replica a request for a model served by replicas goes to (see
:mod:`jano.scheduler.replicas`), and how the replicas add up to the model
clients see.  Reads the scheduler's records; changes nothing.

The choice, among the replicas not refused:

1. one where the model is loaded with a free slot (in flight plus queued
   below its ``max_concurrency``);
2. else the least loaded one where it is loaded (in flight plus queued, per
   slot of ``max_concurrency``);
3. else one where it is being loaded now: a second load elsewhere would
   cost a swap for nothing;
4. else load it where that is cheapest: a group that can start the load now
   (no swap or unload running, its resident idle with nothing queued, or
   room in its memory budget) before one that cannot; then one where
   requests for it already wait (they will load it there anyway); then the
   smaller observed swap time (compared only when every candidate has one:
   an unknown is not taken for cheap or dear); then fewer requests of other
   models waiting in the group; then configuration order.

A replica whose group is swapping it out (or evicting it) counts as not
loaded: a request sent there would wait for the next load.

**Spreading** (``models[].spread``, off by default).  Rules 1 and 2 keep a hot
model on the replica that has it, however long its queue, while another GPU
may sit idle.  With ``spread``, when no replica holding the model has a free
slot (a holder whose group has another model's request waiting is passed over
while another replica holds the model), a request goes instead to a replica
where the model is being loaded, or starts a load on one whose group is idle
(nothing in flight, nothing queued, no swap running), if it would start
sooner there: the wait for a slot where
the model is, ``(queued + 1 - free slots) / slots x`` its mean service time,
against the load's observed mean time (plus the queue already waiting for
that load).  Nothing busy is evicted for it, and without observed times
(no request served, no load seen in either group) the rules above decide.

Ties go to the replica listed first.  A replica the scheduler refuses (a
failed swap, :meth:`~jano.scheduler.replicas.Replicas.mark_down`, ``lost``, a stall, an
unreachable server) is skipped, and so is a loaded one the health monitor
last found ``down`` or ``stalled``, unless no other is left: the probe is a
hint, the scheduler's refusal is what fails a request.  When every replica is
refused, admission fails as for a single model, with
:class:`~jano.errors.ModelUnavailable` (503) and the earliest time one is back.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from jano.records import HealthState, ModelState
from jano.scheduler.state import Model, memory_of

__all__ = ["HEALTH_RANK", "UNHEALTHY", "aggregate", "best", "is_loaded", "model_health"]

#: Health states that keep a loaded replica out of the choice while another is left.
UNHEALTHY: frozenset[str] = frozenset({"down", "stalled"})

#: A model's health from its replicas': the best of theirs, in this order.
HEALTH_RANK: tuple[HealthState, ...] = ("up", "loading", "unknown", "unloaded", "stalled", "down")


def is_loaded(m: Model) -> bool:
    """``m`` is loaded now, and not being unloaded, evicted or swapped out."""
    g = m.group
    if g is None:
        return not m.removed
    if g.unloading is m or m in g.evicting:
        return False
    if g.budget is None and g.swapping_to is not None and g.swapping_to is not m:
        return False  # still the resident until the swap ends, but on its way out
    return g.resident is m or m in g.residents


def _load(m: Model) -> float:
    return (m.in_flight + m.live) / max(1, m.spec.max_concurrency)


def _can_start(m: Model) -> bool:
    """A load of ``m`` could start in its group now, evicting no work."""
    g = m.group
    assert g is not None
    if g.busy:
        return False
    if g.budget is None:
        r = g.resident
        return (r is None or (r.in_flight == 0 and r.live == 0)) and not any(
            x.in_flight for x in g.residents)
    used = sum(memory_of(r, g.budget) for r in g.residents)
    if used + memory_of(m, g.budget) <= g.budget:
        return True
    return all(r.in_flight == 0 and r.live == 0 for r in g.residents)


def _others_waiting(m: Model) -> int:
    g = m.group
    assert g is not None
    return sum(x.live for x in g.members if x is not m)


def best(candidates: Sequence[Model]) -> Model:
    """The replica a request goes to, by the rules above; ``candidates`` in configuration order."""
    loaded = [m for m in candidates if is_loaded(m)]
    pending = [m for m in candidates if m.group is not None and m.group.swapping_to is m]
    if loaded:  # rules 1 and 2: a free slot means a load below 1
        if not loaded[0].spec.spread:
            return min(loaded, key=_load)
        # Spreading uses idle GPUs only: a replica whose group has requests of
        # other models waiting gets no more, so it drains and is handed back.
        here = min(loaded, key=lambda m: (_others_waiting(m) > 0, _load(m)))
        if _load(here) >= 1:
            return _spread(here, candidates, loaded, pending) or here
        return here
    if pending:
        return min(pending, key=_load)
    means = [m.group.swap_mean if m.group is not None else None for m in candidates]
    known = all(x is not None for x in means)
    ranked = sorted(range(len(candidates)), key=lambda i: (
        not _can_start(candidates[i]), not candidates[i].live, means[i] if known else 0.0,
        _others_waiting(candidates[i]), i))
    return candidates[ranked[0]]


def _slot_wait(m: Model, service: float) -> float:
    """Seconds until a slot of ``m`` is free for one more request, its queue served first."""
    slots = max(1, m.spec.max_concurrency)
    return max(0, m.in_flight + m.live + 1 - slots) / slots * service


def _idle(m: Model) -> bool:
    """Nothing of ``m``'s group is in flight, queued, or being swapped: a load there delays no one."""
    g = m.group
    return g is not None and not g.busy and all(x.in_flight == 0 and x.live == 0
                                                 for x in g.members)


def _spread(here: Model, candidates: Sequence[Model], loaded: Sequence[Model],
            pending: Sequence[Model]) -> Model | None:
    """The replica a request goes to instead of ``here`` (loaded, no free slot), or ``None``."""
    service = here.service_mean
    if service is None:
        return None
    stay = _slot_wait(here, service)
    best_cost, choice = stay, None
    for m in candidates:
        if m in loaded:
            continue
        g = m.group
        assert g is not None
        load = g.swap_mean if g.swap_mean is not None else (
            here.group.swap_mean if here.group is not None else None)
        if load is None:
            continue
        if m in pending:
            cost = load + _slot_wait(m, service)
        elif _idle(m):
            cost = load
        else:
            continue
        if cost < best_cost:
            best_cost, choice = cost, m
    return choice


def aggregate(name: str, states: Sequence[ModelState]) -> ModelState:
    """
    One model's state from its replicas': counts added up, loaded when one
    is, down only when all are (until the first is back).
    """
    down = [s for s in states if s.down_until is not None]
    first_back = min(down, key=lambda s: s.down_until or 0.0) if len(down) == len(states) else None
    means = [s.service_mean for s in states if s.service_mean is not None]
    loaded = [s for s in states if s.resident]
    unloads = [s.unload_at for s in loaded if s.unload_at is not None]
    return ModelState(
        name=name,
        group="+".join(s.group for s in states),
        always_on=all(s.always_on for s in states),
        queued=sum(s.queued for s in states),
        in_flight=sum(s.in_flight for s in states),
        oldest_queued_at=min((s.oldest_queued_at for s in states
                              if s.oldest_queued_at is not None), default=None),
        resident=bool(loaded),
        down_until=first_back.down_until if first_back is not None else None,
        down_reason=first_back.down_reason if first_back is not None else None,
        service_mean=sum(means) / len(means) if means else None,
        max_concurrency=sum(s.max_concurrency for s in states),
        unload_at=max(unloads) if loaded and len(unloads) == len(loaded) else None,
    )


def model_health(states: Mapping[str, HealthState], replicas: Sequence[str]) -> HealthState:
    """A model's health from its replicas' (``unknown`` for one not probed yet)."""
    found = {states.get(r, "unknown") for r in replicas}
    return next((h for h in HEALTH_RANK if h in found), "unknown")
