"""
Backend health: is each resident model's server answering?

:class:`HealthMonitor` polls each resident model's health URL on a timer and
keeps the last answer.  It sits next to the swap code because residency
decides what is probed: a model that does not hold its group's slot is
``"unloaded"`` and its server is not supposed to be running.  Telemetry reads
the states through a callable (:meth:`HealthMonitor.states`) and never imports
this module.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.records import HealthState, ModelSpec

__all__ = ["HealthMonitor"]


def _state_for(code: int) -> HealthState:
    if code == 200:
        return "up"
    if code == 503:
        return "loading"
    return "down"


class HealthMonitor(Service):
    """
    Polls each resident model's health URL every ``interval`` seconds.

    A model that is not its group's resident is ``"unloaded"`` and is not
    probed: its server is not supposed to be running.  A resident model is
    ``"up"`` on 200, ``"loading"`` on 503 (llama-server while it loads),
    ``"down"`` on any other status, failure or timeout, and ``"unknown"``
    until its first answer.  At most one probe per model is in flight; a
    probe still running at the next tick is left alone.

    :param probe: GETs a URL and fires with the HTTP status code.
    :param is_resident: whether a model currently holds its group's slot.
    :param timeout: seconds before a probe is cancelled and the model
        counted ``"down"``; two intervals by default.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        models: Sequence[ModelSpec],
        probe: Callable[[str], Deferred[int]],
        *,
        interval: float = 5.0,
        is_resident: Callable[[ModelSpec], bool],
        timeout: Optional[float] = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._clock = clock
        self._probe = probe
        self._interval = interval
        self._timeout = 2.0 * interval if timeout is None else timeout
        self._is_resident = is_resident
        self._specs: dict[str, ModelSpec] = {}
        self._states: dict[str, HealthState] = {}
        self._in_flight: dict[str, Deferred[int]] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self.set_models(models)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.log.failure("Health loop stopped", f)
        )

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        pending, self._in_flight = self._in_flight, {}
        for d in pending.values():
            d.cancel()
        super().stopService()

    #: Told ``(model, old, new)`` when a probe's answer changes a model's
    #: state (states learnt through :meth:`observed` are not probes).
    on_probed: Optional[Callable[[str, Optional[HealthState], HealthState], None]] = None

    def states(self) -> dict[str, HealthState]:
        """
        Each configured model's last known state, in configuration order,
        reconciled with residency now: a model swapped out since the last
        probe reads ``unloaded``, one swapped in reads ``unknown`` until probed.
        """
        out: dict[str, HealthState] = {}
        for name, state in self._states.items():
            spec = self._specs.get(name)
            try:
                resident = spec is None or self._is_resident(spec)
            except Exception:  # a broken residency check must not break /status
                resident = state != "unloaded"
            if not resident:
                state = "unloaded"
            elif state == "unloaded":
                state = "unknown"
            out[name] = state
        return out

    def observed(self, name: str, state: HealthState) -> None:
        """Record a state learnt elsewhere (a swap that ended with health 200 means ``up``)."""
        if name in self._specs:
            self._set(name, state)

    def set_models(self, models: Sequence[ModelSpec]) -> None:
        """
        Adopt a new model list.  Unchanged models keep their state; new or
        changed ones start ``"unknown"``; probes of changed or removed ones
        are cancelled and their answers ignored.
        """
        new = {spec.name: spec for spec in models}
        for name in list(self._in_flight):
            if new.get(name) != self._specs.get(name):
                self._in_flight.pop(name).cancel()
        self._states = {
            name: self._states.get(name, "unknown") if self._specs.get(name) == spec else "unknown"
            for name, spec in new.items()
        }
        self._specs = new

    def _tick(self) -> None:
        for spec in list(self._specs.values()):
            try:
                self._check(spec)
            except Exception:
                self.log.failure("Health check of {model} failed", model=spec.name)

    def _check(self, spec: ModelSpec) -> None:
        name = spec.name
        if not self._is_resident(spec):
            stale = self._in_flight.pop(name, None)
            if stale is not None:
                stale.cancel()
            self._set(name, "unloaded")
            return
        if name in self._in_flight:
            return
        try:
            d = self._probe(spec.health_url)
        except Exception:
            self.log.failure("Health probe of {model} raised", model=name)
            self._set(name, "down")
            return
        self._in_flight[name] = d
        d.addTimeout(self._timeout, self._clock)
        d.addBoth(self._answered, spec, d)

    def _answered(self, result: int | Failure, spec: ModelSpec, d: Deferred[int]) -> None:
        if self._in_flight.get(spec.name) is not d:
            return None  # cancelled, or the model changed since: not about now
        del self._in_flight[spec.name]
        before = self._states.get(spec.name)
        if isinstance(result, Failure):
            self.log.debug(
                "Health probe of {model} failed: {error}",
                model=spec.name,
                error=result.getErrorMessage(),
            )
            self._set(spec.name, "down")
        else:
            self._set(spec.name, _state_for(result))
        after = self._states.get(spec.name)
        if self.on_probed is not None and after is not None and before != after:
            try:
                self.on_probed(spec.name, before, after)
            except Exception:
                self.log.failure("on_probed failed for {model}", model=spec.name)
        return None

    def _set(self, name: str, state: HealthState) -> None:
        old = self._states.get(name)
        if old != state and name in self._specs:
            self._states[name] = state
            self.log.info("Backend {model} health: {old} -> {new}", model=name, old=old, new=state)
