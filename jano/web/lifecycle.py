"""
Model lifecycle on request: load and unload endpoints, and what each model's
state is (``loaded``, ``loading``, ``unloading``, ``unloaded``) for the model
lists, from the scheduler's own knowledge (never probed, never guessed).

A model served by replicas is loaded on the replica a request would choose
(one where it is loaded or loading already, else the cheapest load; 409 only
when every replica's group has work in flight for another model), and
unloaded from every replica.
"""

from __future__ import annotations

from typing import Literal, Optional, cast

from twisted.logger import Logger

from jano.errors import Busy, Draining
from jano.interfaces import Lifecycle
from jano.records import ModelSpec, ModelState, SchedulerSnapshot, iso
from jano.telemetry import views

__all__ = ["ModelStatus", "model_status", "request_load", "request_unload", "ollama_ps"]

ModelStatus = Literal["loaded", "loading", "unloading", "unloaded"]

log = Logger()


def model_status(spec: ModelSpec, snap: SchedulerSnapshot) -> ModelStatus:
    """What ``spec`` is doing now, by its group's slot (as ``/status`` says it)."""
    state = next((m for m in snap.models if m.name == spec.name), None)
    if state is None:
        return "loaded" if spec.always_on else "unloaded"
    return cast(ModelStatus, views.model_status(state, snap))


def request_load(scheduler: Lifecycle, spec: ModelSpec) -> tuple[int, dict[str, object]]:
    """
    Start loading ``spec`` unless its group has work in flight for another
    model (never evicted: 409).  ``(status, body)``: 200 when it is loaded
    already, 202 when loading started or is under way.
    """
    snap = scheduler.snapshot()
    status = model_status(spec, snap)
    if spec.always_on:
        return 409, _error(f"model {spec.name!r} is always_on: it is always loaded", "conflict")
    if status in ("loaded", "loading"):
        return (200 if status == "loaded" else 202), {"model": spec.name, "status": status}
    busy = _busy(spec, spec.group, snap)
    if spec.replicas:
        states = [r for r in snap.replicas if r.serves == spec.name]
        each = [_busy(spec, r.group, snap, r.name) for r in states]
        busy = each[0] if each and all(each) else []
    if busy:
        return 409, _error(f"group {spec.group!r} has {busy[0].in_flight} requests in flight for "
                           f"{busy[0].name!r}; Jano never evicts work in flight, try again later",
                           "conflict")
    try:
        d = scheduler.load(spec.name)
    except Busy as e:
        return 409, _error(str(e), "conflict")
    d.addErrback(_load_failed, spec.name)
    return 202, {"model": spec.name, "status": "loading"}


def _busy(spec: ModelSpec, group: str, snap: SchedulerSnapshot,
          name: Optional[str] = None) -> list[ModelState]:
    """The other models of ``group`` with requests in flight (a load would wait for them)."""
    name = name or spec.name
    return [m for m in (*snap.models, *snap.replicas)
            if m.group == group and not m.always_on and m.name != name and m.in_flight]


def _load_failed(failure: object, name: str) -> None:
    log.warn("load of {model} failed: {cause}", model=name,
             cause=getattr(failure, "getErrorMessage", lambda: failure)())


def request_unload(scheduler: Lifecycle, spec: ModelSpec) -> tuple[int, dict[str, object]]:
    """Unload ``spec``: 202 when started, 200 when it was not loaded, 409 when it has work."""
    try:
        started = scheduler.unload(spec.name)
    except Busy as e:
        return 409, _error(str(e), "conflict")
    except Draining:
        return 503, _error("Jano is shutting down", "draining")
    if not started:
        return 200, {"model": spec.name, "status": "unloaded"}
    return 202, {"model": spec.name, "status": "unloading"}


def ollama_ps(models: tuple[ModelSpec, ...], snap: SchedulerSnapshot) -> dict[str, object]:
    """
    ``GET /api/ps`` as Ollama shapes it: the loaded models, with
    ``expires_at`` when an idle TTL will unload them (``null`` otherwise).
    Sizes are not reported: Jano does not measure memory.
    """
    unload_at = {g.resident: g.unload_at for g in snap.groups if g.resident}
    served = {r.serves for r in snap.replicas}
    for state in snap.models:  # a model served by replicas: until the last is unloaded
        if state.name in served:
            unload_at[state.name] = state.unload_at
    loaded = [m for m in models if model_status(m, snap) == "loaded"]
    return {"models": [
        {"name": m.name, "model": m.name, "expires_at": iso(unload_at.get(m.name)),
         "size": None, "size_vram": None, "digest": None, "details": None}
        for m in loaded]}


def _error(message: str, code: str, kind: Optional[str] = None) -> dict[str, object]:
    return {"error": {"message": message, "type": kind or "invalid_request_error", "code": code}}
