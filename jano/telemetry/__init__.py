"""
What only the router can see: counters, rings and rolling windows, and the
``/status``, ``/usage`` and ``/metrics`` views of them.

:class:`Telemetry` is fed by paths that already run (the tee reports a finished
request, the swapper a finished swap, the web layer a rejection) and never runs
a timer of its own.  Everything that describes *now* (queue depth, residency,
health) is read when somebody asks: ``/status`` calls the scheduler's snapshot,
and a Prometheus scrape does the same through a custom collector.  Health
states arrive through a callable; the monitor that probes backends lives in
:mod:`jano.swap.health`.

The modules:

:mod:`jano.telemetry.recorder`
    what the request path feeds: counters, the ``/usage`` ring, windows.
:mod:`jano.telemetry.series`
    the per-model request series, plain numbers until a scrape reads them.
:mod:`jano.telemetry.views`
    the ``/status`` and ``/usage`` JSON bodies.
:mod:`jano.telemetry.export`
    the Prometheus export: scrape-time collector, content negotiation.
:mod:`jano.telemetry.facade`
    :class:`Telemetry`, wiring the three around Jano's own registry.

Conventions kept throughout:

- ``None`` (JSON ``null``) means "not observed"; it is never replaced by 0 in
  ``/status`` or ``/usage``.
- Prometheus ``model`` label values come only from configured model names; a
  model nobody configured is counted under ``model=""``, so a client cannot
  grow the label set by inventing names.
"""

from __future__ import annotations

from jano.telemetry.export import wants_openmetrics
from jano.telemetry.facade import Telemetry
from jano.telemetry.recorder import (
    DISCONNECT_PHASES,
    RECENT_SWAPS,
    REJECTION_REASONS,
    SWAP_RESULTS,
)

__all__ = [
    "DISCONNECT_PHASES",
    "RECENT_SWAPS",
    "REJECTION_REASONS",
    "SWAP_RESULTS",
    "Telemetry",
    "wants_openmetrics",
]
