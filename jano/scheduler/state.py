"""
The scheduler's records: the :class:`Ticket` it hands out, and the mutable
records it keeps of each waiter, model and swap group, with the estimates and
views computed from them.

Only :class:`Ticket` and the constants are public (re-exported by
:mod:`jano.scheduler`); the records are the scheduler's own.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Literal, Mapping, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from jano.records import GroupState, ModelSpec, ModelState, Ticket, public_url

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "EWMA_WEIGHT",
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "Group",
    "Key",
    "Model",
    "Ticket",
    "Waiter",
    "WaiterState",
    "ewma",
    "group_state",
    "memory_of",
    "model_state",
    "estimate_retry_after",
]

#: Retry-After (seconds) for :class:`QueueFull` before any service time was observed.
DEFAULT_RETRY_AFTER = 5.0
#: Bounds of every Retry-After estimate (seconds).
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 600.0
#: Weight of the newest observation in the running means of service and swap times.
EWMA_WEIGHT = 0.2


# --- internal state ----------------------------------------------------------------------

WaiterState = Literal["queued", "dispatching", "failing", "done", "cancelled"]
#: Total order of arrivals: arrival time, then admission sequence number.
Key = tuple[float, int]


class Waiter:
    """One queued request: its Ticket-to-be and the Deferred the caller holds."""

    __slots__ = ("model", "ticket", "seq", "deferred", "state", "group", "swap_mark", "load_mark",
                 "error")

    def __init__(self, model: Model, ticket: Ticket, seq: int,
                 group: Optional[Group]) -> None:
        self.model = model
        self.ticket = ticket
        self.seq = seq
        self.deferred: Deferred[Ticket] = Deferred(self._cancel)
        self.state: WaiterState = "queued"
        self.group = group
        #: ``group.swaps_started`` at arrival, minus one if a swap was running then.
        self.swap_mark = 0
        #: ``model.loads`` at arrival, minus one if the model was being loaded then
        #: (what ``waited_for_swap`` means in a group with a memory budget).
        self.load_mark = model.loads
        if group is not None:
            self.swap_mark = group.swaps_started - (1 if group.busy else 0)
            if group.swapping_to is model:
                self.load_mark -= 1
        self.error: Optional[Exception] = None

    @property
    def key(self) -> Key:
        return (self.ticket.arrived_at, self.seq)

    def _cancel(self, _: Deferred[Ticket]) -> None:
        self.model.on_cancel(self)


class Model:
    """The scheduler's mutable record of one model."""

    __slots__ = ("on_cancel", "spec", "queue", "live", "in_flight", "group", "down_until",
                 "down_reason", "removed", "service_mean", "loads", "loaded_at", "load_seq",
                 "last_used", "idle_since", "ttl_call")

    def __init__(self, spec: ModelSpec, on_cancel: Callable[[Waiter], None]) -> None:
        #: Called when the caller cancels a waiter's Deferred (the scheduler's bookkeeping).
        self.on_cancel = on_cancel
        self.spec = spec
        #: FIFO of waiters; cancelled ones stay until they reach the head (lazy removal).
        self.queue: deque[Waiter] = deque()
        #: Waiters in ``queue`` that are still ``queued``.
        self.live = 0
        self.in_flight = 0
        #: ``None`` for always_on models.
        self.group: Optional[Group] = None
        self.down_until: Optional[float] = None
        self.down_reason: Optional[str] = None
        #: No longer configured; kept only while requests are in flight.
        self.removed = False
        self.service_mean: Optional[float] = None
        #: Loads of this model started (the ``waited_for_swap`` mark of a budget group).
        self.loads = 0
        # As a resident of a group with a memory budget, where each resident has
        # what a one-model group keeps on the group (``Group.loaded_at``, ...):
        self.loaded_at: Optional[float] = None
        self.load_seq = 0
        #: When it was last loaded, handed a request or given one back (the LRU order).
        self.last_used: Optional[float] = None
        self.idle_since: Optional[float] = None
        self.ttl_call: Optional[IDelayedCall] = None

    @property
    def name(self) -> str:
        return self.spec.name

    def head(self) -> Optional[Waiter]:
        """The oldest live waiter, dropping cancelled ones from the front."""
        q = self.queue
        while q and q[0].state != "queued":
            q.popleft()
        return q[0] if q else None

    def forget_cancelled(self) -> None:
        """Keep the deque within a constant factor of the live count (amortised O(1))."""
        if self.live == 0:
            self.queue.clear()
        elif len(self.queue) > 2 * self.live + 16:
            self.queue = deque(w for w in self.queue if w.state == "queued")

    def take_live(self) -> list[Waiter]:
        """Remove and return every live waiter."""
        waiters = [w for w in self.queue if w.state == "queued"]
        self.queue.clear()
        self.live = 0
        return waiters


