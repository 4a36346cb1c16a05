"""
Replay request traces under a simulated clock and compare ordering policies.

Run from the checkout::

    PYTHONPATH=. python benchmarks/swap_sim.py --swap-cost 20 --service 4 --max-wait 60 --seed 1

Everything runs on a ``twisted.internet.task.Clock``: a swap takes exactly
``--swap-cost`` seconds, a request holds its slot for its service time (drawn
once per request, ``--service`` x uniform(0.5, 1.5), the same draw for every
policy), and a model serves ``--concurrency`` requests at a time.  Waits are
from arrival to dispatch.  The output is a Markdown table.

Policies:

- ``jano``: the real :class:`jano.scheduler.Scheduler` with ``--max-wait``.
- ``no-guard``: the same real Scheduler with ``max_wait=inf``: collation with
  no starvation guard.
- ``fifo``: *not* Jano code; a tiny reference simulator in this file: one
  queue per group in arrival order, the head goes first, and every change of
  model along that order costs a swap (after the previous model drains).

Traces (one swap group, slot unknown at the start):

- ``mixed-burst``: 60 requests for three models, interleaved, arriving within 2 s.
- ``agentic``: six agents starting within a minute, each running three
  planner -> coder -> reviewer chains (half of them with one more coder ->
  reviewer round); each step is sent when the previous one answered, after
  1-15 s of tool use.  Closed loop: the policy shapes the arrivals.
- ``heavy+light``: a heavy model kept busy by a steady stream (one request
  every 1-2 s for 300 s, about 2/3 of its capacity, so it never goes idle) and
  a light model asked every 30-50 s: without the guard, the light model waits
  for the stream to end.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections import deque
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
from jano.scheduler import Scheduler, Ticket  # noqa: E402

GROUP = "gpu"


# --- the policies behind one seam --------------------------------------------------------------


class Admission(Protocol):
    def admit(self, model: str) -> Deferred[Ticket]: ...

    def release(self, ticket: Ticket) -> None: ...


class TimedSwapper:
    """A swap that takes exactly ``cost`` simulated seconds and always works."""

    def __init__(self, clock: Clock, cost: float) -> None:
        self.clock = clock
        self.cost = cost

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.clock.callLater(self.cost, d.callback, None)
        return d


class Fifo:
    """
    Reference FIFO (not Jano): strict arrival order per group; consecutive
    requests for the loaded model run concurrently up to its slots; the next
    different model is swapped in once the loaded one has drained.
    """

    def __init__(self, models: Sequence[ModelSpec], clock: Clock, swap_cost: float,
                 on_swap: Callable[[SwapEvent], None]) -> None:
        self.specs = {m.name: m for m in models}
        self.clock = clock
        self.swap_cost = swap_cost
        self.on_swap = on_swap
        self.queue: deque[tuple[Ticket, Deferred[Ticket]]] = deque()
        self.resident: Optional[str] = None
        self.in_flight = 0
        self.swapping = False
        self.swaps_started = 0

    def admit(self, model: str) -> Deferred[Ticket]:
        d: Deferred[Ticket] = Deferred()
        self.queue.append((Ticket(model, self.clock.seconds()), d))
        self._pump()
        return d

    def release(self, ticket: Ticket) -> None:
        self.in_flight -= 1
        self._pump()

    def _pump(self) -> None:
        while self.queue and not self.swapping:
            ticket, d = self.queue[0]
            if ticket.model == self.resident:
                if self.in_flight >= self.specs[ticket.model].max_concurrency:
                    return
                self.queue.popleft()
                self.in_flight += 1
                ticket.dispatched_at = self.clock.seconds()
                d.callback(ticket)
            elif self.in_flight == 0:
                self._swap(ticket.model)
            else:
                return

    def _swap(self, target: str) -> None:
        self.swapping = True
        started = self.clock.seconds()
        previous = self.resident

        def done() -> None:
            self.swapping = False
            self.resident = target
            self.on_swap(SwapEvent(GROUP, previous, target, started, self.swap_cost, "ok"))
            self._pump()

        self.clock.callLater(self.swap_cost, done)


# --- one simulated run ------------------------------------------------------------------------


@dataclass
class Done:
    model: str
    arrived: float
    dispatched: float
    finished: float


@dataclass
class Sim:
    """A clock, one admission policy, and what happened to every request."""

    clock: Clock
    admission: Admission = field(init=False)
    swaps: list[SwapEvent] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)

    def submit(self, model: str, service: float,
               then: Optional[Callable[[], None]] = None) -> None:
        arrived = self.clock.seconds()

        def start(ticket: Ticket) -> None:
            dispatched = self.clock.seconds()

            def finish() -> None:
                self.admission.release(ticket)
                self.done.append(Done(model, arrived, dispatched, self.clock.seconds()))
                if then is not None:
                    then()

            self.clock.callLater(service, finish)

        self.admission.admit(model).addCallback(start)

    def run(self) -> None:
        while True:
            calls = self.clock.getDelayedCalls()
            if not calls:
                return
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))


def make_sim(policy: str, models: Sequence[ModelSpec], swap_cost: float, max_wait: float) -> Sim:
    clock = Clock()
    sim = Sim(clock)
    if policy == "fifo":
        sim.admission = Fifo(models, clock, swap_cost, sim.swaps.append)
    else:
        sim.admission = Scheduler(models, TimedSwapper(clock, swap_cost), clock,
                                  max_wait=math.inf if policy == "no-guard" else max_wait,
                                  max_queue=10_000, on_swap=sim.swaps.append)
    return sim


# --- traces -----------------------------------------------------------------------------------

#: A trace schedules its requests on a Sim; it must draw nothing random itself.
Trace = Callable[[Sim], None]


def service_times(rng: random.Random, n: int, mean: float) -> list[float]:
    return [mean * rng.uniform(0.5, 1.5) for _ in range(n)]


def open_trace(arrivals: Sequence[tuple[float, str]], services: Sequence[float]) -> Trace:
    def schedule(sim: Sim) -> None:
        for (at, model), service in zip(arrivals, services):
            sim.clock.callLater(at, sim.submit, model, service)
    return schedule


def mixed_burst(rng: random.Random, service: float) -> tuple[list[str], Trace]:
    models = ["chat", "code", "vision"]
    times = sorted(rng.uniform(0.0, 2.0) for _ in range(60))
    arrivals = [(t, models[i % 3]) for i, t in enumerate(times)]
    return models, open_trace(arrivals, service_times(rng, 60, service))


def agentic(rng: random.Random, service: float) -> tuple[list[str], Trace]:
    agents, chains = 6, 3
    plans: list[list[str]] = []
    for _ in range(agents):
        steps: list[str] = []
        for _ in range(chains):
            steps += ["planner", "coder", "reviewer"]
            if rng.random() < 0.5:  # the reviewer sends it back once
                steps += ["coder", "reviewer"]
        plans.append(steps)
    starts = [rng.uniform(0.0, 60.0) for _ in range(agents)]
    thinks = [[rng.uniform(1.0, 15.0) for _ in steps] for steps in plans]
    services = [service_times(rng, len(steps), service) for steps in plans]

    def schedule(sim: Sim) -> None:
        def step(agent: int, j: int) -> None:
            if j == len(plans[agent]):
                return

            def send() -> None:
                sim.submit(plans[agent][j], services[agent][j], lambda: step(agent, j + 1))

            sim.clock.callLater(thinks[agent][j], send)

        for agent in range(agents):
            sim.clock.callLater(starts[agent], step, agent, 0)

    return ["planner", "coder", "reviewer"], schedule


def heavy_light(rng: random.Random, service: float) -> tuple[list[str], Trace]:
    arrivals: list[tuple[float, str]] = []
    t = 0.0
    while t < 300.0:
        arrivals.append((t, "heavy"))
        t += rng.uniform(1.0, 2.0)
    t = rng.uniform(5.0, 40.0)
    while t < 300.0:
        arrivals.append((t, "light"))
        t += rng.uniform(30.0, 50.0)
    arrivals.sort()
    return ["heavy", "light"], open_trace(arrivals, service_times(rng, len(arrivals), service))


SCENARIOS: dict[str, Callable[[random.Random, float], tuple[list[str], Trace]]] = {
    "mixed-burst": mixed_burst,
    "agentic": agentic,
    "heavy+light": heavy_light,
}
POLICIES = ("jano", "fifo", "no-guard")


# --- report -----------------------------------------------------------------------------------


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def simulate(scenario: str, policy: str, args: argparse.Namespace) -> list[str]:
    rng = random.Random(f"{args.seed}:{scenario}")  # the same trace for every policy
    names, trace = SCENARIOS[scenario](rng, args.service)
    models = [ModelSpec(n, f"http://127.0.0.1:{9000 + i}", max_concurrency=args.concurrency,
                        group=GROUP) for i, n in enumerate(names)]
    sim = make_sim(policy, models, args.swap_cost, args.max_wait)
    trace(sim)
    sim.run()
    waits = [d.dispatched - d.arrived for d in sim.done]
    makespan = max(d.finished for d in sim.done) - min(d.arrived for d in sim.done)
    per_model = " / ".join(
        f"{n} {max(d.dispatched - d.arrived for d in sim.done if d.model == n):.0f}"
        for n in names)
    return [scenario, policy, str(len(sim.done)), str(len(sim.swaps)), f"{makespan:.1f}",
            f"{sum(waits) / len(waits):.1f}", f"{p99(waits):.1f}", f"{max(waits):.1f}",
            per_model]


def table(rows: Sequence[Sequence[str]]) -> str:
    head = ["scenario", "policy", "requests", "swaps", "makespan s", "mean wait s",
            "p99 wait s", "max wait s", "max wait by model s"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < 2 or i == 8 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if 2 <= i < 8 else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swap-cost", type=float, default=20.0, help="seconds per swap (20)")
    parser.add_argument("--service", type=float, default=4.0,
                        help="mean service time in seconds (4)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="Jano's starvation guard in seconds (60)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="requests a model serves at once (4)")
    parser.add_argument("--seed", type=int, default=1, help="trace seed (1)")
    args = parser.parse_args(argv)
    rows = [simulate(s, p, args) for s in SCENARIOS for p in POLICIES]
    print(f"swap cost {args.swap_cost:g}s, service {args.service:g}s x U(0.5,1.5), "
          f"concurrency {args.concurrency}, max_wait {args.max_wait:g}s, seed {args.seed}\n")
    print(table(rows))
    print("\njano: the real Scheduler.  no-guard: the real Scheduler with max_wait=inf.  "
          "fifo: a reference simulator in this file (strict arrival order, one swap per model "
          "change), not Jano code.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
