"""The keys of managed models, ``[processes]`` and ``[groups.<name>]`` budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from jano.config import ConfigError, parse_config, parse_memory

SERVER = ["llama-server", "-m", "/models/{model}.gguf", "--port", "{port}"]


def managed(**extra: object) -> dict[str, object]:
    model: dict[str, object] = {"name": "qwen", "command": SERVER}
    model.update(extra)
    return model


def test_a_managed_model_needs_no_upstream_and_no_swap_script() -> None:
    cfg = parse_config({"models": [managed(), managed(name="coder", env={"CUDA": "0"},
                                                      stop_timeout=3)]})
    qwen, coder = cfg.models
    assert qwen.managed and qwen.command == tuple(SERVER)
    assert qwen.upstream == "http://127.0.0.1:{port}" and qwen.port is None
    assert qwen.health == "/health" and qwen.stop_timeout == 10.0
    assert coder.env == (("CUDA", "0"),) and coder.stop_timeout == 3.0
    assert cfg.swap.command == ()
    assert cfg.processes.port_range == (10100, 10299) and cfg.processes.log_bytes == 262144


def test_a_fixed_port_fills_the_upstream(tmp_path: Path) -> None:
    cfg = parse_config({"models": [managed(port=9001, cwd=".")]}, base=tmp_path)
    (spec,) = cfg.models
    assert spec.upstream == "http://127.0.0.1:9001" and spec.port == 9001
    assert spec.cwd == str(tmp_path / ".")


def test_a_group_mixing_managed_and_scripted_models_needs_the_script_only_for_the_scripted() -> None:
    doc = {"models": [managed(), {"name": "old", "upstream": "http://127.0.0.1:8080"}]}
    with pytest.raises(ConfigError, match="swap.command: missing"):
        parse_config(doc)
    cfg = parse_config({**doc, "swap": {"command": ["/bin/true"]}})
    assert [m.managed for m in cfg.models] == [True, False]


@pytest.mark.parametrize(("model", "message"), [
    (managed(command="llama-server --port {port}"), "expected an array of strings"),
    (managed(command=[""]), "program name"),
    (managed(command=["x", "{host}"]), "unknown placeholder {host}"),
    (managed(env={"A": 1}), "env: expected a table"),
    (managed(env={"A=B": "1"}), "not a valid environment variable name"),
    (managed(cwd="/nonexistent/dir"), "is not a directory"),
    (managed(port=0), "expected a TCP port"),
    (managed(upstream="http://127.0.0.1:8080"), "needs {port} or a fixed"),
    ({"name": "x", "upstream": "http://127.0.0.1:{port}"}, "only for a model with a command"),
    ({"name": "x", "upstream": "http://127.0.0.1:1", "stop_timeout": 2}, "only for a model Jano runs"),
    ({"name": "x"}, "or a command for Jano to run"),
])
def test_managed_mistakes_are_one_line(model: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_config({"models": [model], "swap": {"command": ["/bin/true"]}})


def test_two_models_cannot_share_a_fixed_port() -> None:
    with pytest.raises(ConfigError, match="9001 is also 'a''s port"):
        parse_config({"models": [managed(name="a", port=9001), managed(name="b", port=9001)]})


def test_a_managed_model_cannot_be_the_initial_resident() -> None:
    with pytest.raises(ConfigError, match="use scheduler.preload"):
        parse_config({"models": [managed()], "scheduler": {"initial_model": "qwen"}})


@pytest.mark.parametrize("ports", [[80, 90], [2000, 1999], [1, 2, 3], "10100-10200"])
def test_a_bad_port_range_is_refused(ports: object) -> None:
    with pytest.raises(ConfigError, match="processes.port_range"):
        parse_config({"models": [managed()], "processes": {"port_range": ports}})


@pytest.mark.parametrize(("value", "mib"), [
    (8192, 8192), ("8192 MiB", 8192), ("8 GiB", 8192), ("8G", 8192), ("24GiB", 24576),
    ("1 GB", 954), ("0.5 GiB", 512)])
def test_memory_sizes_are_read_as_the_user_states_them(value: object, mib: int) -> None:
    assert parse_memory(value, "x") == mib


@pytest.mark.parametrize("value", ["lots", "8 PB", 0, True, -3, "0 MiB"])
def test_a_bad_memory_size_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="x"):
        parse_memory(value, "x")


def test_a_group_budget_needs_every_model_to_state_its_memory_and_fit() -> None:
    base = {"swap": {"command": ["/bin/true"]}, "groups": {"gpu0": {"memory": "24 GiB"}}}
    cfg = parse_config({**base, "models": [
        {"name": "chat", "upstream": "http://127.0.0.1:1", "group": "gpu0", "memory": "9 GiB"},
        {"name": "embed", "upstream": "http://127.0.0.1:2", "group": "gpu0", "memory": 900}]})
    assert cfg.groups["gpu0"].memory == 24576
    assert [m.memory for m in cfg.models] == [9216, 900]
    with pytest.raises(ConfigError, match="needs memory"):
        parse_config({**base, "models": [
            {"name": "chat", "upstream": "http://127.0.0.1:1", "group": "gpu0"}]})
    with pytest.raises(ConfigError, match="more than group 'gpu0'"):
        parse_config({**base, "models": [
            {"name": "big", "upstream": "http://127.0.0.1:1", "group": "gpu0", "memory": "30G"}]})
    with pytest.raises(ConfigError, match="groups.gpu0.vram: unknown key"):
        parse_config({**base, "groups": {"gpu0": {"vram": 1}},
                      "models": [{"name": "a", "upstream": "http://127.0.0.1:1"}]})


def test_the_shipped_example_config_loads() -> None:
    from jano.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "etc" / "jano.toml")
    assert [m.name for m in cfg.models if m.managed] == ["qwen-chat", "qwen-coder"]
    assert cfg.groups["gpu0"].memory == 24576