class Group:
    """One swap group's slot."""

    __slots__ = ("name", "members", "resident", "loaded_at", "load_seq", "swapping_to",
                 "swap_started_at", "swap_token", "swaps_started", "latch", "timer",
                 "swap_mean", "swap_call", "swap_ready", "want_since", "unloading",
                 "idle_since", "ttl_call", "budget", "residents", "evicting")

    def __init__(self, name: str, budget: Optional[int] = None) -> None:
        self.name = name
        #: MiB the group's models may use together (``None``: one model at a time).
        self.budget = budget
        #: With a budget: the loaded models, in load order (``resident`` stays
        #: ``None``).  Without one: models left loaded when a budget was removed,
        #: waited for until idle, then forgotten.
        self.residents: list[Model] = []
        #: With a budget: the residents the running load stops first.
        self.evicting: tuple[Model, ...] = ()
        #: Swappable, configured models of this group, in configuration order.
        self.members: list[Model] = []
        #: May name a model that left the group (removed, moved, made always_on)
        #: while it still has requests in flight; the slot becomes unknown after.
        self.resident: Optional[Model] = None
        self.loaded_at: Optional[float] = None
        #: Waiters with a smaller sequence number were queued when the resident
        #: was loaded: its backlog, which the starvation guard never holds back.
        self.load_seq = 0
        self.swapping_to: Optional[Model] = None
        self.swap_started_at: Optional[float] = None
        self.swap_token = 0
        self.swaps_started = 0
        #: Key of the overdue waiter that engaged the starvation guard.
        self.latch: Optional[Key] = None
        self.timer: Optional[IDelayedCall] = None
        self.swap_mean: Optional[float] = None
        #: The one-turn delay between deciding a swap and starting it.
        self.swap_call: Optional[IDelayedCall] = None
        self.swap_ready = False
        #: Since when the resident has been idle while another model waits (the
        #: collation window runs from here); ``None`` while that is not so.
        self.want_since: Optional[float] = None
        #: The resident being unloaded (the slot is empty once it is done).
        self.unloading: Optional[Model] = None
        #: Since when the resident has had nothing queued or in flight (its TTL runs from here).
        self.idle_since: Optional[float] = None
        self.ttl_call: Optional[IDelayedCall] = None

    @property
    def busy(self) -> bool:
        """A swap or an unload runs."""
        return self.swapping_to is not None or self.unloading is not None

    def holds(self, m: Model) -> bool:
        """``m`` is loaded in this group (one of the residents, with a budget)."""
        if self.budget is not None:
            return m in self.residents
        return self.resident is m


# --- estimates and views -----------------------------------------------------------------



class _TtlHolder(Protocol):
    idle_since: Optional[float]
    ttl_call: Optional[IDelayedCall]


