"""
Tests for :mod:`jano.telemetry`: /status, /usage and /metrics.

Every clock is a :class:`twisted.internet.task.Clock`; nothing sleeps.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from jano.records import (
    GroupState,
    HealthState,
    ModelSpec,
    ModelState,
    SchedulerSnapshot,
    SwapEvent,
    Usage,
    UsageRecord,
)
from jano.telemetry import RECENT_SWAPS, Telemetry, wants_openmetrics
from jano.telemetry.series import Buckets

BIG = ModelSpec(name="big", upstream="http://127.0.0.1:8080")
SMALL = ModelSpec(name="small", upstream="http://127.0.0.1:8081")
EMBED = ModelSpec(
    name="embed", upstream="http://127.0.0.1:8082", group="embed", always_on=True
)
MODELS = (BIG, SMALL, EMBED)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeScheduler:
    """Holds whatever snapshot the test sets; telemetry reads it on demand."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.models: tuple[ModelState, ...] = ()
        self.groups: tuple[GroupState, ...] = ()
        self.draining = False
        self.calls = 0

    def snapshot(self) -> SchedulerSnapshot:
        self.calls += 1
        return SchedulerSnapshot(
            at=self.clock.seconds(),
            models=self.models,
            groups=self.groups,
            draining=self.draining,
        )


def model_state(name: str, **kw: object) -> ModelState:
    fields: dict[str, object] = dict(
        name=name,
        group="default",
        always_on=False,
        queued=0,
        in_flight=0,
        oldest_queued_at=None,
        resident=False,
    )
    fields.update(kw)
    return ModelState(**fields)  # type: ignore[arg-type]


def make(
    *, usage_ring: int = 1000, window: float = 60.0, start: float = 1_700_000_000.0
) -> tuple[Clock, FakeScheduler, dict[str, HealthState], Telemetry]:
    clock = Clock()
    clock.advance(start)
    scheduler = FakeScheduler(clock)
    health: dict[str, HealthState] = {m.name: "unknown" for m in MODELS}
    telemetry = Telemetry(
        clock,
        MODELS,
        version="1.2.3",
        snapshot=scheduler.snapshot,
        health=lambda: health,
        usage_ring=usage_ring,
        window=window,
    )
    return clock, scheduler, health, telemetry


def record(
    telemetry: Telemetry,
    *,
    model: Optional[str] = "big",
    status: Optional[int] = 200,
    usage: Optional[Usage] = None,
    outcome: str = "completed",
    path: str = "/v1/chat/completions",
    arrived_at: float = 1_700_000_000.0,
    queue_wait: Optional[float] = 0.25,
    ttfb: Optional[float] = 0.5,
    duration: Optional[float] = 2.0,
) -> UsageRecord:
    return UsageRecord(
        id=telemetry.next_request_id(),
        model=model,
        method="POST",
        path=path,
        status=status,
        stream=True,
        arrived_at=arrived_at,
        queue_wait=queue_wait,
        waited_for_swap=False,
        ttfb=ttfb,
        duration=duration,
        usage=usage,
        outcome=outcome,  # type: ignore[arg-type]
    )


def backend_usage(completion: int, generation_ms: float, prompt: int = 10) -> Usage:
    return Usage(
        source="llamacpp-timings",
        prompt_tokens=prompt,
        cached_tokens=2,
        completion_tokens=completion,
        prompt_ms=5.0,
        generation_ms=generation_ms,
        gen_tok_s=completion / (generation_ms / 1000.0),
        prompt_tok_s=2000.0,
        timed_by="backend",
    )


def router_usage(completion: int) -> Usage:
    return Usage(
        source="openai-usage",
        prompt_tokens=7,
        completion_tokens=completion,
        gen_tok_s=999.0,
        timed_by="router",
    )


def swap(
    to: str, started_at: float, duration: float = 4.0, result: str = "ok", group: str = "default"
) -> SwapEvent:
    return SwapEvent(
        group=group,
        from_model="small" if to == "big" else "big",
        to_model=to,
        started_at=started_at,
        duration=duration,
        result=result,  # type: ignore[arg-type]
        error=None if result == "ok" else "exit status 1",
    )


