"""
``python3 benchmarks/run.py --quick`` runs end to end: the fake backend, Jano and the
load generators start, every scenario runs, and the table has every row.  Nothing
here checks a timing: the numbers belong to the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: (scenario, metric) of every row the table must have.
ROWS = [
    ("startup", "Jano start to ready (s)"),
    ("startup", "Jano idle RSS after start (MiB)"),
    ("startup", "Jano RSS after warm-up (MiB)"),
    ("nonstream_c1", "latency p50 (ms)"),
    ("nonstream_c1", "latency p99 (ms)"),
    ("nonstream_c1", "requests/s"),
    ("nonstream_c1", "Jano CPU per request (µs)"),
    ("nonstream_c1", "CPU, % of one core: Jano / backend / load generator"),
    ("nonstream_c32", "requests/s"),
    ("nonstream_c32", "mean latency (ms, Little's law)"),
    ("nonstream_c32", "Jano CPU per request (µs)"),
    ("nonstream_c32", "CPU, % of one core: Jano / backend / load generator"),
    ("stream_c16", "chunks/s"),
    ("stream_c16", "streams/s"),
    ("stream_c16", "Jano CPU per chunk (µs)"),
    ("stream_c16", "CPU, % of one core: Jano / backend / load generator"),
    ("paced_c8", "chunk transit p50 (ms)"),
    ("paced_c8", "chunk transit p99 (ms)"),
    ("paced_c8", "Jano CPU per chunk (µs)"),
    ("paced_c8", "CPU, % of one core: Jano / backend / load generator"),
    ("open200", "streams completed and verified (of 200)"),
    ("open200", "chunk transit p99 (ms)"),
    ("open200", "Jano RSS per open stream (KiB)"),
    ("open200", "Jano peak RSS, VmHWM (MiB)"),
    ("open1000", "streams completed and verified"),
    ("open1000", "Jano RSS per open stream (KiB)"),
    ("big200mb", "stream completed and verified (of 1)"),
    ("big200mb", "MB/s"),
    ("big200mb", "Jano peak RSS, VmHWM (MiB)"),
    ("big200mb", "Jano RSS growth during the stream"),
    ("big200mb", "Jano CPU per MB (ms)"),
    ("big200mb", "CPU, % of one core: Jano / backend / load generator"),
]


def test_quick_benchmark_prints_every_row(tmp_path: Path) -> None:
    require(shutil.which("node") is not None, "node is not installed (apt-get install nodejs)")
    require(shutil.which("wrk") is not None, "wrk is not installed (apt-get install wrk)")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # run.py points Jano at this checkout itself
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
         "--json", str(tmp_path / "raw.json")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| scenario | metric | direct | jano |"), out
    for scenario, metric in ROWS:
        assert any(r.startswith(f"| {scenario}") and f"| {metric}" in r for r in rows), \
            f"no row {scenario!r} / {metric!r} in:\n{out}"
    assert "Targets:" in out
    # Every response was verified; only running out of time (a slow machine) may fail one.
    raw = json.loads((tmp_path / "raw.json").read_text())
    for scenario, by_target in raw["results"].items():
        for target, runs in by_target.items():
            for run in runs:
                wrong = {k: v for k, v in run["error_kinds"].items()
                         if k not in ("time_capped", "timeout")}
                assert not wrong, f"{scenario} via {target}: {wrong}"
