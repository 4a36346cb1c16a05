"""
Memory budgets and two GPUs: the same trace replayed under different
*layouts* of its models on GPUs, each with the real
:class:`jano.scheduler.Scheduler` (``--max-wait``, ``--collate``), on the
simulated clock of ``swap_sim_world.py``.  ``swap_sim.py`` prints the table.

A layout maps each model to a group (one GPU), or to several: then each GPU
has a replica of it (``model@gpu1``, :attr:`jano.records.ModelSpec.serves`)
and :class:`jano.scheduler.replicas.Replicas` picks the replica of each
request.  A layout may give a group a memory budget.  A group without one
holds one model at a time (today's rule, the *one-model-per-GPU baseline*); a
group with one holds any set of models whose ``memory`` fits.  Every run
starts with nothing loaded, so the first load of each model counts.  A load
takes ``--swap-cost`` seconds whatever the model's size (an unload, a tenth),
and co-resident models serve at full speed side by side: the simulation does
not model them sharing the GPU's compute.

Budget traces, on one 24 GiB card (24576 MiB) holding a 7B chat model
(``chat``, 6144 MiB), an embedding model (``embed``, 1024 MiB) and two 14B
models (``coder`` and ``reasoning``, 10240 MiB each): any three fit together
except ``chat`` with both 14B models, so all four never do.  Service times:
``embed`` U(0.05, 0.3) s, ``chat`` and ``coder`` ``--service`` x U(0.5, 1.5),
``reasoning`` three times that.  Layouts: ``1 GPU, one resident`` (no budget)
and ``1 GPU, 24 GiB budget``.

- ``rag+agents``: closed loop.  Four RAG users each ask 12 questions, 5-40 s
  apart: ``embed`` then, once it answered, ``chat``.  Two coding agents each
  run six tasks: half of them start with a ``reasoning`` plan, then two to
  four rounds of ``embed`` then ``coder``, 1-10 s of tool use before each
  round.  Clients start within 30 s.
- ``busy+reasoning``: open loop for 300 s.  ``chat`` and ``coder`` each get a
  request every 1-2 s from a start within 2 s (busy most of the time: one
  card serving one model at a time cannot keep up with both), ``embed`` one
  every 0.5-1.5 s, and ``reasoning`` one every 30-50 s from a start within
  40 s: it rarely fits beside the busy pair, so most of its loads wait for
  the starvation guard to empty one of them.

Two-GPU traces, models that each need a whole card (no budgets):

- ``agents+chat``: like the ``agentic`` trace of ``swap_sim.py`` (six agents, three
  ``planner`` -> ``coder`` -> ``reviewer`` chains each, half with one more
  ``coder`` -> ``reviewer`` round, 1-15 s of tool use between steps) plus three
  ``chat`` users asking ten questions each, 10-60 s apart.  Layouts: ``1 GPU``
  (all four share it), two GPUs with each model pinned to one of them in two
  pairings (who shares a card with whom matters), and every model replicated
  on both GPUs.
- ``chat-surge``: ``chat`` asked every 2-4 s for 360 s, except every
  0.5-1 s from 120 s to 240 s (more than one GPU's four slots can serve),
  and two agents running eight ``planner`` -> ``coder`` -> ``coder`` rounds,
  1-15 s apart.  Layouts: ``1 GPU``; ``chat`` alone on one GPU; the same
  with ``chat`` replicated on the other GPU too; everything replicated.

Columns: ``loads`` (loads that ended, across GPUs, the first of each model
included), ``evictions`` (models stopped to make room: the ``evict`` set of
a budget group, the previous resident of a one-model group), the waits from
arrival to dispatch, and ``over bound``: requests that waited longer than
``--max-wait`` + ``--swap-cost`` + the longest service time of the run, the
starvation guard's bound for a model waiting alone (a request may wait
longer, as documented, behind the visits of other starving models, or when
a GPU gets more work than it can serve), and ``over k-bound``: requests that
waited longer than the bound README.rst states and the property tests check,
``max_wait + k x (S + D)`` with ``k`` the models of the request's group, ``S``
the swap cost and ``D`` the longest service time (it assumes a GPU that is not
overloaded: free concurrency slots).
"""

from __future__ import annotations

import argparse
import random
from typing import Callable, Mapping, NamedTuple, Sequence

from twisted.internet.task import Clock

from swap_sim_world import Sim, TimedSwapper, Trace, open_trace, percentile

from jano.records import ModelSpec
from jano.scheduler import Scheduler
from jano.scheduler.replicas import Replicas

__all__ = ["HEAD", "SCENARIOS", "TEXT", "simulate"]

CARD = 24576
MEMORY = {"chat": 6144, "embed": 1024, "coder": 10240, "reasoning": 10240}