def scrape(telemetry: Telemetry, accept: Optional[str] = None) -> Samples:
    content_type, body = telemetry.metrics(accept)
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def label_values(samples: Samples) -> set[str]:
    return {v for (_, labels) in samples for _, v in labels}


# -- /status -----------------------------------------------------------------


def test_status_before_any_observation_is_null_not_zero() -> None:
    clock, _, _, telemetry = make()
    status = telemetry.status()
    assert status["version"] == "1.2.3"
    assert status["startedAt"] == "2023-11-14T22:13:20.000Z"
    assert status["uptimeSeconds"] == 0
    for key in (
        "currentModel",
        "currentModelLoadedAt",
        "oldestWaitingMs",
        "lastSwapDurationMs",
        "lastSwap",
        "recentGenTokS",
    ):
        assert status[key] is None, key
    assert status["groups"] == {}
    assert status["queueDepth"] == 0
    assert status["inFlight"] == 0
    assert status["swapsLastHour"] == 0
    assert status["recentGenTokSByModel"] == {}
    for key in (
        "requestsTotal",
        "requestsServedTotal",
        "requestsWithoutUsageTotal",
        "tokensGeneratedTotal",
        "promptTokensTotal",
    ):
        assert status[key] == 0, key
    assert status["draining"] is False
    assert status["modelsDown"] == {}
    assert status["backendHealth"] == {"big": "unknown", "small": "unknown", "embed": "unknown"}
    clock.advance(12.5)
    assert telemetry.status()["uptimeSeconds"] == 12.5


def test_status_reads_the_scheduler_at_call_time() -> None:
    clock, scheduler, health, telemetry = make(start=1000.0)
    scheduler.groups = (
        GroupState(name="embed", resident="embed", loaded_at=900.0, residents=("embed",)),
        GroupState(
            name="default",
            resident="big",
            residents=("big",),
            loaded_at=950.0,
            swapping_to="small",
            swap_started_at=990.0,
        ),
    )
    scheduler.models = (
        model_state("big", queued=2, in_flight=3, oldest_queued_at=995.5, resident=True),
        model_state("small", queued=1, oldest_queued_at=998.0),
        model_state("embed", group="embed", always_on=True, in_flight=1, resident=True),
    )
    scheduler.draining = True
    health["big"] = "up"
    status = telemetry.status()
    assert status["currentModel"] == "big"  # the "default" group, not the first one
    assert status["currentModelLoadedAt"] == "1970-01-01T00:15:50.000Z"
    assert status["groups"] == {
        "embed": {"resident": "embed", "loadedAt": "1970-01-01T00:15:00.000Z", "swapInProgress": None,
                  "residents": ["embed"], "memoryBudgetMiB": None, "memoryUsedMiB": None},
        "default": {
            "resident": "big",
            "loadedAt": "1970-01-01T00:15:50.000Z",
            "swapInProgress": {"to": "small", "since": "1970-01-01T00:16:30.000Z"},
            "residents": ["big"], "memoryBudgetMiB": None, "memoryUsedMiB": None,
        },
    }
    assert status["queueDepth"] == 3
    assert status["queueDepthByModel"] == {"big": 2, "small": 1, "embed": 0}
    assert status["inFlight"] == 4
    assert status["inFlightByModel"] == {"big": 3, "small": 0, "embed": 1}
    assert status["oldestWaitingMs"] == 4500.0
    assert status["draining"] is True
    assert status["backendHealth"]["big"] == "up"  # type: ignore[index]
    # The swap in progress started within the hour: it counts as an attempt.
    assert status["swapsLastHour"] == 1

    clock.advance(1.5)
    assert telemetry.status()["oldestWaitingMs"] == 6000.0
    scheduler.models = ()
    assert telemetry.status()["oldestWaitingMs"] is None


def test_current_model_falls_back_to_the_first_group() -> None:
    _, scheduler, _, telemetry = make()
    scheduler.groups = (
        GroupState(name="gpu", resident=None, loaded_at=None),
        GroupState(name="other", resident="small", loaded_at=5.0),
    )
    status = telemetry.status()
    assert status["currentModel"] is None
    assert status["currentModelLoadedAt"] is None
    scheduler.groups = scheduler.groups[::-1]
    assert telemetry.status()["currentModel"] == "small"


