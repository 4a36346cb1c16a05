"""
Admission and ordering: which queued request may go to its model next.

One GPU holds one model at a time.  Models that share a GPU form a *swap
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
seconds, during which its admissions fail fast; the group goes on serving the
other models.  After the backoff the next request retries the swap.

``always_on`` models live outside the groups: always resident, only bounded by
``max_concurrency`` and ``max_queue``.

Time comes only from the injected clock.  Waiter Deferreds are fired only from
one loop (:meth:`jano.scheduler.policy.Policy._run`) after the state they
depend on is complete, so callbacks may re-enter ``admit``/``release``/``cancel``
freely.

The package reads bottom-up: :mod:`~jano.scheduler.state` holds the records
(tickets, waiters, models, groups) and the estimates drawn from them;
:mod:`~jano.scheduler.policy` plans each group and carries the decisions out
from the loop; :mod:`~jano.scheduler.core` adds the seam and the configuration.
"""

from __future__ import annotations

from jano.errors import Draining, ModelUnavailable, QueueFull
from jano.interfaces import Swapper
from jano.records import Ticket
from jano.scheduler.core import Scheduler
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
    "Scheduler",
    "Swapper",
    "Ticket",
]
