"""
A real Prometheus server scrapes a real Jano; what it stores must equal what
the backend reported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from conftest import require
from procs import (ROOT, Proc, free_port, get, jano_config, post_json, start_fake_backend,
                   start_jano, wait_until)

pytestmark = pytest.mark.integration


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    status, _, body = get(f"{prom}/api/v1/query?query={quote(expr)}")
    assert status == 200, body
    data = json.loads(body)
    assert data["status"] == "success"
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def test_shipped_scrape_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (Debian package prometheus) is not installed")
    assert promtool is not None
    res = subprocess.run([promtool, "check", "config", str(ROOT / "etc" / "prometheus.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_dashboard_queries_only_metrics_jano_exports() -> None:
    dash = json.loads((ROOT / "etc" / "grafana" / "jano-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 5
    from jano.telemetry import Telemetry  # names from the real registry
    from jano.records import ModelSpec, SchedulerSnapshot, UsageRecord
    from twisted.internet.task import Clock

    t = Telemetry(Clock(), (ModelSpec("m", "http://h"),), version="x",
                  snapshot=lambda: SchedulerSnapshot(0.0, (), ()), health=lambda: {})
    t.request_finished(UsageRecord(1, "m", "POST", "/v1/chat/completions", 200, False, 0.0, 0.0,
                                   False, 0.1, 0.2, None, "completed"))
    names = {s.name for m in t.registry.collect() for s in m.samples}
    import re

    used = {n for e in exprs for n in re.findall(r"\bjano_[a-z_]+", e)}
    assert used <= names, used - names


def test_prometheus_counts_the_tokens_the_backend_reported(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    require(prometheus is not None, "prometheus (Debian package prometheus) is not installed")
    backend = start_fake_backend(tmp_path, model="m1")
    jano = start_jano(tmp_path, jano_config([("m1", backend.url)], always_on=True))
    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: jano
    static_configs:
      - targets: ["127.0.0.1:{jano.port}"]
""")
    log = tmp_path / "prometheus.log"
    assert prometheus is not None
    with open(log, "wb") as out:
        popen = subprocess.Popen([prometheus, f"--config.file={cfg}",
                                  f"--storage.tsdb.path={tmp_path / 'data'}",
                                  f"--web.listen-address=127.0.0.1:{prom_port}"],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    prom = Proc(popen, prom_port, log)
    try:
        wait_until(lambda: get(prom.url + "/-/ready")[0] == 200, 60, "prometheus", prom)
        reported = 0
        for tokens, stream in ((7, True), (11, True), (13, False), (5, True)):
            status, _, body = post_json(jano.url + "/v1/chat/completions", {
                "model": "m1", "messages": [{"role": "user", "content": "count me"}],
                "max_tokens": tokens, "stream": stream,
                "stream_options": {"include_usage": True}} if stream else {
                "model": "m1", "messages": [], "max_tokens": tokens})
            assert status == 200
            if stream:
                events = [json.loads(line[6:]) for line in body.decode().split("\n")
                          if line.startswith("data: {")]
                reported += next(e["usage"]["completion_tokens"] for e in events if e.get("usage"))
            else:
                reported += json.loads(body)["usage"]["completion_tokens"]
        assert reported == 36

        def stored() -> float | None:
            rows = _query(prom.url, 'sum(jano_generation_tokens_total{job="jano"})')
            return float(rows[0]["value"][1]) if rows else None

        wait_until(lambda: stored() == reported, 30, "prometheus to scrape the tokens", prom)
        assert _query(prom.url, 'up{job="jano"}')[0]["value"][1] == "1"
        rows = _query(prom.url, 'jano_requests_total{job="jano",model="m1",code="200"}')
        assert float(rows[0]["value"][1]) == 4
        tok_s = _query(prom.url, 'sum(jano_generation_seconds_total{job="jano"})')
        assert float(tok_s[0]["value"][1]) > 0
        assert _query(prom.url, 'jano_build_info{job="jano"}')
    finally:
        prom.stop()
        jano.stop()
        backend.stop()