def test_models_down_lists_only_models_still_down() -> None:
    clock, scheduler, _, telemetry = make(start=100.0)
    scheduler.models = (
        model_state("big", down_until=130.0, down_reason="swap failed: exit status 1"),
        model_state("small", down_until=90.0, down_reason="old"),
    )
    assert telemetry.status()["modelsDown"] == {
        "big": {"until": "1970-01-01T00:02:10.000Z", "reason": "swap failed: exit status 1"}
    }
    clock.advance(30)
    assert telemetry.status()["modelsDown"] == {}


def test_recent_gen_tok_s_is_token_weighted_and_expires() -> None:
    clock, _, _, telemetry = make()
    # 100 tokens in 1 s and 300 tokens in 2 s: (100 + 300) / 3 s, not mean(100, 150).
    telemetry.request_finished(record(telemetry, usage=backend_usage(100, 1000.0)))
    clock.advance(30)
    telemetry.request_finished(record(telemetry, model="small", usage=backend_usage(300, 2000.0)))
    status = telemetry.status()
    assert status["recentGenTokS"] == pytest.approx(400 / 3, abs=1e-3)
    assert status["recentGenTokSByModel"] == {
        "big": 100.0,
        "small": 150.0,
    }
    clock.advance(30)  # the first is now exactly 60 s old: out of the window
    assert telemetry.status()["recentGenTokS"] == 150.0
    clock.advance(30.001)
    status = telemetry.status()
    assert status["recentGenTokS"] is None
    assert status["recentGenTokSByModel"] == {}
    # Totals are not windowed.
    assert status["tokensGeneratedTotal"] == 400


def test_recent_gen_tok_s_ignores_router_timed_and_untimed_records() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(record(telemetry, usage=router_usage(500)))
    untimed = Usage(source="openai-usage", prompt_tokens=3, completion_tokens=40)
    telemetry.request_finished(record(telemetry, usage=untimed))
    zero_time = backend_usage(10, 1000.0)._replace(generation_ms=0.0)
    telemetry.request_finished(record(telemetry, usage=zero_time))
    status = telemetry.status()
    assert status["recentGenTokS"] is None
    assert status["tokensGeneratedTotal"] == 550
    telemetry.request_finished(record(telemetry, usage=backend_usage(50, 500.0)))
    assert telemetry.status()["recentGenTokS"] == 100.0


def test_swaps_last_hour_and_last_swap() -> None:
    clock, scheduler, _, telemetry = make(start=10_000.0)
    telemetry.swap_finished(swap("small", started_at=10_000.0, duration=3.0))
    clock.advance(1800)
    telemetry.swap_finished(
        swap("big", started_at=11_790.0, duration=12.5, result="timeout")
    )
    status = telemetry.status()
    assert status["swapsLastHour"] == 2
    assert status["lastSwapDurationMs"] == 12500.0
    assert status["lastSwap"] == {
        "group": "default",
        "from": "small",
        "to": "big",
        "evicted": [],
        "kind": "swap",
        "reason": None,
        "result": "timeout",
        "error": "exit status 1",
        "durationMs": 12500.0,
        "phasesMs": None,
        "startedAt": "1970-01-01T03:16:30.000Z",
        "at": "1970-01-01T03:16:42.500Z",
    }
    clock.advance(1800)  # the first started exactly an hour ago
    assert telemetry.status()["swapsLastHour"] == 1
    clock.advance(1790)
    status = telemetry.status()
    assert status["swapsLastHour"] == 0
    assert status["lastSwapDurationMs"] == 12500.0  # "last" never expires


def test_swap_in_progress_is_not_counted_twice() -> None:
    clock, scheduler, _, telemetry = make(start=500.0)
    scheduler.groups = (
        GroupState(name="default", resident="big", loaded_at=1.0, swapping_to="small", swap_started_at=480.0),
    )
    assert telemetry.status()["swapsLastHour"] == 1
    # The swapper reports the end before the scheduler clears its flag.
    telemetry.swap_finished(swap("small", started_at=480.0, duration=20.0))
    assert telemetry.status()["swapsLastHour"] == 1


