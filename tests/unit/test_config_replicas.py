"""``upstreams``: one model served by several replicas, each a model of its own to the scheduler."""

from __future__ import annotations

from typing import Any

import pytest

from jano.config import ConfigError, parse_config
from jano.records import client_models


def doc(*models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"models": list(models), **extra}


def test_a_list_of_urls_gives_one_replica_per_url_each_in_its_own_group() -> None:
    cfg = parse_config(doc({"name": "qwen", "upstreams": ["http://127.0.0.2:8080/",
                                                         "http://127.0.0.3:8080"],
                            "max_concurrency": 2, "kind": "openai"},
                           scheduler={"initial_model": {"qwen@1": "qwen@1", "qwen@2": "qwen@2"}}))
    a, b = cfg.models
    assert (a.name, a.group, a.upstream, a.serves) == ("qwen@1", "qwen@1", "http://127.0.0.2:8080",
                                                       "qwen")
    assert (b.name, b.group, b.upstream, b.serves) == ("qwen@2", "qwen@2", "http://127.0.0.3:8080",
                                                       "qwen")
    assert a.kind == b.kind == "openai" and a.health == "/v1/models" and a.max_concurrency == 2
    assert not a.spread and not b.spread
    spread = parse_config(doc({"name": "qwen", "upstreams": ["http://127.0.0.2:8080",
                                                            "http://127.0.0.3:8080"],
                               "spread": True}, swap={"command": ["true"]}))
    assert [m.spread for m in spread.models] == [True, True]
    (public,) = cfg.client_models()
    assert public.name == "qwen" and public.replicas == ("qwen@1", "qwen@2")
    assert public.upstream == "" and public.max_concurrency == 4 and public.group == "qwen@1+qwen@2"


def test_tables_name_each_replica_after_its_group_which_other_models_may_share() -> None:
    cfg = parse_config(doc(
        {"name": "qwen", "upstreams": [{"url": "http://127.0.0.2:8080", "group": "host-a",
                                        "max_concurrency": 8},
                                       {"url": "http://127.0.0.3:8080", "group": "host-b"}]},
        {"name": "llama", "upstream": "http://127.0.0.2:8080", "group": "host-a"},
        swap={"command": ["etc/swap-model.example.sh", "{model}"]}))
    names = [(m.name, m.group, m.max_concurrency) for m in cfg.models]
    assert names == [("qwen@host-a", "host-a", 8), ("qwen@host-b", "host-b", 4),
                     ("llama", "host-a", 4)]
    assert [m.name for m in client_models(cfg.models)] == ["qwen", "llama"]


def test_managed_replicas_get_their_own_port_and_the_model_name_in_their_command() -> None:
    cfg = parse_config(doc({
        "name": "qwen",
        "command": ["server", "--model", "{model}", "--port", "{port}", "--host", "127.0.0.2"],
        "upstreams": [
            {"url": "http://127.0.0.2:{port}", "group": "host-a"},
            {"url": "http://127.0.0.3:{port}", "group": "host-b", "env": {"GPU": "1"},
             "command": ["server", "--model", "{model}", "--port", "{port}", "--host",
                         "127.0.0.3"]},
            {"group": "local", "port": 9123},
        ]}))
    a, b, c = cfg.models
    assert a.command == ("server", "--model", "qwen", "--port", "{port}", "--host", "127.0.0.2")
    assert a.upstream == "http://127.0.0.2:{port}" and a.port is None and a.env == ()
    assert b.command[-1] == "127.0.0.3" and b.env == (("GPU", "1"),)
    assert c.upstream == "http://127.0.0.1:9123" and c.port == 9123