def step_ttl_timer(holder: _TtlHolder, ttl: float, now: Optional[float], clock: IReactorTime,
                   due: Callable[..., None], *args: object) -> None:
    """
    Keep ``holder``'s idle-unload timer in step: idle with nothing waiting
    since ``now`` (``None``: it is not) and ``ttl`` seconds allowed (0: no
    timer); ``due(*args)`` runs when the time is up.
    """
    if not ttl:
        holder.idle_since = None
        if holder.ttl_call is not None:
            if holder.ttl_call.active():
                holder.ttl_call.cancel()
            holder.ttl_call = None
        return
    if holder.idle_since is None:
        assert now is not None
        holder.idle_since = now
    when = holder.idle_since + ttl
    call = holder.ttl_call
    if call is not None and call.active() and call.getTime() == when:
        return
    if call is not None and call.active():
        call.cancel()
    holder.ttl_call = clock.callLater(max(0.0, when - clock.seconds()), due, *args)

def ewma(mean: Optional[float], value: float) -> float:
    return value if mean is None else mean + EWMA_WEIGHT * (value - mean)


def estimate_retry_after(m: Model) -> float:
    """
    Seconds until a full queue has likely room again: the queue's work at
    the observed mean service time spread over ``max_concurrency`` slots,
    plus the observed mean swap time when the model is not resident.
    :data:`DEFAULT_RETRY_AFTER` until a service time was observed; clamped
    to [:data:`RETRY_AFTER_MIN`, :data:`RETRY_AFTER_MAX`].
    """
    if m.service_mean is None:
        return DEFAULT_RETRY_AFTER
    estimate = m.live * m.service_mean / max(1, m.spec.max_concurrency)
    g = m.group
    if g is not None and not g.holds(m):
        estimate += g.swap_mean if g.swap_mean is not None else DEFAULT_RETRY_AFTER
    return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, estimate))


def memory_of(m: Model, budget: int) -> int:
    """MiB ``m`` takes in a group with ``budget``; one that states none needs all of it."""
    memory = m.spec.memory
    return budget if memory is None else memory


def model_state(m: Model, now: float, residents: set[int],
                unload_at: Optional[float] = None) -> ModelState:
    """
    What telemetry shows of ``m``; ``residents`` holds the ``id`` of every
    loaded model of every group; ``unload_at``: when its TTL unloads it.
    """
    down = m.down_until is not None and now < m.down_until
    head = m.head()
    spec = m.spec
    return ModelState(
        name=spec.name,
        group=spec.group,
        always_on=spec.always_on,
        queued=m.live,
        in_flight=m.in_flight,
        oldest_queued_at=head.ticket.arrived_at if head is not None else None,
        resident=(spec.always_on and not m.removed) or id(m) in residents,
        down_until=m.down_until if down else None,
        down_reason=m.down_reason if down else None,
        service_mean=m.service_mean,
        max_concurrency=spec.max_concurrency,
        unload_at=unload_at,
        serves=spec.serves,
        upstream=public_url(spec.upstream) if spec.serves is not None else None,
    )


def group_state(g: Group, unload_at: Mapping[int, float]) -> GroupState:
    """What telemetry shows of ``g``; ``unload_at``: each idle resident's (by ``id``) TTL."""
    if g.budget is None:
        resident = g.resident
        loaded_at = g.loaded_at
        residents = [r for r in g.residents if r is not resident]
        residents += [resident] if resident is not None else []
        used = None
    else:
        resident = g.residents[-1] if g.residents else None
        loaded_at = resident.loaded_at if resident is not None else None
        residents = g.residents
        used = sum(memory_of(r, g.budget) for r in residents)
    dues = [unload_at[id(r)] for r in residents if id(r) in unload_at]
    return GroupState(
        name=g.name,
        resident=resident.name if resident is not None else None,
        loaded_at=loaded_at,
        swapping_to=g.swapping_to.name if g.swapping_to is not None else None,
        swap_started_at=g.swap_started_at,
        unloading=g.unloading.name if g.unloading is not None else None,
        unload_at=min(dues) if dues else None,
        swap_mean=g.swap_mean,
        residents=tuple(r.name for r in residents),
        memory_budget=g.budget,
        memory_used=used,
        evicting=tuple(e.name for e in g.evicting),
    )