def test_swaps_reported_out_of_start_order_expire_correctly() -> None:
    clock, _, _, telemetry = make(start=0.0)
    clock.advance(100)
    telemetry.swap_finished(swap("big", started_at=50.0, group="a"))
    telemetry.swap_finished(swap("small", started_at=10.0, duration=90.0, group="b"))
    clock.advance(3555)  # now 3655: 50 is out, 10 is out, both behind
    assert telemetry.status()["swapsLastHour"] == 0


def test_request_totals() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(record(telemetry, usage=backend_usage(20, 100.0, prompt=30)))
    telemetry.request_finished(record(telemetry, usage=None))  # completed, no usage found
    telemetry.request_finished(record(telemetry, usage=None, status=429, outcome="rejected"))
    telemetry.request_finished(record(telemetry, usage=None, status=None, outcome="client_disconnected"))
    telemetry.request_finished(record(telemetry, usage=router_usage(5)))
    status = telemetry.status()
    assert status["requestsTotal"] == 5
    assert status["requestsServedTotal"] == 3
    assert status["requestsWithoutUsageTotal"] == 1
    assert status["tokensGeneratedTotal"] == 25
    assert status["promptTokensTotal"] == 37


def test_request_ids_are_unique_and_increasing() -> None:
    _, _, _, telemetry = make()
    assert [telemetry.next_request_id() for _ in range(3)] == [1, 2, 3]


# -- /usage ------------------------------------------------------------------


def test_usage_ring_keeps_the_newest_first() -> None:
    _, _, _, telemetry = make(usage_ring=3)
    records = [record(telemetry) for _ in range(5)]
    for r in records:
        telemetry.request_finished(r)
    assert [e["id"] for e in telemetry.usage(3)] == [5, 4, 3]
    assert [e["id"] for e in telemetry.usage(2)] == [5, 4]
    assert [e["id"] for e in telemetry.usage(100)] == [5, 4, 3]
    assert telemetry.usage(0) == []


def test_usage_entry_fields() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(
        record(
            telemetry,
            path="/v1/chat/completions?secret=prompt+text",
            usage=backend_usage(50, 500.0, prompt=12),
            arrived_at=1.5,
            queue_wait=0.0125,
            ttfb=0.3,
            duration=1.0,
        )
    )
    (entry,) = telemetry.usage(10)
    assert entry == {
        "id": 1,
        "model": "big",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "stream": True,
        "arrivedAt": "1970-01-01T00:00:01.500Z",
        "queueWaitMs": 12.5,
        "waitedForSwap": False,
        "ttfbMs": 300.0,
        "durationMs": 1000.0,
        "promptTokens": 12,
        "cachedTokens": 2,
        "completionTokens": 50,
        "genTokS": 100.0,
        "genTokSSource": "backend",
        "promptTokS": 2000.0,
        "usageSource": "llamacpp-timings",
        "backendLoadMs": None,
        "caller": None,
        "outcome": "completed",
    }


def test_usage_entry_without_usage_is_null() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(
        record(telemetry, model=None, status=None, outcome="rejected", queue_wait=None, ttfb=None, duration=None)
    )
    telemetry.request_finished(record(telemetry, usage=router_usage(5)))
    second, first = telemetry.usage(10)
    for key in (
        "model",
        "status",
        "queueWaitMs",
        "ttfbMs",
        "durationMs",
        "promptTokens",
        "cachedTokens",
        "completionTokens",
        "genTokS",
        "genTokSSource",
        "promptTokS",
        "usageSource",
    ):
        assert first[key] is None, key
    assert second["genTokSSource"] == "router"
    assert second["cachedTokens"] is None


# -- /metrics ----------------------------------------------------------------


