#!/usr/bin/env python3
"""
How fast the usage store answers ``/usage/summary`` on a big file.

``python3 benchmarks/usage_summary.py`` fills a temporary SQLite file, through
:class:`jano.telemetry.store.UsageStore` itself, with 1,000,000 synthetic
finished requests spread over 30 days (6 models, 9 callers, a mix of
outcomes, backend- and router-timed usage, about 33,000 requests a day), then
times ``summary(by=...)`` for each ``by`` over the last hour, day, week and
the whole file, plus a few ``query()`` pages and the start-up check of the
full file.  Each figure is the median of ``--repeat`` runs (default 3; one
for the whole file), in milliseconds.  It prints Markdown tables.  About
a minute on 2 cores; ``--rows`` makes it smaller.

The store runs with an inline "thread" so the timings are the SQL alone.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jano

from jano.records import Outcome, TimedBy, Usage, UsageRecord  # noqa: E402
from jano.telemetry.store import UsageStore  # noqa: E402

T = TypeVar("T")
DAY = 86400.0
MODELS = ("qwen-32b", "llama-70b", "mistral-7b", "gemma-27b", "embed", "phi-4")
CALLERS = (None, "alice", "bob", "ci", "notebook", "agent-1", "agent-2", "eval", "web")
OUTCOMES: tuple[Outcome, ...] = ("completed",) * 90 + ("client_disconnected",) * 4 + (
    "upstream_error",) * 3 + ("upstream_stalled",) + ("rejected",) * 2


def run_now(work: Callable[[], T]) -> Deferred[T]:
    return maybeDeferred(work)


def result(d: Deferred[T]) -> T:
    out: list[Any] = []
    d.addBoth(out.append)
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value  # type: ignore[no-any-return]


def synthetic(n: int, i: int, start: float, span: float, rng: random.Random) -> UsageRecord:
    at = start + span * i / n + rng.random()
    outcome = rng.choice(OUTCOMES)
    usage: Optional[Usage] = None
    if outcome == "completed" and rng.random() < 0.9:
        tokens = rng.randint(1, 2000)
        gen_ms = tokens * rng.uniform(10.0, 40.0)
        timed_by: TimedBy = "backend" if rng.random() < 0.7 else "router"
        usage = Usage("llamacpp-timings" if timed_by == "backend" else "openai-usage",
                      prompt_tokens=rng.randint(10, 8000), cached_tokens=None,
                      completion_tokens=tokens, prompt_ms=rng.uniform(5, 900),
                      generation_ms=gen_ms, gen_tok_s=tokens / gen_ms * 1000,
                      prompt_tok_s=rng.uniform(200, 3000), timed_by=timed_by)
    dispatched = outcome != "rejected"
    return UsageRecord(
        id=i + 1, model=rng.choice(MODELS), method="POST", path="/v1/chat/completions",
        status=200 if outcome == "completed" else 502, stream=rng.random() < 0.8, arrived_at=at,
        queue_wait=rng.lognormvariate(-3, 1.5) if dispatched else None,
        waited_for_swap=rng.random() < 0.05,
        ttfb=rng.lognormvariate(-1, 0.8) if dispatched else None,
        duration=rng.uniform(0.1, 60), usage=usage, outcome=outcome, caller=rng.choice(CALLERS))


def timed(repeat: int, work: Callable[[], Deferred[Any]]) -> tuple[float, Any]:
    times = []
    out: Any = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = result(work())
        times.append((time.perf_counter() - t) * 1000)
    return median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "usage.db")
        clock = Clock()
        now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
        clock.advance(now)
        store = UsageStore(path, clock, run_in_thread=run_now, batch_max=10_000,
                           max_pending=20_000)
        result(store.start())
        rng = random.Random(1)
        t = time.perf_counter()
        for i in range(args.rows):
            store.add(synthetic(args.rows, i, now - args.days * DAY, args.days * DAY, rng))
        result(store.flush())
        fill = time.perf_counter() - t
        result(store.stop())
        size = Path(path).stat().st_size / 1e6

        store = UsageStore(path, clock, run_in_thread=run_now)
        t = time.perf_counter()
        result(store.start())
        startup = (time.perf_counter() - t) * 1000

        windows = [("last hour", now - 3600), ("last day", now - DAY),
                   ("last 7 days", now - 7 * DAY), ("all", None)]
        print(f"{args.rows:,} rows over {args.days:g} days, {size:.0f} MB; filled in {fill:.1f} s "
              f"({args.rows / fill:,.0f} records/s); start-up (quick_check) {startup:.0f} ms\n")
        conn = sqlite3.connect(path)
        counts = [conn.execute("SELECT COUNT(*) FROM requests WHERE arrived_at >= ?",
                               (since or 0,)).fetchone()[0] for _, since in windows]
        conn.close()
        print("| summary(by=) | " + " | ".join(f"{name} ({n:,} rows)" for (name, _), n
                                             in zip(windows, counts)) + " |")
        print("|---|" + "---:|" * len(windows))
        for by in ("model", "caller", "hour", "day"):
            cells = []
            for _, since in windows:
                repeat = args.repeat if since is not None else 1
                ms, groups = timed(repeat, lambda: store.summary(by=by, since=since))
                cells.append(f"{ms:.1f} ms ({len(groups)} groups)")
            print(f"| {by} | " + " | ".join(cells) + " |")

        print("\n| query(limit=50, ...) | ms |")
        print("|---|---:|")
        cases: list[tuple[str, dict[str, Any]]] = [
            ("no filter", {}),
            ("model", {"model": "phi-4"}),
            ("caller + outcome", {"caller": "eval", "outcome": "upstream_stalled"}),
            ("since last hour", {"since": now - 3600}),
            ("a past hour (since + until)",
             {"since": now - 20 * DAY, "until": now - 20 * DAY + 3600}),
            ("29 days until yesterday", {"since": now - 29 * DAY, "until": now - DAY}),
            ("last day, rare caller + outcome", {"since": now - DAY, "caller": "eval",
                                                  "outcome": "upstream_stalled"}),
        ]
        for name, filters in cases:
            ms, _ = timed(args.repeat, lambda: store.query(limit=50, **filters))
            print(f"| {name} | {ms:.1f} |")
        result(store.stop())


if __name__ == "__main__":
    main()
