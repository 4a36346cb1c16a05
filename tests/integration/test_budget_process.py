"""
Memory-budget co-residency for real: ``twistd -n jano`` runs three fake
llama-servers in one group with a budget; two live side by side, the third
evicts the least recently used one that makes room, and nothing else.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from procs import get, start_jano
from test_managed_process import alive, chat, config, fake, status

pytestmark = pytest.mark.integration


def running(url: str) -> dict[str, int]:
    return {name: p["pid"] for name, p in status(url)["processes"].items()
            if p["state"] == "running"}


def test_two_models_share_the_budget_and_the_third_evicts_only_the_lru(tmp_path: Path) -> None:
    jano = start_jano(tmp_path, config(f"""
[groups.gpu0]
memory = "12 GiB"
[[models]]
name = "chat"
group = "gpu0"
memory = "6 GiB"
command = {fake()}
[[models]]
name = "embed"
group = "gpu0"
memory = 1024
command = {fake()}
[[models]]
name = "coder"
group = "gpu0"
memory = "10 GiB"
command = {fake()}
"""))
    try:
        assert chat(jano.url, "chat")[0] == 200
        assert chat(jano.url, "embed")[0] == 200
        both = running(jano.url)
        assert set(both) == {"chat", "embed"}, "embed loaded beside chat, evicting nothing"
        group: dict[str, Any] = status(jano.url)["groups"]["gpu0"]
        assert sorted(group["residents"]) == ["chat", "embed"]
        assert group["memoryUsedMiB"] == 7168 and group["memoryBudgetMiB"] == 12288
        metrics = get(jano.url + "/metrics")[2].decode()
        assert 'jano_group_memory_budget_mib{group="gpu0"} 12288.0' in metrics
        assert 'jano_group_memory_used_mib{group="gpu0"} 7168.0' in metrics
        assert 'jano_model_loaded{model="chat"} 1.0' in metrics
        assert 'jano_model_loaded{model="embed"} 1.0' in metrics

        assert chat(jano.url, "coder")[0] == 200
        now = running(jano.url)
        assert set(now) == {"embed", "coder"}, "chat (least recently used, enough alone) went"
        assert now["embed"] == both["embed"], "embed's server was never touched"
        assert not alive(both["chat"])
        last = status(jano.url)["lastSwap"]
        assert (last["from"], last["to"]) == ("chat", "coder")
        code, _, body = chat(jano.url, "embed")
        assert code == 200 and json.loads(body)["object"] == "chat.completion"
    finally:
        jano.stop(signal.SIGTERM)
