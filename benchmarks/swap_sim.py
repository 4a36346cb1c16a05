"""
Replay request traces under a simulated clock and compare ordering policies,
memory budgets and GPU layouts.

Run from the checkout::

    PYTHONPATH=. python benchmarks/swap_sim.py --swap-cost 20 --service 4 --max-wait 60 --seed 1

(those are the defaults, as is ``--collate 0.25``; ``--only a,b`` runs only
the scenarios named).  It prints two Markdown tables: the policies below on
one swap group, then the layouts of ``swap_sim_gpus.py`` (a 24 GiB memory
budget against one model per GPU, two GPUs against one, replicas), whose
docstring describes those traces.  The same arguments print the same tables.

Everything runs on a ``twisted.internet.task.Clock`` (``swap_sim_world.py``):
a swap takes exactly ``--swap-cost`` seconds, a request holds its slot for its
service time (drawn once per request, the same draw for every policy:
``--service`` x uniform(0.5, 1.5), except in the jitter traces), and a model
serves ``--concurrency`` requests at a time.  Waits are from arrival to
dispatch.

Policies (first table):

- ``fifo``: *not* Jano code; a tiny reference simulator in this file: one
  queue per group in arrival order, the head goes first, and every change of
  model along that order costs a swap (after the previous model drains).
- ``no-guard``: the real :class:`jano.scheduler.Scheduler` with
  ``max_wait=inf`` and ``collate=--collate``: collation with no starvation
  guard.
- ``jano-collate0``: the real Scheduler with ``--max-wait`` and
  ``collate=0``: a swap away from an idle resident is decided one reactor
  turn after it is wanted (the behaviour before collation windows).
- ``jano``: the real Scheduler with ``--max-wait`` and ``collate=--collate``
  (0.25 s, the production default ``scheduler.collate``): a swap away from an
  idle resident is held that long, and requests for the resident arriving
  meanwhile are served first.

Traces, each in one swap group.  The slot is unknown at the start of these
three (every policy begins with a swap, and a collation window needs a known
resident, so ``collate`` only matters here after the first swap):

- ``mixed-burst``: 60 requests for three models, interleaved, arriving within 2 s.
- ``agentic``: six agents starting within a minute, each running three
  planner -> coder -> reviewer chains (half of them with one more coder ->
  reviewer round); each step is sent when the previous one answered, after
  1-15 s of tool use.  Closed loop: the policy shapes the arrivals.
- ``heavy+light``: a heavy model kept busy by a steady stream (one request
  every 1-2 s for 300 s, about 2/3 of its capacity, so it never goes idle) and
  a light model asked every 30-50 s: without the guard, the light model waits
  for the stream to end.

Jittered traces: the resident is known (``initial`` for the Scheduler, the
same model loaded in ``fifo``) and idle when each burst begins.  Ten bursts of
eight requests alternating between the two models, led by the one that is
*not* resident when the burst begins: ``beta alpha beta alpha ...`` with
``alpha`` resident.  Which model that is depends on the swaps the policy made
so far, so the labels may differ between policies; the arrival times and
service times do not.  Service times are uniform(5 ms, 50 ms), whatever
``--service`` says.  Bursts begin ``10 x (--swap-cost + 1)`` seconds apart,
long enough for even ``fifo``'s eight swaps to drain first.

- ``jitter-uniform``: arrival offsets within a burst uniform in [0, 50 ms],
  sorted.
- ``jitter-poisson``: the first request at the burst start, then gaps
  exponential with mean 10 ms (a Poisson process).

One swap per burst is the least any policy can do; ``jano-collate0`` swaps
away on the first request for the other model and has to swap back for the
resident's requests that arrive during that swap; ``fifo`` swaps at every
request.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import deque
from typing import Callable, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

import swap_sim_gpus
from swap_sim_world import (Sim, TimedSwapper, Trace, open_trace, percentile, service_times,
                            table)  # it puts the checkout on sys.path if needed

from jano.records import ModelSpec, SwapEvent
from jano.scheduler import Scheduler, Ticket

GROUP = "gpu"


# --- the fifo reference ------------------------------------------------------------------------


class Fifo:
    """
    Reference FIFO (not Jano): strict arrival order per group; consecutive
    requests for the loaded model run concurrently up to its slots; the next
    different model is swapped in once the loaded one has drained.
    """

    def __init__(self, models: Sequence[ModelSpec], clock: Clock, swap_cost: float,
                 on_swap: Callable[[SwapEvent], None], initial: Optional[str] = None) -> None:
        self.specs = {m.name: m for m in models}
        self.clock = clock
        self.swap_cost = swap_cost
        self.on_swap = on_swap
        self.queue: deque[tuple[Ticket, Deferred[Ticket]]] = deque()
        self.resident: Optional[str] = initial
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


def make_sim(policy: str, models: Sequence[ModelSpec], swap_cost: float, max_wait: float,
             collate: float, initial: Optional[str] = None) -> Sim:
    """``initial``: the model resident when the run starts (``None``: the slot is unknown)."""
    clock = Clock()
    sim = Sim(clock, initial)
    if policy == "fifo":
        sim.admission = Fifo(models, clock, swap_cost, sim.swaps.append, initial)
    else:
        sim.admission = Scheduler(models, TimedSwapper(clock, swap_cost), clock,
                                  max_wait=math.inf if policy == "no-guard" else max_wait,
                                  max_queue=10_000, on_swap=sim.swaps.append,
                                  initial=None if initial is None else {GROUP: initial},
                                  collate=0.0 if policy == "jano-collate0" else collate)
    return sim


# --- traces -----------------------------------------------------------------------------------


class Workload(NamedTuple):
    """The models of one scenario (in table order), its trace, and who is resident at t=0."""

    models: list[str]
    trace: Trace
    resident: Optional[str] = None


def mixed_burst(rng: random.Random, service: float) -> Workload:
    models = ["chat", "code", "vision"]
    times = sorted(rng.uniform(0.0, 2.0) for _ in range(60))
    arrivals = [(t, models[i % 3]) for i, t in enumerate(times)]
    return Workload(models, open_trace(arrivals, service_times(rng, 60, service)))


def agentic(rng: random.Random, service: float) -> Workload:
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

    return Workload(["planner", "coder", "reviewer"], schedule)


def heavy_light(rng: random.Random, service: float) -> Workload:
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
    return Workload(["heavy", "light"],
                    open_trace(arrivals, service_times(rng, len(arrivals), service)))


JITTER_BURSTS = 10
JITTER_SIZE = 8


def jitter_bursts(rng: random.Random, swap_cost: float,
                  offsets: Callable[[random.Random], list[float]]) -> Workload:
    """
    ``alpha`` resident and idle at t=0; bursts ``10 x (swap_cost + 1)`` s apart,
    each of ``JITTER_SIZE`` requests alternating between the models, led by the
    one that is not resident when the burst begins (read from the run's swaps,
    so it may differ between policies); ``offsets`` draws the sorted arrival
    offsets within one burst.  Service U(5 ms, 50 ms).  Every random draw is
    made here, once, so all policies see the same times.
    """
    gap = 10.0 * (swap_cost + 1.0)
    bursts = [offsets(rng) for _ in range(JITTER_BURSTS)]
    services = [[rng.uniform(0.005, 0.050) for _ in burst] for burst in bursts]

    def schedule(sim: Sim) -> None:
        def burst(b: int) -> None:
            resident = sim.resident()
            other = "beta" if resident == "alpha" else "alpha"
            for i, (at, service) in enumerate(zip(bursts[b], services[b])):
                sim.clock.callLater(at, sim.submit, other if i % 2 == 0 else resident, service)

        for b in range(JITTER_BURSTS):
            sim.clock.callLater(b * gap, burst, b)

    return Workload(["alpha", "beta"], schedule, resident="alpha")


def uniform_offsets(rng: random.Random) -> list[float]:
    return sorted(rng.uniform(0.0, 0.050) for _ in range(JITTER_SIZE))


def poisson_offsets(rng: random.Random) -> list[float]:
    out = [0.0]
    while len(out) < JITTER_SIZE:
        out.append(out[-1] + rng.expovariate(1 / 0.010))
    return out


def jitter_uniform(rng: random.Random, service: float, swap_cost: float) -> Workload:
    return jitter_bursts(rng, swap_cost, uniform_offsets)


def jitter_poisson(rng: random.Random, service: float, swap_cost: float) -> Workload:
    return jitter_bursts(rng, swap_cost, poisson_offsets)


#: Scenario -> workload from (rng, --service, --swap-cost).
SCENARIOS: dict[str, Callable[[random.Random, float, float], Workload]] = {
    "mixed-burst": lambda rng, service, _swap_cost: mixed_burst(rng, service),
    "agentic": lambda rng, service, _swap_cost: agentic(rng, service),
    "heavy+light": lambda rng, service, _swap_cost: heavy_light(rng, service),
    "jitter-uniform": jitter_uniform,
    "jitter-poisson": jitter_poisson,
}
POLICIES = ("fifo", "no-guard", "jano-collate0", "jano")


# --- report -----------------------------------------------------------------------------------


def simulate(scenario: str, policy: str, args: argparse.Namespace) -> list[str]:
    rng = random.Random(f"{args.seed}:{scenario}")  # the same trace for every policy
    names, trace, resident = SCENARIOS[scenario](rng, args.service, args.swap_cost)
    models = [ModelSpec(n, f"http://127.0.0.1:{9000 + i}", max_concurrency=args.concurrency,
                        group=GROUP) for i, n in enumerate(names)]
    sim = make_sim(policy, models, args.swap_cost, args.max_wait, args.collate, resident)
    trace(sim)
    sim.run()
    waits = [d.dispatched - d.arrived for d in sim.done]
    makespan = max(d.finished for d in sim.done) - min(d.arrived for d in sim.done)
    per_model = " / ".join(
        f"{n} {max(d.dispatched - d.arrived for d in sim.done if d.model == n):.0f}"
        for n in names)
    return [scenario, policy, str(len(sim.done)), str(len(sim.swaps)), f"{makespan:.1f}",
            f"{sum(waits) / len(waits):.1f}", f"{percentile(waits, 0.99):.1f}", f"{max(waits):.1f}",
            per_model]


HEAD = ["scenario", "policy", "requests", "swaps", "makespan s", "mean wait s", "p99 wait s",
        "max wait s", "max wait by model s"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swap-cost", type=float, default=20.0, help="seconds per swap (20)")
    parser.add_argument("--service", type=float, default=4.0,
                        help="mean service time in seconds (4)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="Jano's starvation guard in seconds (60)")
    parser.add_argument("--collate", type=float, default=0.25,
                        help="collation window of jano and no-guard in seconds (0.25)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="requests a model serves at once (4)")
    parser.add_argument("--seed", type=int, default=1, help="trace seed (1)")
    parser.add_argument("--only", metavar="SCENARIO[,...]",
                        help="run only these scenarios (of either table)")
    args = parser.parse_args(argv)
    every = [*SCENARIOS, *swap_sim_gpus.SCENARIOS]
    only = every if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(every))
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(every)}")
    print(f"swap cost {args.swap_cost:g}s, service {args.service:g}s x U(0.5,1.5), "
          f"concurrency {args.concurrency}, max_wait {args.max_wait:g}s, "
          f"collate {args.collate:g}s, seed {args.seed}")
    rows = [simulate(s, p, args) for s in SCENARIOS if s in only for p in POLICIES]
    if rows:
        print("\n" + table(HEAD, rows, text=(0, 1, 8)))
        print(f"\njano: the real Scheduler (collate {args.collate:g}s).  jano-collate0: the real "
              f"Scheduler with collate=0.  no-guard: the real Scheduler with max_wait=inf "
              f"(collate {args.collate:g}s).  fifo: a reference simulator in this file (strict "
              "arrival order, one swap per model change), not Jano code.  jitter-*: service "
              "U(5,50) ms, each burst led by the model not resident when it begins.")
    rows = [r for s in swap_sim_gpus.SCENARIOS if s in only
            for r in swap_sim_gpus.simulate(s, args)]
    if rows:
        print("\n" + table(swap_sim_gpus.HEAD, rows, text=swap_sim_gpus.TEXT))
        print(f"\nEvery layout: the real Scheduler (max_wait {args.max_wait:g}s, collate "
              f"{args.collate:g}s), replicas (a model on two GPUs) chosen by "
              "jano.scheduler.replicas.Replicas, nothing loaded at t=0.  A GPU without a "
              "budget holds one model at a time.  loads: loads that ended, the first of each "
              "model included.  evictions: models stopped to make room.  over bound: requests "
              "that waited longer than max_wait + swap cost + the longest service time of the "
              "run (one model waiting alone).  over k-bound: requests over the bound README.rst "
              "states, max_wait + k x (swap cost + longest service), k the models of the "
              "request's group; only an overloaded GPU may pass it.  Every load takes the swap cost whatever the model's size, and co-resident "
              "models do not slow each other down here.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
