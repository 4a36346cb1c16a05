"""
The ``/status`` and ``/usage`` bodies: JSON-ready, camelCase.

``None`` (JSON ``null``) means "not observed"; it is never replaced by 0.
What describes *now* (queue depth, residency, health) is handed in by the
caller, read when somebody asks; the rest comes from the
:class:`~jano.telemetry.recorder.Recorder`.

A model served by replicas is one model everywhere clients look (its counts
added up, loaded when one replica is); ``replicas`` lists each replica on its
own, and ``groups`` shows what each group holds (a replica by its own name).
"""

from __future__ import annotations

import itertools
from typing import Mapping, Optional

from jano.records import (HealthState, ModelState, SchedulerSnapshot, SwapEvent, UsageRecord, iso,
                          ms)
from jano.telemetry.recorder import Recorder

__all__ = ["status_body", "usage_body"]


def status_body(
    recorder: Recorder,
    *,
    version: str,
    now: float,
    snap: SchedulerSnapshot,
    health: Mapping[str, HealthState],
) -> dict[str, object]:
    """The ``/status`` document: JSON-ready, camelCase, ``null`` when unobserved."""
    groups: dict[str, object] = {}
    for group in snap.groups:
        swap: Optional[dict[str, object]] = None
        if group.swapping_to is not None:
            swap = {"to": group.swapping_to, "since": iso(group.swap_started_at)}
        groups[group.name] = {
            "resident": group.resident,
            "loadedAt": iso(group.loaded_at),
            "swapInProgress": swap,
            "residents": list(group.residents),
            # The configured figures (models[].memory, groups.<name>.memory), never a measurement.
            "memoryBudgetMiB": group.memory_budget,
            "memoryUsedMiB": group.memory_used,
        }
    serves = {r.name: r.serves for r in snap.replicas}
    main = next((g for g in snap.groups if g.name == "default"), None)
    if main is None and snap.groups:
        main = snap.groups[0]

    queue_by_model = {m.name: m.queued for m in snap.models}
    in_flight_by_model = {m.name: m.in_flight for m in snap.models}
    oldest = min(
        (m.oldest_queued_at for m in snap.models if m.oldest_queued_at is not None),
        default=None,
    )
    models_down = {
        m.name: {"until": iso(m.down_until), "reason": m.down_reason}
        for m in snap.models
        if m.down_until is not None and m.down_until > now
    }

    last = recorder.last_swap
    last_swap = _swap_entry(last) if last is not None else None
    recent, recent_by_model = recorder.recent_gen_tok_s(now)
    started_at = recorder.started_at

    return {
        "version": version,
        "startedAt": iso(started_at),
        "uptimeSeconds": round(max(0.0, now - started_at), 3),
        "currentModel": (serves.get(main.resident, main.resident)
                         if main is not None and main.resident is not None else None),
        "currentModelLoadedAt": iso(main.loaded_at) if main is not None else None,
        "groups": groups,
        "queueDepth": sum(queue_by_model.values()),
        "queueDepthByModel": queue_by_model,
        "inFlight": sum(in_flight_by_model.values()),
        "inFlightByModel": in_flight_by_model,
        "oldestWaitingMs": ms(max(0.0, now - oldest)) if oldest is not None else None,
        "lastSwapDurationMs": ms(last.duration) if last is not None else None,
        "lastSwap": last_swap,
        "recentSwaps": [_swap_entry(e) for e in reversed(recorder.recent_swaps)],
        "swapsLastHour": recorder.swaps_last_hour(now, snap),
        "recentGenTokS": recent,
        "recentGenTokSByModel": recent_by_model,
        "recentWindowSeconds": recorder.window,
        "requestsTotal": recorder.requests_total,
        "requestsServedTotal": recorder.served_total,
        "requestsWithoutUsageTotal": recorder.without_usage_total,
        "tokensGeneratedTotal": recorder.completion_tokens_total,
        "promptTokensTotal": recorder.prompt_tokens_total,
        "backendHealth": {k: v for k, v in health.items() if k not in serves},
        "draining": snap.draining,
        "modelsDown": models_down,
        "modelStatus": {m.name: model_status(m, snap) for m in snap.models},
        "alwaysOn": sorted(m.name for m in snap.models if m.always_on),
        "replicas": replicas_body(snap, now, health),
        "hiddenReloadsLastHour": recorder.reloads_last_hour(now)[0],
        "hiddenReloadSecondsLastHour": _round(recorder.reloads_last_hour(now)[1]),
    }


