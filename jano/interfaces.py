"""
The seams between stages, as ``typing.Protocol``\\ s.

Each stage depends on these shapes, never on the class behind them, so a test
(or an embedding application) can hand any stage a fake of the next one.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred

from jano.records import ModelSpec, SchedulerSnapshot, SwapEvent, Ticket, UsageRecord

__all__ = ["Admission", "Lifecycle", "UsageSink", "Swapper", "Probe"]


class Admission(Protocol):
    """The scheduler seam: admit a request for a model, release it when done."""

    def admit(self, model: str) -> Deferred[Ticket]: ...

    def release(self, ticket: Ticket) -> None: ...

    def snapshot(self) -> SchedulerSnapshot: ...

    def mark_down(self, model: str, cause: str, seconds: float) -> None:
        """Refuse ``model`` for ``seconds``: its waiters fail now with ``cause``."""


class Lifecycle(Protocol):
    """The scheduler seam of the load and unload endpoints."""

    def snapshot(self) -> SchedulerSnapshot: ...

    def load(self, model: str) -> Deferred[None]: ...

    def unload(self, model: str) -> bool: ...


class UsageSink(Protocol):
    """Where the forward stage reports each request's end (telemetry's recorder)."""

    def next_request_id(self) -> int: ...

    def request_finished(self, record: UsageRecord) -> None: ...

    def queue_rejected(self, reason: str) -> None: ...

    def client_disconnected(self, model: Optional[str], phase: str) -> None: ...


class Swapper(Protocol):
    """
    Moves a group's slot from ``previous`` (``None``: unknown) to ``target``;
    in a group with a memory budget, ``evict`` lists every model to unload
    first (``previous`` is the first of them).

    The Deferred fires once the target answers, with ``None`` or a mapping of
    phase name to seconds (:attr:`jano.records.SwapEvent.phases`); it fails
    with an exception that may carry ``result`` (``"failed"``, ``"timeout"``,
    ``"not_ready"``), ``cause`` (one line), ``retry_after`` and ``phases``.
    Anything else counts as ``"failed"`` with ``str(exc)`` as cause.
    """

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = ()) -> Deferred[Any]: ...

    def unload(self, group: str, model: ModelSpec) -> Deferred[Any]:
        """Leave ``group``'s slot empty: ``model``, its resident, is unloaded."""


class Probe(Protocol):
    """A health check: GET ``url``, fire with the status code (or fail)."""

    def __call__(self, url: str) -> Deferred[int]: ...


class SwapListener(Protocol):
    """Told about every finished swap (telemetry, logs, health)."""

    def __call__(self, event: SwapEvent) -> None: ...