def test_series_exist_from_the_start() -> None:
    _, _, _, telemetry = make()
    samples = scrape(telemetry)
    for model in ("big", "small", "embed"):
        assert value(samples, "jano_prompt_tokens_total", model=model) == 0
        assert value(samples, "jano_generation_tokens_total", model=model) == 0
        assert value(samples, "jano_generation_timed_tokens_total", model=model) == 0
        assert value(samples, "jano_generation_seconds_total", model=model) == 0
        assert value(samples, "jano_requests_without_usage_total", model=model) == 0
        assert value(samples, "jano_request_duration_seconds_count", model=model) == 0
        assert value(samples, "jano_time_to_first_byte_seconds_count", model=model) == 0
        assert value(samples, "jano_queue_wait_seconds_count", model=model) == 0
        assert value(samples, "jano_client_disconnects_total", model=model, phase="streaming") == 0
    assert value(samples, "jano_model_swaps_total", to_model="big", result="failed") == 0
    assert ("jano_model_swaps_total", frozenset({("to_model", "embed"), ("result", "ok")})) not in samples
    assert value(samples, "jano_queue_rejections_total", reason="queue_full") == 0
    assert value(samples, "jano_queue_rejections_total", reason="other") == 0
    assert value(samples, "jano_build_info", version="1.2.3") == 1
    assert value(samples, "jano_uptime_seconds") == 0
    assert value(samples, "jano_queue_oldest_age_seconds") == 0  # 0, not absent, when nothing waits


def test_request_metrics() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(record(telemetry, usage=backend_usage(40, 2000.0, prompt=100)))
    telemetry.request_finished(record(telemetry, usage=router_usage(60), duration=30.0, ttfb=1.5))
    telemetry.request_finished(record(telemetry, usage=None))
    telemetry.request_finished(
        record(telemetry, status=None, outcome="client_disconnected", queue_wait=None, ttfb=None, duration=3.0)
    )
    samples = scrape(telemetry)
    assert value(samples, "jano_requests_total", model="big", code="200", caller="") == 3
    assert value(samples, "jano_requests_total", model="big", code="0", caller="") == 1
    assert value(samples, "jano_request_duration_seconds_count", model="big") == 4
    assert value(samples, "jano_request_duration_seconds_sum", model="big") == 37.0
    assert value(samples, "jano_request_duration_seconds_bucket", model="big", le="2.5") == 2
    assert value(samples, "jano_time_to_first_byte_seconds_count", model="big") == 3
    assert value(samples, "jano_queue_wait_seconds_count", model="big") == 3
    assert value(samples, "jano_prompt_tokens_total", model="big") == 107
    assert value(samples, "jano_generation_tokens_total", model="big") == 100
    # Only the backend-timed response enters the honest tokens/seconds pair.
    assert value(samples, "jano_generation_timed_tokens_total", model="big") == 40
    assert value(samples, "jano_generation_seconds_total", model="big") == 2.0
    assert value(samples, "jano_requests_without_usage_total", model="big") == 1
    assert value(samples, "jano_generation_tokens_total", model="small") == 0


def test_event_counters() -> None:
    _, _, _, telemetry = make()
    telemetry.queue_rejected("queue_full")
    telemetry.queue_rejected("queue_full")
    telemetry.queue_rejected("some new reason with spaces")
    telemetry.client_disconnected("small", "queued")
    telemetry.client_disconnected("small", "teleported")
    telemetry.client_disconnected(None, "streaming")
    telemetry.swap_finished(swap("small", started_at=0.0, duration=7.0))
    telemetry.swap_finished(swap("small", started_at=0.0, duration=400.0, result="failed"))
    samples = scrape(telemetry)
    assert value(samples, "jano_queue_rejections_total", reason="queue_full") == 2
    assert value(samples, "jano_queue_rejections_total", reason="other") == 1
    assert value(samples, "jano_client_disconnects_total", model="small", phase="queued") == 1
    assert value(samples, "jano_client_disconnects_total", model="small", phase="other") == 1
    assert value(samples, "jano_client_disconnects_total", model="", phase="streaming") == 1
    assert value(samples, "jano_model_swaps_total", to_model="small", result="ok") == 1
    assert value(samples, "jano_model_swaps_total", to_model="small", result="failed") == 1
    assert value(samples, "jano_model_swap_duration_seconds_bucket", to_model="small", result="ok", le="10.0") == 1
    assert value(samples, "jano_model_swap_duration_seconds_bucket", to_model="small", result="ok", le="5.0") == 0
    assert value(samples, "jano_model_swap_duration_seconds_bucket", to_model="small", result="failed", le="300.0") == 0
    assert value(samples, "jano_model_swap_duration_seconds_count", to_model="small", result="failed") == 1


