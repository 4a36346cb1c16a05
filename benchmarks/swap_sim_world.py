"""
The simulated world of ``swap_sim.py``: a twisted ``Clock``, a swapper whose
loads take a fixed time, and the life of each request (arrive, wait for
admission, hold a slot for its service time, release).

Shared by ``swap_sim.py`` (one swap group, four ordering policies) and
``swap_sim_gpus.py`` (memory budgets and two GPUs); nothing here draws a
random number.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

try:
    import jano  # noqa: F401
except ImportError:  # running as ``python benchmarks/swap_sim.py`` from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jano.records import ModelSpec, SwapEvent  # noqa: E402
from jano.scheduler import Ticket  # noqa: E402

__all__ = ["Admission", "Done", "Sim", "TimedSwapper", "Trace", "open_trace", "percentile",
           "service_times", "table"]


class Admission(Protocol):
    def admit(self, model: str) -> Deferred[Ticket]: ...

    def release(self, ticket: Ticket) -> None: ...


class TimedSwapper:
    """
    A swap (a load) that takes exactly ``cost`` simulated seconds and always
    works, whatever the size of the model; an unload takes ``cost / 10``.

    ``evicted`` lists every model a load stopped, in order: the ``evict``
    set of a group with a memory budget, else the known previous resident.
    """

    def __init__(self, clock: Clock, cost: float) -> None:
        self.clock = clock
        self.cost = cost
        self.evicted: list[str] = []

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = ()) -> Deferred[None]:
        if evict:
            self.evicted += [m.name for m in evict]
        elif previous is not None:
            self.evicted.append(previous.name)
        d: Deferred[None] = Deferred()
        self.clock.callLater(self.cost, d.callback, None)
        return d

    def unload(self, group: str, model: ModelSpec) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.clock.callLater(self.cost / 10, d.callback, None)
        return d


@dataclass
class Done:
    model: str
    arrived: float
    dispatched: float
    finished: float
    #: The swap group of the instance that served it (``None``: not told).
    group: Optional[str] = None

    @property
    def wait(self) -> float:
        return self.dispatched - self.arrived


@dataclass
class Sim:
    """A clock, one admission policy, and what happened to every request."""

    clock: Clock
    #: The model loaded at t=0 (``None``: the slot is unknown).
    initial: Optional[str] = None
    admission: Admission = field(init=False)
    swaps: list[SwapEvent] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)

    def resident(self) -> Optional[str]:
        """The model loaded after the last swap that ended (all of them succeed here)."""
        return self.swaps[-1].to_model if self.swaps else self.initial

    def submit(self, model: str, service: float,
               then: Optional[Callable[[], None]] = None) -> None:
        """Send a request now; it holds its slot ``service`` seconds, then ``then()`` runs."""
        arrived = self.clock.seconds()

        def start(ticket: Ticket) -> None:
            dispatched = self.clock.seconds()

            def finish() -> None:
                self.admission.release(ticket)
                by = ticket.served_by
                self.done.append(Done(model, arrived, dispatched, self.clock.seconds(),
                                      by.group if by is not None else None))
                if then is not None:
                    then()

            self.clock.callLater(service, finish)

        self.admission.admit(model).addCallback(start)

    def run(self) -> None:
        """Advance the clock from timer to timer until nothing is scheduled."""
        while True:
            calls = self.clock.getDelayedCalls()
            if not calls:
                return
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))


#: A trace schedules its requests on a Sim; it must draw nothing random itself.
Trace = Callable[[Sim], None]


def service_times(rng: random.Random, n: int, mean: float) -> list[float]:
    return [mean * rng.uniform(0.5, 1.5) for _ in range(n)]


def open_trace(arrivals: Sequence[tuple[float, str]], services: Sequence[float]) -> Trace:
    """Requests sent at fixed times, whatever happened to the earlier ones."""
    def schedule(sim: Sim) -> None:
        for (at, model), service in zip(arrivals, services):
            sim.clock.callLater(at, sim.submit, model, service)
    return schedule


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def table(head: Sequence[str], rows: Sequence[Sequence[str]], text: Sequence[int]) -> str:
    """A Markdown table; the columns in ``text`` are left-aligned, the others are numbers."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i in text else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i in text else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])

