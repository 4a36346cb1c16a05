"""The TOML config: valid files load into records; each mistake is one line naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from jano.config import ConfigError, find_config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "swap": {"command": ["etc/swap-model.example.sh", "{model}"]},
    "models": [
        {"name": "a", "upstream": "http://127.0.0.1:8080"},
        {"name": "b", "upstream": "http://127.0.0.1:8081/", "kind": "ollama"},
    ],
}


def _with(**patch: object) -> dict[str, object]:
    doc: dict[str, object] = {k: v for k, v in MINIMAL.items()}
    doc.update(patch)
    return doc


def test_minimal_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.server.listen == "tcp:8000:interface=127.0.0.1"
    assert cfg.scheduler.max_wait == 120.0 and cfg.scheduler.max_queue == 256
    a, b = cfg.models
    assert (a.kind, a.health, a.group, a.max_concurrency, a.always_on) == (
        "llamacpp", "/health", "default", 4, False)
    assert b.upstream == "http://127.0.0.1:8081"  # trailing slash dropped
    assert b.health == "/api/version"  # per-kind default
    assert b.health_url == "http://127.0.0.1:8081/api/version"
    assert cfg.swap.command == ("etc/swap-model.example.sh", "{model}")


def test_shipped_example_config_loads() -> None:
    cfg = load_config(ROOT / "etc" / "jano.toml")
    assert cfg.models and cfg.source and cfg.source.endswith("jano.toml")


@pytest.mark.parametrize("doc, message", [
    ({"models": []}, "models: at least one"),
    (_with(bogus=1), "bogus: unknown key"),
    (_with(server={"listen": 8000}), "server.listen: expected a string, got an integer 8000"),
    (_with(server={"lisen": "x"}), "server.lisen: unknown key"),
    (_with(scheduler={"max_wait": "soon"}), "scheduler.max_wait: expected a number"),
    (_with(scheduler={"max_wait": -1}), "scheduler.max_wait: expected a positive number"),
    (_with(scheduler={"max_queue": True}), "scheduler.max_queue: expected an integer"),
    (_with(models=[{"name": "a"}]), "models[0] (a).upstream: missing"),
    (_with(models=[{"upstream": "http://x"}]), "models[0].name: missing"),
    (_with(models=[{"name": "a", "upstream": "ftp://x"}]), "models[0] (a).upstream: expected an http"),
    (_with(models=[{"name": "a", "upstream": "http://h"}, {"name": "a", "upstream": "http://h"}]),
     "models[1] (a).name: duplicate model name 'a'"),
    (_with(models=[{"name": "a", "upstream": "http://h", "gpu": 1}]), "models[0].gpu: unknown key"),
    (_with(models=[{"name": "a", "upstream": "http://h", "kind": "vllm"}]), "models[0] (a).kind: expected one of"),
    (_with(models=[{"name": "a", "upstream": "http://h", "max_concurrency": 0}]),
     "models[0] (a).max_concurrency: expected 1 to 10000"),
    (_with(swap={"command": "etc/x.sh {model}"}), "swap.command: expected an array of strings"),
    ({"models": MINIMAL["models"]}, "swap.command: missing, but group 'default' needs swaps"),
    (_with(scheduler={"initial_model": "zzz"}), "scheduler.initial_model: 'zzz' is not a configured model"),
])
def test_errors_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_no_swap_command_needed_for_single_known_or_always_on_models() -> None:
    cfg = parse_config({"scheduler": {"initial_model": "a"},
                        "models": [{"name": "a", "upstream": "http://h"},
                                   {"name": "e", "upstream": "http://h:2", "always_on": True}]})
    assert cfg.scheduler.initial_model == {"default": "a"}
    assert cfg.swap.command == ()


def test_keys_are_secret_and_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("s3cret\n")
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(_with(server={"api_key_file": "key", "telemetry_key": "t"}))
    assert cfg.server.api_key == "s3cret" and cfg.server.telemetry_key == "t"
    assert "s3cret" not in repr(cfg)
    with pytest.raises(ConfigError, match="server.api_key_file: cannot read"):
        parse_config(_with(server={"api_key_file": "missing"}))


def test_load_config_reports_file_and_toml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    xdg = tmp_path / "xdg"
    (xdg / "jano").mkdir(parents=True)
    env = {"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path)}
    assert find_config(env) is None or find_config(env) == Path("/etc/jano/jano.toml")
    (xdg / "jano" / "jano.toml").write_text("")
    assert find_config(env) == xdg / "jano" / "jano.toml"
    (tmp_path / "jano.toml").write_text("")
    assert find_config(env) == Path("jano.toml")


def test_example_is_valid_toml_with_documented_sections() -> None:
    doc = tomllib.loads((ROOT / "etc" / "jano.toml").read_text())
    assert {"server", "scheduler", "swap", "telemetry", "models"} <= set(doc)


def test_connection_caps_and_idle_timeout_have_safe_defaults_and_are_checked() -> None:
    srv = parse_config(MINIMAL).server
    assert (srv.max_connections, srv.max_connections_per_client, srv.idle_timeout) == (2048, 1024, 60.0)
    srv = parse_config(_with(server={"max_connections": 10, "max_connections_per_client": 2,
                                     "idle_timeout": 5})).server
    assert (srv.max_connections, srv.max_connections_per_client, srv.idle_timeout) == (10, 2, 5.0)
    with pytest.raises(ConfigError, match=r"server.max_connections: expected at least 1"):
        parse_config(_with(server={"max_connections": 0}))
    with pytest.raises(ConfigError, match=r"server.idle_timeout"):
        parse_config(_with(server={"idle_timeout": -1}))
