"""
``GET /queue``: every request Jano holds, where it stands, and an estimate of
when a waiting one will start.

The estimate is labelled as one.  For a waiting request of model M at
position p (1 = next) it counts the requests ahead of it for M (``p - 1``
queued plus M's in flight), in rounds of M's ``max_concurrency``, times M's
observed mean service time; plus the group's observed mean swap time when M
is not resident (and not being loaded).  It ignores other models' turns
(the starvation guard may put one first) and is ``null`` until Jano has
observed the service time (and the swap time, when one is needed): Jano
never makes a number up.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from jano.records import GroupState, LiveRequest, ModelState, SchedulerSnapshot, iso, ms

__all__ = ["queue_body"]


def queue_body(live: Sequence[LiveRequest], snap: SchedulerSnapshot,
               now: float) -> dict[str, object]:
    models = {m.name: m for m in snap.models}
    groups = {g.name: g for g in snap.groups}
    position: dict[str, int] = {}
    entries: list[dict[str, object]] = []
    for r in sorted(live, key=lambda r: (r.arrived_at, r.id)):
        entry: dict[str, object] = {
            "id": r.id, "model": r.model, "caller": r.caller, "arrivedAt": iso(r.arrived_at),
        }
        if r.phase == "queued":
            pos = position[r.model] = position.get(r.model, 0) + 1
            m = models.get(r.model)
            start = _estimate(m, groups, pos, now) if m is not None else None
            entry.update(state="waiting", position=pos, waitedMs=ms(now - r.arrived_at),
                         estimatedStartAt=iso(start), estimated=True)
        else:
            waited = r.dispatched_at - r.arrived_at if r.dispatched_at is not None else None
            entry.update(state="in_flight", phase=r.phase, position=None, waitedMs=ms(waited),
                         runningMs=ms(now - r.dispatched_at) if r.dispatched_at is not None
                         else None)
        entries.append(entry)
    return {"data": entries, "waiting": sum(position.values()),
            "inFlight": len(entries) - sum(position.values())}


def _estimate(m: ModelState, groups: Mapping[str, GroupState], position: int,
              now: float) -> Optional[float]:
    if m.service_mean is None:
        return None
    ahead = position - 1 + m.in_flight
    wait = (ahead // max(1, m.max_concurrency)) * m.service_mean
    if not m.resident:
        g = groups.get(m.group)
        swap_mean = g.swap_mean if g is not None else None
        loading = g is not None and g.swapping_to == m.name
        if not loading:
            if swap_mean is None:
                return None
            wait += swap_mean
    return now + wait