def test_gauges_are_read_at_scrape_time() -> None:
    clock, scheduler, health, telemetry = make(start=200.0)
    assert scheduler.calls == 0  # registering the collector did not call it
    scheduler.models = (
        model_state("big", queued=4, in_flight=2, oldest_queued_at=190.0, resident=True),
        model_state("small", queued=1, down_until=260.0, down_reason="boom"),
        model_state("embed", group="embed", always_on=True, resident=True),
    )
    health.update(big="up", small="unloaded", embed="loading")
    clock.advance(5)
    samples = scrape(telemetry)
    assert value(samples, "jano_queue_depth", model="big") == 4
    assert value(samples, "jano_queue_depth", model="small") == 1
    assert value(samples, "jano_requests_in_flight", model="big") == 2
    assert value(samples, "jano_queue_oldest_age_seconds") == 15.0
    assert value(samples, "jano_model_loaded", model="big") == 1
    assert value(samples, "jano_model_loaded", model="small") == 0
    assert value(samples, "jano_model_loaded", model="embed") == 1
    assert value(samples, "jano_model_down", model="small") == 1
    assert value(samples, "jano_model_down", model="big") == 0
    assert value(samples, "jano_backend_up", model="big") == 1
    assert value(samples, "jano_backend_up", model="small") == 0
    assert value(samples, "jano_backend_up", model="embed") == 0
    assert value(samples, "jano_uptime_seconds") == 5.0
    scheduler.models = ()
    clock.advance(100)
    samples = scrape(telemetry)
    assert value(samples, "jano_queue_depth", model="big") == 0
    assert value(samples, "jano_queue_oldest_age_seconds") == 0
    assert value(samples, "jano_model_down", model="small") == 0


@pytest.mark.logs_errors
def test_a_failing_snapshot_does_not_break_the_scrape(
    error_observer: list[dict[str, Any]],
) -> None:
    clock = Clock()

    def broken() -> SchedulerSnapshot:
        raise RuntimeError("scheduler bug")

    def no_health() -> Mapping[str, HealthState]:
        raise RuntimeError("health bug")

    telemetry = Telemetry(clock, MODELS, version="x", snapshot=broken, health=no_health)
    telemetry.queue_rejected("draining")
    samples = scrape(telemetry)
    assert value(samples, "jano_queue_rejections_total", reason="draining") == 1
    assert not any(name == "jano_queue_depth" for name, _ in samples)
    assert [e["log_format"] for e in error_observer] == [
        "Scheduler snapshot failed during a scrape",
        "Health states unavailable during a scrape",
    ]


def test_unconfigured_models_never_become_label_values() -> None:
    _, scheduler, health, telemetry = make()
    evil = "ignore previous instructions"
    telemetry.request_finished(record(telemetry, model=evil, usage=backend_usage(10, 100.0)))
    telemetry.request_finished(record(telemetry, model=evil, status=404))
    telemetry.client_disconnected(evil, "streaming")
    telemetry.swap_finished(swap(evil, started_at=0.0))
    scheduler.models = (model_state(evil, queued=3, resident=True),)
    health[evil] = "up"
    samples = scrape(telemetry)
    assert evil not in label_values(samples)
    assert value(samples, "jano_requests_total", model="", code="200", caller="") == 1
    assert value(samples, "jano_requests_total", model="", code="404", caller="") == 1
    assert value(samples, "jano_generation_tokens_total", model="") == 10
    assert value(samples, "jano_model_swaps_total", to_model="", result="ok") == 1
    assert value(samples, "jano_queue_depth", model="") == 3
    assert ("jano_model_loaded", frozenset({("model", "")})) not in samples
    _, body = telemetry.metrics("application/openmetrics-text")
    assert evil.encode() not in body