@pytest.mark.parametrize("model, message", [
    ({"name": "q", "upstream": "http://h", "upstreams": ["http://h"]},
     "models[0] (q).upstreams: give upstream or upstreams, not both"),
    ({"name": "q", "upstreams": []}, "models[0] (q).upstreams: expected a non-empty array"),
    ({"name": "q", "upstreams": "http://h"}, "models[0] (q).upstreams: expected a non-empty array"),
    ({"name": "q", "upstreams": [3]}, "models[0] (q).upstreams[0]: expected a URL or a table"),
    ({"name": "q", "upstreams": [{"group": "a"}]}, "models[0] (q).upstreams[0].url: missing"),
    ({"name": "q", "upstreams": [{"url": "ftp://h"}]},
     "models[0] (q).upstreams[0] (q@1).url: expected an http"),
    ({"name": "q", "upstreams": [{"url": "http://h", "ttl": 3}]},
     "models[0] (q).upstreams[0].ttl: unknown key"),
    ({"name": "q", "group": "g", "upstreams": ["http://h"]}, "models[0] (q).group: each replica"),
    ({"name": "q", "command": ["s", "{port}"], "port": 9000, "upstreams": ["http://h:{port}"]},
     "models[0] (q).port: each replica has its own"),
    ({"name": "q", "upstreams": [{"url": "http://h", "group": "a"},
                                 {"url": "http://i", "group": "a"}]},
     "models[0] (q).upstreams[1].group: 'a' is also 'q@a''s group; two replicas of one model"),
    ({"name": "q", "upstreams": [{"url": "http://h", "group": "a@b"}]},
     "models[0] (q).upstreams[0].group: expected a non-empty group name without @ or +"),
    ({"name": "q", "upstreams": ["http://h:{port}"]},
     "models[0] (q).upstreams[0] (q@1).url: {port} is only for a model with a command"),
    ({"name": "q", "upstream": "http://h", "spread": True},
     "models[0].spread: only for a model with upstreams"),
    ({"name": "q", "upstreams": ["http://h"], "spread": "yes"},
     "models[0] (q).upstreams[0] (q@1).spread: expected"),
])
def test_replica_mistakes_are_one_line(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc(model, swap={"command": ["etc/swap-model.example.sh", "{model}"]}))
    assert str(e.value).startswith(message), str(e.value)


def test_names_stay_unique_across_models_and_replicas() -> None:
    swap = {"command": ["etc/swap-model.example.sh", "{model}"]}
    with pytest.raises(ConfigError, match="duplicate model name 'q'"):
        parse_config(doc({"name": "q", "upstreams": ["http://h"]},
                         {"name": "q", "upstream": "http://h"}, swap=swap))
    with pytest.raises(ConfigError, match="duplicate model name 'q@a'"):
        parse_config(doc({"name": "q@a", "upstream": "http://h"},
                         {"name": "q", "upstreams": [{"url": "http://h", "group": "a"}]},
                         swap=swap))


def test_preload_takes_the_model_or_one_replica_and_initial_model_a_replica() -> None:
    model = {"name": "q", "upstreams": [{"url": "http://a", "group": "a"},
                                        {"url": "http://b", "group": "b"}]}
    cfg = parse_config(doc(model, scheduler={"preload": ["q"], "initial_model": {"b": "q@b"}},
                           swap={"command": ["etc/swap-model.example.sh", "{model}"]}))
    assert cfg.scheduler.preload == ("q",) and cfg.scheduler.initial_model == {"b": "q@b"}
    with pytest.raises(ConfigError, match="'q' has replicas; name the one loaded"):
        parse_config(doc(model, scheduler={"initial_model": "q"},
                         swap={"command": ["etc/swap-model.example.sh", "{model}"]}))


def test_replicas_named_in_initial_model_need_no_swap_script() -> None:
    cfg = parse_config(doc({"name": "q", "upstreams": [{"url": "http://a", "group": "a"},
                                                       {"url": "http://b", "group": "b"}]},
                           scheduler={"initial_model": {"a": "q@a", "b": "q@b"}}))
    assert cfg.swap.command == ()
    with pytest.raises(ConfigError, match="swap.command: missing, but group 'b' needs swaps"):
        parse_config(doc({"name": "q", "upstreams": [{"url": "http://a", "group": "a"},
                                                     {"url": "http://b", "group": "b"}]},
                         scheduler={"initial_model": {"a": "q@a"}}))
