"""
The usage history survives a restart: ``twistd -n jano`` with a database
file, three requests, SIGTERM, a fresh start on the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from procs import get, jano_config, post_json, start_fake_backend, start_jano

pytestmark = pytest.mark.integration


def test_jano_finds_its_history_after_a_restart(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    db = tmp_path / "history" / "usage.sqlite3"
    db.parent.mkdir()
    config = jano_config([("m", backend.url)], always_on=True).replace(
        "[[models]]", f'[telemetry]\ndatabase = "{db}"\n[[models]]', 1)
    try:
        jano = start_jano(tmp_path, config)
        try:
            for _ in range(3):
                assert post_json(jano.url + "/v1/chat/completions",
                                 {"model": "m", "messages": []})[0] == 200
        finally:
            jano.stop()  # SIGTERM: the last batch is written before exit
        assert db.exists()
        jano = start_jano(tmp_path, config)
        try:
            assert json.loads(get(jano.url + "/usage")[2])["data"] == []  # the ring is new
            history = json.loads(get(jano.url + "/usage?since=0")[2])["data"]
            assert [(u["model"], u["outcome"]) for u in history] == [("m", "completed")] * 3
            summary = json.loads(get(jano.url + "/usage/summary?by=model")[2])["data"]
            assert [(r["key"], r["requests"], r["completed"]) for r in summary] == [("m", 3, 3)]
        finally:
            jano.stop()
    finally:
        backend.stop()
