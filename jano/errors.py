"""
Refusals and the errors every stage shares.

Two kinds live here, both leaves with no Twisted in them:

* what Jano answers itself (:class:`Refusal`), as a JSON body in the shape the
  caller's client library parses (:func:`error_body`);
* the exceptions the scheduler and the swapper raise through Deferreds
  (:class:`QueueFull`, :class:`ModelUnavailable`, :class:`Draining`,
  :class:`SwapError`), which the forward stage turns into refusals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["Refusal", "error_body", "is_ollama_path", "QueueFull", "ModelUnavailable",
           "Draining", "Busy", "SwapError", "SwapFailure", "SwapCommandError"]


def is_ollama_path(path: bytes) -> bool:
    """Ollama's native API lives under ``/api/``; its clients parse its error shape."""
    return path.startswith(b"/api/")


def error_body(path: bytes, status: int, message: str, kind: str,
               code: Optional[str] = None) -> bytes:
    """
    An error in the shape the caller's client library parses: Ollama's
    ``{"error": "..."}`` under ``/api/``, OpenAI's
    ``{"error": {"message", "type", "code"}}`` everywhere else (llama-server
    uses the OpenAI shape on its native routes too).
    """
    if is_ollama_path(path):
        return json.dumps({"error": message}).encode()
    return json.dumps({"error": {"message": message, "type": kind,
                                 "code": code if code is not None else status}}).encode()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request Jano answers itself, with why."""

    status: int
    message: str
    kind: str  # OpenAI error type
    reason: str  # telemetry rejection reason


# --- scheduler ------------------------------------------------------------------------


class QueueFull(Exception):
    """
    The model's queue already holds ``max_queue`` live waiters.

    :ivar retry_after: seconds after which a retry is likely to be queued,
        estimated from observed service and swap times.
    """

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"queue for model {model!r} is full")
        self.model = model
        self.retry_after = retry_after


class ModelUnavailable(Exception):
    """
    The model cannot be served now: its swap failed, it is still marked down
    after a failed swap, or it was removed from the configuration.

    :ivar cause: one human-readable line (the swap's error).
    :ivar retry_after: seconds until a retry may succeed.
    """

    def __init__(self, model: str, cause: str, retry_after: float) -> None:
        super().__init__(f"model {model!r} is unavailable: {cause}")
        self.model = model
        self.cause = cause
        self.retry_after = retry_after


class ModelRemoved(ModelUnavailable):
    """A reload removed the model (as named) while the request waited for it."""


class Draining(Exception):
    """Jano is shutting down and admits nothing new."""


class Busy(Exception):
    """
    A load or unload that would evict work in flight, or overlap a swap: the
    caller may retry later.  ``str()`` says what is in the way.
    """


# --- swap -----------------------------------------------------------------------------

SwapFailure = Literal["failed", "timeout", "not_ready"]


class SwapError(Exception):
    """
    A swap attempt that did not end with a ready model.

    :ivar result: what went wrong, as recorded in ``SwapEvent.result``.
    :ivar cause: one human-readable line, shown to clients in the 503 answer.
    :ivar retry_after: seconds the model stays down (``None``: the
        scheduler's ``retry_backoff``); a crash loop backs off longer.
    :ivar phases: seconds per phase run before it failed (see
        :attr:`jano.records.SwapEvent.phases`).
    """

    def __init__(self, result: SwapFailure, cause: str, *, retry_after: Optional[float] = None,
                 phases: tuple[tuple[str, float], ...] = ()) -> None:
        super().__init__(cause)
        self.result: SwapFailure = result
        self.cause: str = cause
        self.retry_after = retry_after
        self.phases = phases

    def __repr__(self) -> str:
        return f"SwapError({self.result!r}, {self.cause!r})"


class SwapCommandError(Exception):
    """The configured swap command cannot run; ``str()`` is the one-line reason."""
