"""
The durable usage history through the listener: ``/usage`` filters and
paging, ``/usage/summary``, ``/usage/series`` and the dropped-records
counter, with the store in memory (synchronous) on the test's Clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from jano.config import CallerKey, ServerConfig
from test_proxy import CHAT, World


def get(w: World, path: str) -> tuple[int, Any]:
    resp, body = w.call("GET", path)
    return resp.code, json.loads(body)


def settle(w: World) -> None:
    w.clock.advance(0.3)  # the store's batch interval
    w.clock.advance(0)


def test_usage_filters_and_pages_over_the_store() -> None:
    w = World(server=ServerConfig(api_keys=(CallerKey("laptop", "k1"), CallerKey("ci", "k2"))))
    for i in range(5):
        key = "k1" if i % 2 == 0 else "k2"
        w.call("POST", "/v1/chat/completions", dict(CHAT, model="a" if i < 3 else "b"),
               headers={"Authorization": f"Bearer {key}"}, advance=0.5)
    w.call("POST", "/v1/chat/completions", dict(CHAT, model="nope"), headers={"Authorization": "Bearer k1"})
    settle(w)
    code, body = get(w, "/usage?model=a")
    assert code == 200 and [u["model"] for u in body["data"]] == ["a", "a", "a"]
    code, body = get(w, "/usage?caller=laptop&outcome=completed")
    assert [u["caller"] for u in body["data"]] == ["laptop"] * 3
    code, body = get(w, "/usage?outcome=rejected")
    assert [u["status"] for u in body["data"]] == [404]
    pages, cursor = [], None
    while True:
        code, body = get(w, "/usage?limit=2&since=0" + (f"&cursor={cursor}" if cursor else ""))
        pages.append([u["id"] for u in body["data"]])
        cursor = body["next"]
        if cursor is None:
            break
    ids = [i for page in pages for i in page]
    assert len(pages) == 3 and ids == sorted(ids, reverse=True) and len(set(ids)) == 6
    # Without filters, /usage answers as it always did, from the ring.
    code, body = get(w, "/usage?limit=2")
    assert "next" not in body and len(body["data"]) == 2


@pytest.mark.parametrize("query,name", [("limit=0&model=a", "limit"), ("since=yesterday", "since"),
                                        ("until=2026-11-30T12:00:00", "until"),
                                        ("outcome=fine", "outcome"), ("cursor=-3", "cursor"),
                                        ("model=a&model=b", "model")])
def test_bad_history_parameters_get_400_naming_them(query: str, name: str) -> None:
    w = World()
    code, body = get(w, "/usage?" + query)
    assert code == 400 and body["error"]["message"].startswith(name + ":")


def test_since_takes_rfc3339_or_epoch_seconds() -> None:
    w = World()
    w.clock.advance(1_800_000_000)
    w.call("POST", "/v1/chat/completions", CHAT)
    settle(w)
    assert len(get(w, "/usage?since=2027-01-15T08:00:00Z")[1]["data"]) == 1
    assert len(get(w, "/usage?since=1800000001")[1]["data"]) == 0


def test_the_summary_counts_per_model_and_the_honest_tokens_per_second() -> None:
    w = World()
    for model in ("a", "a", "b"):
        w.call("POST", "/v1/chat/completions", dict(CHAT, model=model), advance=0.5)
    w.call("POST", "/v1/chat/completions", dict(CHAT, model="nope"))
    settle(w)
    code, body = get(w, "/usage/summary?by=model")
    rows = {r["key"]: r for r in body["data"]}
    assert code == 200 and body["by"] == "model"
    assert (rows["a"]["requests"], rows["a"]["completed"], rows["a"]["completionTokens"]) == (2, 2, 10)
    assert rows["a"]["tokS"] is not None and rows["b"]["swapsCaused"] == 1
    assert get(w, "/usage/summary?by=week")[0] == 400


def test_the_series_holds_the_samples_taken_every_ten_seconds() -> None:
    w = World()
    w.svc.startService()
    try:
        w.call("POST", "/v1/chat/completions", CHAT)
        w.clock.advance(10.0)
        w.clock.advance(10.0)
        settle(w)
        code, body = get(w, "/usage/series?since=0")
        assert code == 200 and len(body["data"]) == 2
        assert [s["requests"] for s in body["data"]] == [1.0, 0.0]  # own routes are not counted
        assert all(s["queueDepth"] == 0.0 for s in body["data"])
    finally:
        w.svc.stopService()
        w.clock.advance(60)
