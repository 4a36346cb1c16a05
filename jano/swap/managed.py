"""
:class:`ManagedSwapper`: the swapper of a configuration with managed models.

A swap to a managed model has three phases, each timed into
:attr:`jano.records.SwapEvent.phases`:

``stop``
    the outgoing servers Jano runs are stopped (SIGTERM, SIGKILL after their
    ``stop_timeout``) and their exit awaited, so their GPU memory is free;
    an outgoing model of the swap script is unloaded by the script;
``start``
    the target's server is spawned and runs until it first answers its
    health URL at all (it is listening);
``ready``
    until that URL answers 200 (the model is loaded).

A server that exits during ``start`` or ``ready`` fails the swap at once with
its exit and last log lines; one that never gets ready is stopped at
``ready_timeout``.  A swap to a model of the swap script stops the outgoing
managed servers, then hands over to :class:`~jano.swap.swapper.ScriptSwapper`
(phases ``script`` and ``ready``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger

from jano.errors import SwapError
from jano.records import ModelSpec
from jano.swap.ready import Readiness
from jano.swap.supervisor import Supervisor
from jano.swap.swapper import ScriptSwapper, SwapReactor

__all__ = ["ManagedSwapper", "Phases"]

Phases = dict[str, float]


class ManagedSwapper:
    """
    Swap by stopping and starting the servers Jano runs, with the swap
    script for the models that have none.

    :param supervisor: runs the servers.
    :param script: swaps and unloads models without a ``command`` (``None``:
        there are none).
    :param probe: ``probe(url)`` fires with an HTTP status.
    :param ready_timeout: seconds from spawn to a 200 health answer.
    :param poll_interval: seconds between health probes.
    """

    log = Logger()

    def __init__(self, reactor: SwapReactor, supervisor: Supervisor,
                 script: Optional[ScriptSwapper], probe: Callable[[str], Deferred[int]], *,
                 ready_timeout: float, poll_interval: float = 0.25) -> None:
        self._reactor = reactor
        self.supervisor = supervisor
        self.script = script
        self._probe = probe
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = ()) -> Deferred[Phases]:
        """
        Stop ``evict`` (or ``previous``), then start ``target``.

        :return: fires with the seconds of each phase once ``target`` answers
            200; fails with :class:`SwapError` (carrying the phases run so far
            and, after a crash, the back-off) otherwise.  Cancelling it stops
            the server being started.
        """
        outgoing = list(evict) if evict else ([previous] if previous is not None else [])
        return Deferred.fromCoroutine(self._swap(group, outgoing, target))

    def unload(self, group: str, model: ModelSpec) -> Deferred[Any]:
        """Stop ``model``'s server (or have the script unload it)."""
        if model.managed:
            return self.supervisor.stop(model.name)
        if self.script is None:
            return fail(SwapError("failed", "no swap command is configured ([swap] command)"))
        return self.script.unload(group, model)

    def start_and_wait(self, spec: ModelSpec) -> Deferred[Phases]:
        """Start a managed model no swap concerns (``always_on``): ``start`` and ``ready``."""
        return Deferred.fromCoroutine(self._start(spec, {}))

    async def _swap(self, group: str, outgoing: list[ModelSpec], target: ModelSpec) -> Phases:
        phases: Phases = {}
        began = self._reactor.seconds()
        managed_out = [m for m in outgoing if m.managed and m.name != target.name]
        scripted_out = [m for m in outgoing if not m.managed]
        if managed_out:
            await DeferredList([self.supervisor.stop(m.name) for m in managed_out])
        if not target.managed:
            if managed_out:
                phases["stop"] = self._reactor.seconds() - began
            if self.script is None:
                raise SwapError("failed", "no swap command is configured ([swap] command)",
                                phases=tuple(phases.items()))
            previous = scripted_out[0] if scripted_out else None
            result = await self.script.swap(group, previous, target, evict=scripted_out)
            if isinstance(result, dict):
                phases.update(result)
            return phases
        if scripted_out:
            if self.script is None:
                raise SwapError("failed", "no swap command is configured ([swap] command)")
            for m in scripted_out:
                await self.script.unload(group, m)
        phases["stop"] = self._reactor.seconds() - began
        return await self._start(target, phases)

    async def _start(self, target: ModelSpec, phases: Phases) -> Phases:
        began = self._reactor.seconds()
        try:
            protocol = self.supervisor.start(target)
        except SwapError as e:
            e.phases = tuple(phases.items())
            raise
        readiness = Readiness(self._reactor, self._probe, target.health_url,  # type: ignore[arg-type]
                              timeout=self.ready_timeout, interval=self.poll_interval)

        def exited(description: str) -> str:
            child = self.supervisor.children[target.name]
            cause = child.last_failure or f"{target.name} {description}"
            readiness.abort(SwapError("failed", cause,
                                      retry_after=self.supervisor.backoff_after(target.name)))
            return description

        protocol.exited.addCallback(exited)
        try:
            await readiness.start()
        except BaseException as e:
            self._split(phases, began, readiness.first_answer_at)
            if not protocol.exited.called:  # never ready, or cancelled: it must not linger
                self.log.warn("{model}: not ready, stopping its server", model=target.name)
                await self.supervisor.stop(target.name)
                if isinstance(e, SwapError):
                    self.supervisor.gave_up(target.name, e.cause)
            if isinstance(e, SwapError):
                e.phases = tuple(phases.items())
                if e.retry_after is None:
                    e.retry_after = self.supervisor.backoff_after(target.name)
            raise
        self._split(phases, began, readiness.first_answer_at)
        self.supervisor.ready(target.name)
        return phases

    def _split(self, phases: Phases, began: float, first_answer: Optional[float]) -> None:
        now = self._reactor.seconds()
        if first_answer is None:
            phases["start"] = now - began
        else:
            phases["start"] = first_answer - began
            phases["ready"] = now - first_answer
