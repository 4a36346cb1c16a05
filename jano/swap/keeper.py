"""
:class:`ServerKeeper`: the life of managed servers beyond a swap.

The swapper starts and stops servers when the scheduler moves a slot; the
keeper does the rest: it starts ``always_on`` managed models at start-up and
keeps them running (restarting them after their back-off), tells the
scheduler about a crash (the model is no longer resident and refused until
its back-off ends), stops the servers a reload removed or changed once their
requests are done, and stops every server when Jano stops.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.records import HealthState, ModelSpec, SchedulerSnapshot
from jano.swap.managed import ManagedSwapper
from jano.swap.orphans import Runs
from jano.swap.supervisor import Supervisor

__all__ = ["ServerKeeper", "Crashes"]

#: Seconds between looks at a retired server's requests in flight.
RETIRE_POLL = 1.0


class Crashes(Protocol):
    """What the keeper tells the scheduler (:class:`jano.scheduler.Scheduler`)."""

    def lost(self, model: str, cause: str, seconds: float) -> None: ...

    def mark_down(self, model: str, cause: str, seconds: float) -> None: ...

    def clear_down(self, model: str) -> None: ...

    def snapshot(self) -> SchedulerSnapshot: ...


def _changed(old: ModelSpec, new: ModelSpec) -> bool:
    return (old.command, old.env, old.cwd, old.port, old.upstream) != (
        new.command, new.env, new.cwd, new.port, new.upstream)


class ServerKeeper:
    """
    :param reactor: ``callLater`` and ``seconds``.
    :param swapper: starts servers and waits for their health.
    :param observed: tells the health monitor what a start or crash showed.
    :param runs: this run's record (what a Jano killed before left is
        killed at :meth:`start`; the record goes at a clean :meth:`stop`).
    """

    log = Logger()

    def __init__(self, reactor: Any, swapper: ManagedSwapper,
                 observed: Callable[[str, HealthState], None],
                 runs: Optional[Runs] = None) -> None:
        self._reactor = reactor
        self.runs = runs
        self.swapper = swapper
        self.supervisor: Supervisor = swapper.supervisor
        self.supervisor.on_crash = self.crashed
        self._observed = observed
        self.scheduler: Optional[Crashes] = None
        self._models: dict[str, ModelSpec] = {}
        self._calls: dict[str, IDelayedCall] = {}
        self._running = False

    # --- always_on ---------------------------------------------------------------------

    def start(self, models: Sequence[ModelSpec]) -> None:
        """
        Kill what a Jano that died left, then start every ``always_on``
        managed model; keep them running from now on.
        """
        if self.runs is not None and not self._running:
            self._claim(self.runs)
        self._running = True
        self._models = {m.name: m for m in models}
        for spec in models:
            if spec.managed and spec.always_on:
                self._keep(spec.name)

    def _claim(self, runs: Runs) -> None:
        try:
            reaped = runs.claim()
        except OSError as e:
            self.log.warn("cannot record this run in {folder} ({error}); if Jano is killed with "
                          "SIGKILL, processes its servers started may outlive it",
                          folder=str(runs.folder), error=e)
            return
        for token, pids in reaped.items():
            if pids:
                self.log.warn("killed {n} process(es) {pids} left running by a Jano that died "
                              "(run {token})", n=len(pids), pids=pids, token=token)

    def _keep(self, name: str) -> None:
        self._calls.pop(name, None)
        spec = self._models.get(name)
        if not self._running or spec is None or not spec.always_on or not spec.managed:
            return
        if self.scheduler is not None:  # refused, with a reason, until it answers
            self.scheduler.mark_down(name, f"{name} is starting", self.swapper.ready_timeout)
        d = self.swapper.start_and_wait(spec)
        d.addCallbacks(self._kept, self._keep_failed, callbackArgs=(name,), errbackArgs=(name,))

    def _kept(self, _: object, name: str) -> None:
        self._observed(name, "up")
        if self.scheduler is not None:
            self.scheduler.clear_down(name)

    def _keep_failed(self, failure: Failure, name: str) -> None:
        cause = getattr(failure.value, "cause", None) or failure.getErrorMessage()
        delay = getattr(failure.value, "retry_after", None) or self.supervisor.backoff
        self.log.warn("always_on {model} did not start: {cause}; again in {delay}s",
                      model=name, cause=cause, delay=delay)
        self._down(name, cause, delay)

    def _down(self, name: str, cause: str, delay: float) -> None:
        self._observed(name, "down")
        if self.scheduler is not None:
            self.scheduler.mark_down(name, cause, delay)
        if self._running and name not in self._calls:
            self._calls[name] = self._reactor.callLater(delay, self._keep, name)

    # --- crashes -----------------------------------------------------------------------

    def crashed(self, spec: ModelSpec, cause: str, backoff: float) -> None:
        """A ready server exited on its own (the supervisor's ``on_crash``)."""
        if spec.always_on:
            self._down(spec.name, cause, backoff)
            return
        self._observed(spec.name, "down")
        if self.scheduler is not None:
            self.scheduler.lost(spec.name, cause, backoff)

    # --- reload ------------------------------------------------------------------------

    def reload(self, models: Sequence[ModelSpec]) -> None:
        """Adopt a new model list: retire removed or changed servers, start new always_on ones."""
        old, self._models = self._models, {m.name: m for m in models}
        for name, before in old.items():
            after = self._models.get(name)
            if before.managed and (after is None or _changed(before, after)):
                self._retire(name, reason="removed" if after is None else "changed")
        for name, spec in self._models.items():
            was = old.get(name)
            if spec.managed and spec.always_on and (was is None or _changed(was, spec)
                                                    or not was.always_on):
                if name not in self._calls:
                    self._calls[name] = self._reactor.callLater(0, self._keep, name)

    def _retire(self, name: str, reason: str) -> None:
        child = self.supervisor.children.get(name)
        if child is None or not child.alive:
            return
        busy = 0
        if self.scheduler is not None:
            busy = sum(m.in_flight for m in self.scheduler.snapshot().models if m.name == name)
        if busy:
            self.log.info("{model} was {reason} by the reload; its server stops when its "
                          "{n} requests are done", model=name, reason=reason, n=busy)
            self._reactor.callLater(RETIRE_POLL, self._retire, name, reason)
            return
        self.log.info("{model} was {reason} by the reload: stopping its server", model=name,
                      reason=reason)
        self.supervisor.stop(name)
        if self.scheduler is not None and name in self._models:
            self.scheduler.lost(name, f"{name} restarts with its new configuration", 0.0)

    # --- the end -----------------------------------------------------------------------

    def stop(self) -> Deferred[Any]:
        """Jano stops: no more restarts, every server stopped."""
        self._running = False
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        stopped = DeferredList([self.supervisor.stop_all()])
        if self.runs is not None:
            runs = self.runs

            def forget(result: Any) -> Any:
                runs.release()
                return result
            stopped.addCallback(forget)
        return stopped