class Layout(NamedTuple):
    name: str
    #: Model -> the groups (GPUs) it is served on; more than one: a replica on each.
    groups: Mapping[str, tuple[str, ...]]
    #: Group -> MiB; a group not listed holds one model at a time.
    budgets: Mapping[str, int] = {}
    #: Replicated models spread (``models[].spread``): a long queue loads an idle replica.
    spread: bool = False

    def instances(self, names: Sequence[str], memory: Mapping[str, int],
                  concurrency: int) -> list[ModelSpec]:
        """What the scheduler is configured with: each model, or each of its replicas."""
        specs: list[ModelSpec] = []
        for n in names:
            for g in self.groups[n]:
                replica = len(self.groups[n]) > 1
                specs.append(ModelSpec(f"{n}@{g}" if replica else n,
                                       f"http://127.0.0.1:{9000 + len(specs)}",
                                       max_concurrency=concurrency, group=g,
                                       memory=memory.get(n), serves=n if replica else None,
                                       spread=self.spread and replica))
        return specs


class Workload(NamedTuple):
    """The models of one scenario (in table order), their MiB, the trace and its layouts."""

    models: list[str]
    memory: Mapping[str, int]
    trace: Trace
    layouts: list[Layout]


class Step(NamedTuple):
    model: str
    #: Seconds from the previous answer (or the client's start) to sending it.
    think: float
    service: float


def closed_loop(clients: Sequence[tuple[float, Sequence[Step]]]) -> Trace:
    """Each client (start, steps) sends its next step ``think`` seconds after the last answer."""
    def schedule(sim: Sim) -> None:
        def step(steps: Sequence[Step], j: int) -> None:
            if j < len(steps):
                s = steps[j]
                sim.clock.callLater(s.think, sim.submit, s.model, s.service,
                                    lambda: step(steps, j + 1))

        for start, steps in clients:
            sim.clock.callLater(start, step, steps, 0)

    return schedule


def budget_layouts(models: Sequence[str]) -> list[Layout]:
    one_card = {m: ("gpu0",) for m in models}
    return [Layout("1 GPU, one resident", one_card),
            Layout("1 GPU, 24 GiB budget", one_card, {"gpu0": CARD})]


def draw_service(rng: random.Random, model: str, mean: float) -> float:
    if model == "embed":
        return rng.uniform(0.05, 0.3)
    return (3.0 if model == "reasoning" else 1.0) * mean * rng.uniform(0.5, 1.5)


def rag_agents(rng: random.Random, service: float) -> Workload:
    def step(model: str, think: float) -> Step:
        return Step(model, think, draw_service(rng, model, service))

    clients: list[tuple[float, list[Step]]] = []
    for _ in range(4):  # RAG users: retrieve, then answer
        steps: list[Step] = []
        for _ in range(12):
            steps += [step("embed", rng.uniform(5.0, 40.0)), step("chat", 0.0)]
        clients.append((rng.uniform(0.0, 30.0), steps))
    for _ in range(2):  # coding agents: maybe plan, then retrieve and edit a few times
        steps = []
        for _ in range(6):
            if rng.random() < 0.5:
                steps.append(step("reasoning", rng.uniform(1.0, 10.0)))
            for _ in range(rng.randint(2, 4)):
                steps += [step("embed", rng.uniform(1.0, 10.0)), step("coder", 0.0)]
        clients.append((rng.uniform(0.0, 30.0), steps))
    models = ["chat", "embed", "coder", "reasoning"]
    return Workload(models, MEMORY, closed_loop(clients), budget_layouts(models))


def busy_reasoning(rng: random.Random, service: float) -> Workload:
    arrivals: list[tuple[float, str]] = []
    for model, first, gap in (("chat", 2.0, (1.0, 2.0)), ("coder", 2.0, (1.0, 2.0)),
                              ("embed", 2.0, (0.5, 1.5)), ("reasoning", 40.0, (30.0, 50.0))):
        t = rng.uniform(0.0, first)
        while t < 300.0:
            arrivals.append((t, model))
            t += rng.uniform(*gap)
    arrivals.sort()
    services = [draw_service(rng, model, service) for _, model in arrivals]
    models = ["chat", "embed", "coder", "reasoning"]
    return Workload(models, MEMORY, open_trace(arrivals, services), budget_layouts(models))


def agents_chat(rng: random.Random, service: float) -> Workload:
    def step(model: str, think: float) -> Step:
        return Step(model, think, service * rng.uniform(0.5, 1.5))

    clients: list[tuple[float, list[Step]]] = []
    for _ in range(6):
        steps: list[Step] = []
        for _ in range(3):
            steps += [step(m, rng.uniform(1.0, 15.0)) for m in ("planner", "coder", "reviewer")]
            if rng.random() < 0.5:  # the reviewer sends it back once
                steps += [step(m, rng.uniform(1.0, 15.0)) for m in ("coder", "reviewer")]
        clients.append((rng.uniform(0.0, 60.0), steps))
    for _ in range(3):
        clients.append((rng.uniform(0.0, 60.0),
                        [step("chat", rng.uniform(10.0, 60.0)) for _ in range(10)]))
    models = ["planner", "coder", "reviewer", "chat"]

    def pinned(gpu0: Sequence[str]) -> Layout:
        name = f"2 GPUs: {'+'.join(gpu0)}, {'+'.join(m for m in models if m not in gpu0)}"
        return Layout(name, {m: ("gpu0" if m in gpu0 else "gpu1",) for m in models})

    layouts = [Layout("1 GPU", {m: ("gpu0",) for m in models}),
               pinned(["chat", "planner"]), pinned(["chat", "reviewer"]),
               Layout("2 GPUs, all replicated on both", {m: ("gpu0", "gpu1") for m in models}),
               Layout("2 GPUs, all replicated, spread", {m: ("gpu0", "gpu1") for m in models},
                      spread=True)]
    return Workload(models, {}, closed_loop(clients), layouts)


