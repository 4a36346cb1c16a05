"""
Tests for :mod:`jano.swap.health`: polling each resident model's health URL.

Every clock is a :class:`twisted.internet.task.Clock`; nothing sleeps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from jano.records import ModelSpec
from jano.swap.health import HealthMonitor

BIG = ModelSpec(name="big", upstream="http://127.0.0.1:8080")
SMALL = ModelSpec(name="small", upstream="http://127.0.0.1:8081")
EMBED = ModelSpec(
    name="embed", upstream="http://127.0.0.1:8082", group="embed", always_on=True
)
MODELS = (BIG, SMALL, EMBED)


class FakeProbe:
    """Records each probe; the test answers them by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[int]]] = []
        self.answer: Optional[int] = None
        self.raises = False

    def __call__(self, url: str) -> Deferred[int]:
        if self.raises:
            raise ConnectionError("no route")
        d: Deferred[int] = succeed(self.answer) if self.answer is not None else Deferred()
        self.calls.append((url, d))
        return d

    def urls(self) -> list[str]:
        return [url for url, _ in self.calls]


def make_monitor(
    resident: set[str], *, interval: float = 5.0
) -> tuple[Clock, FakeProbe, HealthMonitor]:
    clock = Clock()
    probe = FakeProbe()
    monitor = HealthMonitor(
        clock,
        MODELS,
        probe,
        interval=interval,
        is_resident=lambda spec: spec.name in resident,
    )
    return clock, probe, monitor


def test_health_states() -> None:
    resident = {"big", "embed"}
    clock, probe, monitor = make_monitor(resident)
    # Residency is known without a probe: a model not holding its slot reads unloaded.
    assert monitor.states() == {"big": "unknown", "small": "unloaded", "embed": "unknown"}
    monitor.startService()
    # The first tick runs at once; "small" is not resident, so it is not probed.
    assert probe.urls() == ["http://127.0.0.1:8080/health", "http://127.0.0.1:8082/health"]
    assert monitor.states() == {"big": "unknown", "small": "unloaded", "embed": "unknown"}
    probe.calls[0][1].callback(503)
    probe.calls[1][1].callback(200)
    assert monitor.states() == {"big": "loading", "small": "unloaded", "embed": "up"}

    clock.advance(5)
    probe.calls[2][1].callback(200)
    probe.calls[3][1].callback(500)
    assert monitor.states() == {"big": "up", "small": "unloaded", "embed": "down"}

    clock.advance(5)
    probe.calls[4][1].errback(ConnectionRefusedError())
    assert monitor.states()["big"] == "down"
    monitor.stopService()


def test_health_one_probe_in_flight_and_timeout() -> None:
    clock, probe, monitor = make_monitor({"big"})
    monitor.startService()
    assert len(probe.calls) == 1
    clock.advance(5)
    assert len(probe.calls) == 1  # still waiting on the first one
    assert monitor.states()["big"] == "unknown"
    clock.advance(5)  # two intervals: the hung probe is cancelled, then this tick probes anew
    assert probe.calls[0][1].called
    assert monitor.states()["big"] == "down"
    assert len(probe.calls) == 2
    probe.calls[1][1].callback(200)
    assert monitor.states()["big"] == "up"
    monitor.stopService()


@pytest.mark.logs_errors
def test_health_raising_probe_does_not_stop_the_loop(
    error_observer: list[dict[str, Any]],
) -> None:
    clock, probe, monitor = make_monitor({"big", "small"})
    probe.raises = True
    monitor.startService()
    assert monitor.states()["big"] == "down"
    assert monitor.states()["small"] == "down"
    probe.raises = False
    probe.answer = 200
    clock.advance(5)
    assert monitor.states() == {"big": "up", "small": "up", "embed": "unloaded"}
    monitor.stopService()
    assert [e["log_format"] for e in error_observer] == ["Health probe of {model} raised"] * 2


@pytest.mark.logs_errors
def test_health_failing_deferred_and_broken_is_resident_do_not_stop_the_loop(
    error_observer: list[dict[str, Any]],
) -> None:
    clock = Clock()
    calls: list[str] = []
    broken = {"flag": True}

    def probe(url: str) -> Deferred[int]:
        calls.append(url)
        return fail(RuntimeError("boom"))

    def is_resident(spec: ModelSpec) -> bool:
        if broken["flag"] and spec.name == "small":
            raise KeyError(spec.name)
        return True

    monitor = HealthMonitor(clock, MODELS, probe, interval=1.0, is_resident=is_resident)
    monitor.startService()
    assert monitor.states() == {"big": "down", "small": "unknown", "embed": "down"}
    broken["flag"] = False
    clock.advance(1)
    clock.advance(1)
    assert len(calls) == 2 + 3 + 3
    assert monitor.states()["small"] == "down"
    monitor.stopService()
    assert [e["log_format"] for e in error_observer] == ["Health check of {model} failed"]


def test_health_unloaded_discards_the_probe_in_flight() -> None:
    resident = {"big"}
    clock, probe, monitor = make_monitor(resident)
    monitor.startService()
    pending = probe.calls[0][1]
    resident.clear()
    clock.advance(5)
    assert monitor.states()["big"] == "unloaded"
    assert pending.called  # cancelled: its late answer cannot overwrite "unloaded"
    monitor.stopService()


def test_health_stop_cancels_probes_without_marking_down() -> None:
    clock, probe, monitor = make_monitor({"big"})
    monitor.startService()
    monitor.stopService()
    assert probe.calls[0][1].called
    assert monitor.states()["big"] == "unknown"
    clock.advance(60)
    assert len(probe.calls) == 1


def test_health_set_models() -> None:
    clock, probe, monitor = make_monitor({"big", "small", "moved"})
    probe.answer = 200
    monitor.startService()
    assert monitor.states()["big"] == "up"
    moved = replace(SMALL, name="small", upstream="http://127.0.0.1:9999")
    monitor.set_models((BIG, moved))
    assert monitor.states() == {"big": "up", "small": "unknown"}
    clock.advance(5)
    assert probe.urls()[-1] == "http://127.0.0.1:9999/health"
    assert monitor.states() == {"big": "up", "small": "up"}
    monitor.stopService()


def test_health_follows_residency_between_probes() -> None:
    resident = {"big", "embed"}
    clock, probe, monitor = make_monitor(resident)
    monitor.startService()
    probe.calls[0][1].callback(200)
    assert monitor.states()["big"] == "up"
    resident.discard("big")
    resident.add("small")  # a swap happened; no probe has run since
    states = monitor.states()
    assert states["big"] == "unloaded" and states["small"] == "unknown"
    monitor.observed("small", "up")
    assert monitor.states()["small"] == "up"
    monitor.stopService()


def test_on_probed_hears_only_changes_a_probe_made() -> None:
    clock, probe, monitor = make_monitor({"big"})
    heard: list[tuple[str, Optional[str], str]] = []
    monitor.on_probed = lambda name, old, new: heard.append((name, old, new))
    monitor.observed("big", "up")  # learnt from a swap, not a probe: not told
    monitor.startService()
    probe.calls[0][1].callback(200)  # up -> up: no change
    clock.advance(5)
    probe.calls[1][1].errback(ConnectionRefusedError())
    clock.advance(5)
    probe.calls[2][1].callback(200)
    assert heard == [("big", "up", "down"), ("big", "down", "up")]
    monitor.stopService()
