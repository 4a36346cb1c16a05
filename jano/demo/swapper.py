"""
:class:`SimulatedSwapper`: demo mode's swapper, where a swap is a timer on the
clock that flips fake servers' load state instead of running a process.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping, Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from jano.demo.server import FakeModelServer
from jano.records import ModelSpec

__all__ = ["SimulatedSwapper"]


class SimulatedSwapper:
    """
    A swapper for demos and tests: a swap is a timer, not a process.

    :param clock: provides ``callLater``.
    :param servers: the fake server of each model, by model name.
    :param delay: seconds a swap takes.

    ``history`` keeps ``(group, previous name or None, target name)`` of each
    swap started, oldest first.
    """

    def __init__(self, clock: IReactorTime, servers: Mapping[str, FakeModelServer], *,
                 delay: float = 1.5) -> None:
        if not (delay >= 0 and math.isfinite(delay)):
            raise ValueError("delay must be a non-negative number of seconds")
        self._clock = clock
        self._servers = dict(servers)
        self.delay = delay
        self.history: deque[tuple[str, Optional[str], str]] = deque(maxlen=1000)

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec) -> Deferred[None]:
        """
        Mark ``target``'s server loading; ``delay`` seconds later mark it loaded
        (and ``previous``'s server unloaded, if that is another server) and fire
        ``None``.

        :return: fails with :class:`LookupError` for a model without a server.
            Cancelling it stops the timer and leaves ``target``'s server unloaded.
        """
        server = self._servers.get(target.name)
        if server is None:
            return fail(LookupError(f"no fake server for model {target.name!r}"))
        self.history.append((group, previous.name if previous is not None else None,
                             target.name))
        server.loading = True
        calls: list[IDelayedCall] = []

        def cancel(_: Deferred[None]) -> None:
            if calls and calls[0].active():
                calls[0].cancel()
            server.set_loaded(None)

        done: Deferred[None] = Deferred(cancel)

        def loaded() -> None:
            if previous is not None:
                old = self._servers.get(previous.name)
                if old is not None and old is not server:
                    old.set_loaded(None)
            server.set_loaded(target.name)
            done.callback(None)

        calls.append(self._clock.callLater(self.delay, loaded))
        return done

    def unload(self, group: str, model: ModelSpec) -> Deferred[None]:
        """
        Mark ``model``'s server unloaded after a tenth of ``delay`` (unloading
        is quicker than loading) and fire ``None``; ``history`` records it with
        an empty target.
        """
        server = self._servers.get(model.name)
        if server is None:
            return fail(LookupError(f"no fake server for model {model.name!r}"))
        self.history.append((group, model.name, ""))
        calls: list[IDelayedCall] = []
        done: Deferred[None] = Deferred(lambda _: calls[0].cancel() if calls and calls[0].active()
                                        else None)

        def unloaded() -> None:
            server.set_loaded(None)
            done.callback(None)

        calls.append(self._clock.callLater(self.delay / 10, unloaded))
        return done
