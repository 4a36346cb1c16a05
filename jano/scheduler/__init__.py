"""
Admission and ordering: which queued request may go to its model next.

One GPU holds one model at a time, unless it has a memory budget (see
*Groups with a memory budget* below).  Models that share a GPU form a *swap
group* (:attr:`jano.records.ModelSpec.group`) with one slot; exactly one of
them is *resident* (or nobody knows which, until the first swap).  Every
request waits in its model's FIFO queue until :meth:`Scheduler.admit`'s
Deferred fires with a :class:`Ticket`; the web layer then forwards it and calls
:meth:`Scheduler.release` when it ends.

The policy, per group:

- **Collate.**  While the resident model has waiters it gets them, up to its
  ``max_concurrency``, even ahead of older requests for other models: a burst
  ``A B A B A B`` with ``B`` resident costs one swap, not five.
- **Swap when idle.**  When the resident has nothing waiting and nothing in
  flight and others wait, the slot goes to the model whose oldest request has
  waited longest.
- **Starvation guard.**  Once the oldest request of another model in the group
  has waited ``max_wait``, the guard *engages*: the resident gets no request
  younger than that one, except the backlog it had when it was loaded (so a
  model swapped in always serves what it was swapped in for, and two starving
  models cannot bounce the slot between them without serving anyone).  When
  the resident's in-flight count reaches zero the slot goes, as above, to the
  model with the oldest waiter.  The guard stays engaged until the next swap
  of the group or until no other model waits.  A timer (``callLater``) wakes
  the group exactly when the guard is due; nothing polls.
- **Decide, then look once more.**  A swap starts one reactor turn after it
  is decided (``callLater(0)``), so a burst that arrives within one turn is
  seen whole: ``A B A B A B`` arriving while ``B`` is resident and idle costs
  one swap, not two.
- **Never evict.**  A swap starts only when the previous model has nothing in
  flight, never for a model with no live waiter, and never while another swap
  of the same group runs.  Groups are independent.

A failed swap leaves the slot unknown (the script may already have stopped the
previous model), fails every waiter of the target with
:class:`ModelUnavailable`, and marks the target down for ``retry_backoff``
seconds (or the ``retry_after`` its error carries), during which its
admissions fail fast; the group goes on serving the other models.  After the
backoff the next request retries the swap.

``always_on`` models live outside the groups: always resident, only bounded by
``max_concurrency`` and ``max_queue``.

Groups with a memory budget
---------------------------

A group given a budget (``budgets``: group name to MiB) holds any *set* of
residents whose :attr:`~jano.records.ModelSpec.memory` fits in it together.
A group without one behaves exactly as above.  Per budget group:

- **Residents serve at once.**  Every resident gets its waiters up to its
  ``max_concurrency``, also while another model of the group is being
  loaded or unloaded.
- **Load into free memory.**  A waiting model that is not resident is loaded
  as soon as it fits beside the residents, evicting nothing: no collation
  window, only the one turn of "decide, then look once more".
- **Else evict idle residents.**  Only residents with nothing in flight and
  nothing queued may be evicted, and only the best set that makes room:
  (1) the fewest models; (2) of those, the set whose most recently used
  member was used longest ago (then its next most recent member decides,
  and so on), where a model is *used* when it is loaded, handed a request or
  given one back; (3) the fewest MiB; (4) load order.  Such a load waits like
  a swap away from an idle resident: the collation window from when it was
  first wanted and the ``min_residency`` of each evicted model, never past
  ``max_wait`` of the loaded model's oldest request.  A request for a
  resident meanwhile is served, which takes it out of the set.
- **Else wait.**  If evicting every idle resident is not enough, the model
  waits until residents become idle.  The next load is for the waiting model
  with the oldest request *that can be loaded now*, so a younger model that
  fits goes ahead of an older one waiting for memory (the guard bounds that).
- **Starvation guard.**  Once the oldest request of a model that is neither
  resident nor being loaded has waited ``max_wait``, the guard engages (also
  while a load runs): no resident takes a request younger than that one,
  except the backlog it had when it was loaded; only that model may be loaded
  next; and for it, residents whose only waiters are the ones held back may
  be evicted too (when the idle ones are not enough: fewest such models
  first, then the order above), as the single resident is after a swap.
  Their requests then wait for their model to be loaded again.  The guard
  stays engaged until the next load starts or no such model waits.  So a
  stream of requests for the residents delays a model that needs their
  memory by at most ``max_wait``, the service time of their requests
  already dispatched and the load (plus, as in a one-model group, one visit
  of each other model that waits longer).
- **One at a time.**  One load or unload per group at a time.  A load calls
  ``swapper.swap(group, previous, target, evict=evicted)``: ``evicted`` lists
  the residents to stop first, least recently used first, and ``previous`` is
  its first (``None`` when nothing is evicted); a group without a budget is
  called without ``evict``.  The evicted leave the residents when the load
  starts, ``target`` joins them when it is ready.
- **Failures.**  A failed load marks the target down and fails its waiters
  as a failed swap does; the evicted models are not counted as loaded any
  more (they may or may not have stopped); the other residents stay.
- **Unloads.**  Each resident has its own TTL, from when it last became idle
  with nothing waiting for it; an unload (TTL or :meth:`Scheduler.unload`)
  and :meth:`Scheduler.lost` take only that model out of the residents.
- **Reconfiguration.**  A budget smaller than the residents evicts nothing by
  force: loads wait until enough residents went.  A resident that leaves the
  group (removed, moved, made always_on) stays counted until its requests in
  flight end.  A budget given to a one-model group keeps its resident; when
  a budget is taken away, a sole resident stays the resident, and several
  are waited for until none has requests in flight, the slot unknown after.
- A model that states no ``memory`` takes the whole budget; one larger than
  the budget fails its waiters (configuration checks prevent both).
- ``Ticket.waited_for_swap`` is true when the request's own model was loaded
  between its arrival and its dispatch.

Replicas
--------

A model may be served by several *replicas* (two GPUs, two hosts): each is a
model of its own here (``qwen-chat@host-a``, in its own group), and
:class:`~jano.scheduler.replicas.Replicas`, on top of the scheduler with the
same seam, sends each request to one of them (loaded and least busy first),
and queues it again on another when its replica becomes unavailable.  The
rules, and what they do to the wait bound, are in
:mod:`jano.scheduler.replicas`.

Time comes only from the injected clock.  Waiter Deferreds are fired only from
one loop (:meth:`jano.scheduler.policy.Policy._run`) after the state they
depend on is complete, so callbacks may re-enter ``admit``/``release``/``cancel``
freely.

The package reads bottom-up: :mod:`~jano.scheduler.state` holds the records
(tickets, waiters, models, groups) and the estimates and views drawn from
them; :mod:`~jano.scheduler.swaps` runs swaps and unloads;
:mod:`~jano.scheduler.budget` plans groups with a memory budget and chooses
what to evict; :mod:`~jano.scheduler.policy` plans the other groups and
carries the decisions out from the loop; :mod:`~jano.scheduler.core` adds the
seam and the configuration; :mod:`~jano.scheduler.replicas` maps a model
served by replicas to one of them.
"""

from __future__ import annotations

from jano.errors import Draining, ModelUnavailable, QueueFull
from jano.interfaces import Swapper
from jano.records import Ticket
from jano.scheduler.core import Scheduler
from jano.scheduler.replicas import Replicas
from jano.scheduler.state import (
    DEFAULT_RETRY_AFTER,
    EWMA_WEIGHT,
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
)

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "Draining",
    "EWMA_WEIGHT",
    "ModelUnavailable",
    "QueueFull",
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "Replicas",
    "Scheduler",
    "Swapper",
    "Ticket",
]