def chat_surge(rng: random.Random, service: float) -> Workload:
    arrivals: list[tuple[float, str]] = []
    t = 0.0
    while t < 360.0:
        arrivals.append((t, "chat"))
        t += rng.uniform(0.5, 1.0) if 120.0 <= t < 240.0 else rng.uniform(2.0, 4.0)
    services = [service * rng.uniform(0.5, 1.5) for _ in arrivals]
    schedule_chat = open_trace(arrivals, services)
    clients: list[tuple[float, list[Step]]] = []
    for _ in range(2):
        steps: list[Step] = []
        for _ in range(8):
            steps += [Step(m, rng.uniform(1.0, 15.0), service * rng.uniform(0.5, 1.5))
                      for m in ("planner", "coder", "coder")]
        clients.append((rng.uniform(0.0, 60.0), steps))
    schedule_agents = closed_loop(clients)

    def schedule(sim: Sim) -> None:
        schedule_chat(sim)
        schedule_agents(sim)

    models = ["chat", "planner", "coder"]
    layouts = [Layout("1 GPU", {m: ("gpu0",) for m in models}),
               Layout("2 GPUs: chat, planner+coder",
                      {"chat": ("gpu0",), "planner": ("gpu1",), "coder": ("gpu1",)}),
               Layout("2 GPUs: chat on both, planner+coder",
                      {"chat": ("gpu0", "gpu1"), "planner": ("gpu1",), "coder": ("gpu1",)}),
               Layout("2 GPUs: chat on both, spread, planner+coder",
                      {"chat": ("gpu0", "gpu1"), "planner": ("gpu1",), "coder": ("gpu1",)},
                      spread=True),
               Layout("2 GPUs, all replicated on both", {m: ("gpu0", "gpu1") for m in models}),
               Layout("2 GPUs, all replicated, spread", {m: ("gpu0", "gpu1") for m in models},
                      spread=True)]
    return Workload(models, {}, schedule, layouts)


#: Scenario -> workload from (rng, --service).
SCENARIOS: dict[str, Callable[[random.Random, float], Workload]] = {
    "rag+agents": rag_agents,
    "busy+reasoning": busy_reasoning,
    "agents+chat": agents_chat,
    "chat-surge": chat_surge,
}

HEAD = ["scenario", "layout", "requests", "loads", "evictions", "makespan s", "mean wait s",
        "p95 wait s", "max wait s", "over bound", "over k-bound", "max wait by model s"]
#: The left-aligned (text) columns of HEAD.
TEXT = (0, 1, 11)


def simulate(scenario: str, args: argparse.Namespace) -> list[list[str]]:
    """One row per layout of ``scenario``; every layout sees the same trace."""
    # A trace keeps no state of its own, so every layout replays the same draws.
    names, memory, trace, layouts = SCENARIOS[scenario](random.Random(f"{args.seed}:{scenario}"),
                                                        args.service)
    rows = []
    for layout in layouts:
        instances = layout.instances(names, memory, args.concurrency)
        clock = Clock()
        sim = Sim(clock)
        swapper = TimedSwapper(clock, args.swap_cost)
        scheduler = Scheduler(instances, swapper, clock, max_wait=args.max_wait,
                              max_queue=10_000, on_swap=sim.swaps.append,
                              collate=args.collate, budgets=layout.budgets)
        replicated = any(spec.serves is not None for spec in instances)
        sim.admission = Replicas(scheduler, clock, instances) if replicated else scheduler
        trace(sim)
        sim.run()
        waits = [d.wait for d in sim.done]
        longest = max(d.finished - d.dispatched for d in sim.done)
        bound = args.max_wait + args.swap_cost + longest
        members: dict[str, int] = {}
        for spec in instances:
            members[spec.group] = members.get(spec.group, 0) + 1
        over_k = sum(1 for d in sim.done if d.group is not None
                     and d.wait > args.max_wait + members[d.group] * (args.swap_cost + longest))
        loads = sum(1 for e in sim.swaps if e.to_model is not None and e.result == "ok")
        makespan = max(d.finished for d in sim.done) - min(d.arrived for d in sim.done)
        per_model = " / ".join(
            f"{n} {max(d.wait for d in sim.done if d.model == n):.0f}" for n in names)
        rows.append([scenario, layout.name, str(len(sim.done)), str(loads),
                     str(len(swapper.evicted)), f"{makespan:.1f}",
                     f"{sum(waits) / len(waits):.1f}", f"{percentile(waits, 0.95):.1f}",
                     f"{max(waits):.1f}", str(sum(1 for w in waits if w > bound)), str(over_k),
                     per_model])
    return rows