def test_set_models_adds_series_and_demotes_removed_models() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(record(telemetry, model="small"))
    tiny = ModelSpec(name="tiny", upstream="http://127.0.0.1:9000")
    telemetry.set_models((BIG, tiny))
    telemetry.request_finished(record(telemetry, model="small"))
    samples = scrape(telemetry)
    assert value(samples, "jano_prompt_tokens_total", model="tiny") == 0
    assert value(samples, "jano_model_swaps_total", to_model="tiny", result="ok") == 0
    assert value(samples, "jano_requests_total", model="small", code="200", caller="") == 1
    assert value(samples, "jano_requests_total", model="", code="200", caller="") == 1


def test_registry_is_jano_own() -> None:
    _, _, _, telemetry = make()
    assert telemetry.registry is not REGISTRY
    assert REGISTRY.get_sample_value("jano_uptime_seconds") is None
    assert telemetry.registry.get_sample_value("jano_uptime_seconds") == 0


def test_openmetrics_when_asked() -> None:
    _, _, _, telemetry = make()
    telemetry.request_finished(record(telemetry, usage=backend_usage(40, 2000.0)))
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,"
        "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    )
    content_type, body = telemetry.metrics(prometheus_accept)
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode("utf-8")
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert families["jano_requests"].type == "counter"
    assert families["jano_build"].type == "info"
    timed = [s for s in families["jano_generation_timed_tokens"].samples if s.name.endswith("_total")]
    assert {s.labels["model"]: s.value for s in timed}["big"] == 40


@pytest.mark.parametrize(
    "accept, expected",
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("application/openmetrics-text", True),
        ("Application/OpenMetrics-Text; version=1.0.0", True),
        ("application/openmetrics-text;q=0", False),
        ("text/plain;q=1,application/openmetrics-text;q=0.5", False),
        ("text/plain;q=0.5,application/openmetrics-text;q=0.9", True),
    ],
)
def test_content_negotiation(accept: Optional[str], expected: bool) -> None:
    assert wants_openmetrics(accept) is expected
    _, _, _, telemetry = make()
    content_type, _ = telemetry.metrics(accept)
    assert content_type.startswith("application/openmetrics-text") is expected


def test_recent_swaps_list_is_bounded_and_newest_first() -> None:
    clock = Clock()
    snap = SchedulerSnapshot(at=0.0, models=(), groups=())
    t = Telemetry(clock, (), version="x", snapshot=lambda: snap, health=lambda: {})
    assert t.status()["recentSwaps"] == []
    for i in range(RECENT_SWAPS + 5):
        t.swap_finished(SwapEvent("default", None, f"m{i}", float(i), 1.0, "ok"))
    swaps = t.status()["recentSwaps"]
    assert isinstance(swaps, list) and len(swaps) == RECENT_SWAPS
    assert swaps[0]["to"] == f"m{RECENT_SWAPS + 4}" and swaps[-1]["to"] == "m5"


def test_request_histograms_count_a_value_on_a_bound_in_that_bucket() -> None:
    b = Buckets((0.1, 1.0))
    for v in (0.1, 0.5, 1.0, 7.0, 0.0):
        b.observe(v)
    assert b.cumulative() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]  # le: less or equal
    assert b.sum == pytest.approx(8.6)


def test_an_unload_is_on_the_timeline_and_counted_apart_from_swaps() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    clock, scheduler, _, telemetry = make(start=10_000.0)
    telemetry.swap_finished(SwapEvent("default", "big", None, 10_000.0, 0.4, "ok",
                                      kind="unload", reason="idle", evicted=("big",)))
    status = telemetry.status()
    assert status["swapsLastHour"] == 0 and status["lastSwap"] is None
    entry: Any = status["recentSwaps"][0]  # type: ignore[index]
    assert (entry["from"], entry["to"], entry["kind"], entry["reason"], entry["result"],
            entry["durationMs"]) == ("big", None, "unload", "idle", "ok", 400.0)
    assert entry["evicted"] == ["big"]
    ctype, body = telemetry.metrics(None)
    samples = [s for f in text_string_to_metric_families(body.decode())
               for s in f.samples if s.name == "jano_model_unloads_total"]
    assert [(s.labels, s.value) for s in samples] == [
        ({"model": "big", "result": "ok", "reason": "idle"}, 1.0)]