def replicas_body(snap: SchedulerSnapshot, now: float,
                  health: Mapping[str, HealthState]) -> dict[str, list[dict[str, object]]]:
    """Each model served by replicas: its replicas, in configuration order."""
    out: dict[str, list[dict[str, object]]] = {}
    for r in snap.replicas:
        down = r.down_until is not None and r.down_until > now
        out.setdefault(r.serves or "", []).append({
            "name": r.name,
            "group": r.group,
            "upstream": r.upstream,
            "status": model_status(r, snap),
            "health": health.get(r.name),
            "inFlight": r.in_flight,
            "queued": r.queued,
            "maxConcurrency": r.max_concurrency,
            "down": {"until": iso(r.down_until), "reason": r.down_reason} if down else None,
        })
    return out


#: A model served by replicas has the best of its replicas' states, in this order.
_STATUS_ORDER = ("loaded", "loading", "unloading", "unloaded")


def model_status(m: ModelState, snap: SchedulerSnapshot) -> str:
    """
    ``loaded``, ``loading``, ``unloading`` or ``unloaded``, by ``m``'s group's
    slot; for a model served by replicas, the best of theirs.
    """
    if m.always_on:
        return "loaded"
    if m.serves is None and snap.replicas:
        found = {model_status(r, snap) for r in snap.replicas if r.serves == m.name}
        if found:
            return next(s for s in _STATUS_ORDER if s in found)
    for g in snap.groups:
        if g.name == m.group:
            if g.unloading == m.name:
                return "unloading"
            if g.swapping_to == m.name:
                return "loading"
            if g.resident == m.name or m.name in g.residents:
                return "loaded"
    return "unloaded"


def usage_body(recorder: Recorder, limit: int) -> list[dict[str, object]]:
    """
    The newest ``limit`` finished requests, newest first, JSON-ready.

    Paths lose their query string here: queries can carry user text.
    """
    if limit <= 0:
        return []
    return [usage_entry(r) for r in itertools.islice(reversed(recorder.ring), limit)]


def _swap_entry(event: SwapEvent) -> dict[str, object]:
    return {
        "group": event.group,
        "from": event.from_model,
        "to": event.to_model,
        "evicted": list(event.evicted),
        "kind": event.kind,
        "reason": event.reason,
        "result": event.result,
        "error": event.error,
        "durationMs": ms(event.duration),
        "phasesMs": {name: ms(seconds) for name, seconds in event.phases} or None,
        "startedAt": iso(event.started_at),
        "at": iso(event.started_at + event.duration),
    }


def usage_entry(record: UsageRecord) -> dict[str, object]:
    usage = record.usage
    path = record.path.split("?", 1)[0].split("#", 1)[0]
    entry: dict[str, object] = {
        "id": record.id,
        "model": record.model,
        "caller": record.caller,
        "method": record.method,
        "path": path,
        "status": record.status,
        "stream": record.stream,
        "arrivedAt": iso(record.arrived_at),
        "queueWaitMs": ms(record.queue_wait),
        "waitedForSwap": record.waited_for_swap,
        "ttfbMs": ms(record.ttfb),
        "durationMs": ms(record.duration),
        "promptTokens": None,
        "cachedTokens": None,
        "completionTokens": None,
        "genTokS": None,
        "genTokSSource": None,
        "promptTokS": None,
        "usageSource": None,
        "backendLoadMs": None,
        "outcome": record.outcome,
    }
    if usage is not None:
        entry["promptTokens"] = usage.prompt_tokens
        entry["cachedTokens"] = usage.cached_tokens
        entry["completionTokens"] = usage.completion_tokens
        entry["genTokS"] = _round(usage.gen_tok_s)
        entry["genTokSSource"] = usage.timed_by if usage.gen_tok_s is not None else None
        entry["promptTokS"] = _round(usage.prompt_tok_s)
        entry["backendLoadMs"] = _round(usage.load_ms)
        entry["usageSource"] = usage.source
    return entry


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)
