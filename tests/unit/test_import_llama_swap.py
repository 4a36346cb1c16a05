"""``python -m jano.importers.llama_swap``: llama-swap YAML in, Jano TOML out, notes on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from jano.config import Config, parse_config
from jano.importers.llama_swap import PREFIX, convert, load_yaml, main
from jano.importers.llama_swap_cmd import LlamaSwapError, go_text, split_command
from jano.importers.toml_out import dumps

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "llama-swap"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """Run ``main``; the notes come back without their prefix (every line must have it)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert all(line.startswith(PREFIX) for line in lines), lines
    return code, out, [line[len(PREFIX):] for line in lines]


def loaded(out: str) -> Config:
    return parse_config(tomllib.loads(out))


def argv(cfg: Config, name: str) -> list[str]:
    spec = cfg.model(name)
    assert spec is not None
    return list(spec.command)


def test_minimal_config_keeps_commands_and_llama_swaps_ports(
        capsys: pytest.CaptureFixture[str]) -> None:
    path = str(FIXTURES / "minimal.yaml")
    code, out, notes = run(capsys, path)
    assert code == 0 and notes == []
    assert out.startswith(f"# Generated from {path} by jano.importers.llama_swap.\n")
    doc = tomllib.loads(out)
    assert doc["processes"] == {"port_range": [5800, 5999]}
    assert doc["scheduler"] == {"ready_timeout": 120.0}
    cfg = loaded(out)
    assert [m.name for m in cfg.models] == ["qwen2.5-7b", "llama3.2:3b"]
    assert argv(cfg, "qwen2.5-7b") == ["llama-server", "--port", "{port}", "-m",
                                       "/models/qwen2.5-7b-instruct-q4_k_m.gguf", "-ngl", "99"]
    assert argv(cfg, "llama3.2:3b") == ["llama-server", "--port", "{port}", "-m",
                                        "/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf"]
    for spec in cfg.models:
        assert spec.group == "default" and spec.upstream == "http://127.0.0.1:{port}"
        assert spec.health == "/health" and spec.port is None and spec.ttl is None
    assert cfg.processes.port_range == (5800, 5999)


def test_macros_nest_in_any_order_and_port_and_model_id_become_placeholders(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, notes = run(capsys, str(FIXTURES / "macros.yaml"))
    assert code == 0
    cfg = loaded(out)
    assert cfg.processes.port_range == (10001, 10200)
    server = ["/opt/llama.cpp/llama-server", "--port", "{port}"]
    # The model's ctx and temp win over the global ones; "fa" is defined after "common".
    assert argv(cfg, "coder") == [*server, "--ctx-size", "32768", "--flash-attn", "true",
                                  "--model", "/srv/models/{model}.gguf", "--temp", "0.2",
                                  "--alias", "{model} (local)"]
    # temp: 1.0 is substituted as Go prints it, "1".
    assert argv(cfg, "chat") == [*server, "--ctx-size", "4096", "--flash-attn", "true",
                                 "--model", "/srv/models/chat model.gguf", "--temp", "1"]
    assert argv(cfg, "docker-llama") == [
        "docker", "run", "--name", "{model}", "--init", "--rm", "-p", "{port}:8080", "-v",
        "/mnt/nvme/models:/models", "ghcr.io/ggml-org/llama.cpp:server", "--model",
        "/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"]
    assert all(m.upstream == "http://127.0.0.1:{port}" for m in cfg.models)
    assert "upstream" not in out
    assert notes == ["models.docker-llama.cmdStop: not carried over: Jano stops a server with "
                     "SIGTERM to its process group, then SIGKILL after stop_timeout"]


def test_groups_swap_exclusive_persistent_and_preload(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, notes = run(capsys, str(FIXTURES / "groups.yaml"))
    assert code == 0
    cfg = loaded(out)
    assert {m.name: m.group for m in cfg.models} == {
        "llama-8b": "gpu", "qwen-14b": "gpu", "embed": "side-embed", "rerank": "side-rerank",
        "whisper": "audio", "solo": "default"}
    sch = cfg.scheduler
    assert sch.ready_timeout == 500.0 and sch.ttl == 300.0
    # llama-8b (also asked for by its alias) is loaded first and swapped out by qwen-14b.
    assert sch.preload == ("qwen-14b", "embed", "rerank")
    assert {m.name: m.stop_timeout for m in cfg.models} == {
        "llama-8b": 20.0, "qwen-14b": 20.0, "embed": 5.0, "rerank": 20.0, "whisper": 20.0,
        "solo": 20.0}
    qwen, whisper = cfg.model("qwen-14b"), cfg.model("whisper")
    assert qwen is not None and qwen.ttl == 0.0
    assert whisper is not None and whisper.health == "/v1/models"
    assert not any(m.always_on for m in cfg.models)
    assert cfg.processes.port_range == (7000, 7199)
    by_key = {n.split(": ", 1)[0]: n.split(": ", 1)[1] for n in notes}
    assert by_key["groups.gpu.exclusive"].startswith("not carried over: in llama-swap loading")
    assert "groups.audio.exclusive" not in by_key and "groups.side.exclusive" not in by_key
    assert by_key["groups"].startswith("models in no group are in Jano group default")
    assert "(side-embed, side-rerank)" in by_key["groups.side.swap"]
    assert "not made always_on" in by_key["groups.side.persistent"]
    assert by_key["groups.audio.members"] == "not-a-model is not a model; ignored"
    assert by_key["models.llama-8b.aliases"].startswith("not carried over: Jano has no model "
                                                        "aliases")
    preload = [n for n in notes if n.startswith("hooks.on_startup.preload: ")]
    assert preload == [
        "hooks.on_startup.preload: llama-8b not preloaded: qwen-14b shares its Jano group gpu "
        "and is loaded after it (llama-swap would load it, then swap it out)",
        "hooks.on_startup.preload: missing is not a model; ignored"]


def test_keys_without_a_counterpart_become_notes_and_secrets_stay_out(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LS_TEST_HOME", "/home/me")
    monkeypatch.delenv("LS_TEST_KEY", raising=False)  # apiKeys are not read at all
    code, out, notes = run(capsys, str(FIXTURES / "features.yaml"))
    assert code == 0
    assert "sk-hunter2" not in out and "sk-or-secret" not in out
    cfg = loaded(out)
    big, twin, remote = cfg.models
    assert big.command == ("llama-server", "--port", "8999", "--host", "127.0.0.1", "-m",
                           "/home/me/gpt-oss-120b.gguf", "-ot", "exps=CPU$")
    assert big.port == 8999 and big.upstream == "http://127.0.0.1:8999"
    assert big.health == "/health" and big.ttl == 60.0 and big.max_concurrency == 2
    assert dict(big.env) == {"CUDA_VISIBLE_DEVICES": "0,1", "LLAMA_ARG_THREADS": "16",
                             "GREETING": 'say "hi"=ok'}
    # twin shares 8999 with big: it gets a port of its own instead.
    assert twin.command == ("llama-server", "--port", "{port}", "-m", "/models/twin.gguf")
    assert twin.port is None and twin.upstream == "http://127.0.0.1:{port}"
    assert remote.upstream == "http://gpu-box.lan:8000" and remote.port == 8000
    assert remote.health == "/health" and "health" not in out.split('name = "remote-vllm"')[1]
    assert "|" in remote.command  # no shell in llama-swap either
    keys = [n.split(": ", 1)[0] for n in notes]
    # One note per key set to something; twin's "unlisted: false" loses nothing.
    assert sorted(keys) == sorted((
        "models.gpt-oss-120b.checkEndpoint", "models.gpt-oss-120b",
        "models.gpt-oss-120b.aliases", "models.gpt-oss-120b.name",
        "models.gpt-oss-120b.description", "models.gpt-oss-120b.useModelName",
        "models.gpt-oss-120b.unlisted", "models.gpt-oss-120b.filters",
        "models.gpt-oss-120b.metadata", "models.remote-vllm.cmd", "models.remote-vllm.proxy",
        "models.twin.proxy", "apiKeys", "peers.openrouter", "logLevel", "sendLoadingState",
        "metricsMaxInMemory"))
    joined = "\n".join(notes)
    assert "clients asking for gpt-4o, o3-mini must ask for gpt-oss-120b" in joined
    assert "${env.LS_TEST_HOME} was replaced by its value" in joined
    assert "apiKeys: not carried over: 2 key(s)" in joined


ERRORS = [
    ("models: [a, b]\n", "models: expected a mapping of model ids"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("models:\n  a:\n    cmd: [unclosed\n", "invalid YAML: "),
    ("models:\n  a:\n    cmd: x ${nope}\n", "models.a.cmd: unknown macro ${nope}"),
    ("macros:\n  a: x ${b}\n  b: y ${a}\nmodels:\n  m:\n    cmd: run ${a}\n",
     "models.m.cmd: macros refer to each other in a loop: a -> b -> a"),
    ("models:\n  a:\n    proxy: http://127.0.0.1:9000\n", "models.a.cmd: missing"),
    ("models:\n  a:\n    cmd: llama-server --port 9000\n",
     "models.a.proxy: http://localhost:${PORT} uses ${PORT} but cmd does not"),
    ("macros:\n  PORT: 1\nmodels:\n  a:\n    cmd: x\n", "macros.PORT: PORT is a built-in"),
    ("models:\n  a:\n    cmd: x ${env.LS_TEST_SURELY_UNSET}\n",
     "environment variable LS_TEST_SURELY_UNSET"),
    ("models:\n  a:\n    cmd: 'x \"unclosed'\n", "models.a.cmd: cannot split into arguments"),
    ("models:\n  a:\n    cmd: x --json {} ${PORT}\n", "which Jano would read as a placeholder"),
    ("models:\n  a:\n    cmd: s --port 9\n    proxy: http://127.0.0.1:9\n"
     "  b:\n    cmd: t -P 9\n    proxy: http://127.0.0.1:9\n",
     "models.b.proxy: port 9 is also a's"),
    ("models:\n  a:\n    cmd: x ${PORT}\ngroups:\n  g1:\n    members: [a]\n"
     "  g2:\n    members: [a]\n", "groups.g2.members: a is also in another group"),
    ("models:\n  a:\n    cmd: x ${PORT}\n    env: [NOEQUALS]\n", "models.a.env[0]: expected"),
    ("models:\n  a:\n    cmd: x ${PORT}\n    ttl: -5\n", "models.a.ttl: expected a number"),
]


@pytest.mark.parametrize("yaml_text,message", ERRORS)
def test_configs_that_cannot_be_converted_exit_2_with_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, yaml_text: str,
        message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    code, out, notes = run(capsys, str(path))
    assert code == 2 and out == ""
    assert len(notes) == 1 and notes[0].startswith(f"{path}: "), notes
    assert message in notes[0]


def test_an_unreadable_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, notes = run(capsys, str(tmp_path / "absent.yaml"))
    assert code == 2 and out == "" and "cannot read it" in notes[0]


def test_without_pyyaml_it_says_what_to_install(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    code, out, notes = run(capsys, str(FIXTURES / "minimal.yaml"))
    assert code == 2 and out == ""
    assert notes == ["PyYAML is not installed: pip install 'jano[import]'"]


def test_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    data = (FIXTURES / "minimal.yaml").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, _ = run(capsys, "-")
    assert code == 0 and out.startswith("# Generated from <stdin> ")


def convert_text(text: str, env: dict[str, str] | None = None) -> tuple[Config, list[str]]:
    out, notes = convert(load_yaml(text), "t.yaml", env or {})
    return loaded(out), notes


def test_newer_routing_groups_and_matrix() -> None:
    cfg, notes = convert_text(
        "models:\n  a:\n    cmd: x ${PORT}\n  b:\n    cmd: y ${PORT}\n"
        "routing:\n  router:\n    use: group\n    settings:\n      groups:\n"
        "        pair:\n          swap: false\n          exclusive: false\n"
        "          members: [a, b]\n")
    assert [m.group for m in cfg.models] == ["pair-a", "pair-b"]
    cfg, notes = convert_text("models:\n  a:\n    cmd: x ${PORT}\nmatrix:\n  vars: {a: a}\n"
                              "  sets: {alone: a}\n")
    assert cfg.models[0].group == "default"
    assert notes[0].startswith("matrix: not carried over")


def test_proxy_forms() -> None:
    cfg, notes = convert_text(
        "models:\n"
        "  a:\n    cmd: x --port ${PORT}\n    proxy: http://localhost:${PORT}/v1\n"
        "  b:\n    cmd: x --port 8081\n    proxy: http://localhost:8081\n"
        "  c:\n    cmd: tunnel\n    proxy: https://models.example\n"
        "  d:\n    cmd: x ${PORT}\n    proxy: http://[::1]:7001\n")
    a, b, c, d = cfg.models
    assert a.upstream == "http://127.0.0.1:{port}/v1" and a.port is None
    assert b.upstream == "http://127.0.0.1:8081" and b.port == 8081
    assert c.upstream == "https://models.example" and c.port == 443
    assert d.upstream == "http://[::1]:7001" and d.port == 7001
    assert d.command == ("x", "{port}")
    assert notes == [
        "models.c.proxy: not on this host: Jano runs cmd here, then polls "
        "https://models.example for health; it also wants port 443 free here before each start",
        "models.d.proxy: a fixed port, so Jano gives cmd's ${PORT} the same port 7001 "
        "(llama-swap gave it one from startPort)"]


def test_remote_models_on_one_port_cannot_share_it() -> None:
    text = ("models:\n  a:\n    cmd: ssh a serve --port 8000\n    proxy: http://a.lan:8000\n"
            "  b:\n    cmd: ssh b serve --port 8000\n    proxy: http://b.lan:8000\n")
    with pytest.raises(LlamaSwapError, match="port 8000 is also a's"):
        convert_text(text)


def test_yes_and_no_stay_strings_as_in_llama_swap() -> None:
    cfg, _ = convert_text("macros:\n  flag: yes\n  on_: on\nmodels:\n"
                          "  a:\n    cmd: x ${flag} ${on_} ${PORT}\n")
    assert cfg.models[0].command == ("x", "yes", "on", "{port}")


def test_env_macros_come_from_the_given_environment() -> None:
    cfg, notes = convert_text("models:\n  a:\n    cmd: x ${PORT}\n"
                              "    env: ['HF_HOME=${env.HOME}/hf', 'ID=${MODEL_ID}']\n",
                              {"HOME": "/home/u"})
    assert dict(cfg.models[0].env) == {"HF_HOME": "/home/u/hf", "ID": "a"}
    assert notes == ["models.a: ${env.HOME} was replaced by its value here and now, not when "
                     "Jano starts the server"]


def test_split_command_follows_llama_swap() -> None:
    cmd = ("  # a comment line\nserver \\\n  --a 1   \\\n  --b 'two words'\n"
           "  # another\n  --c \"x\\\"y\"\n")
    assert split_command(cmd, "w") == ["server", "--a", "1", "--b", "two words", "--c", 'x"y']
    with pytest.raises(LlamaSwapError, match="the command is empty"):
        split_command("# only a comment\n", "w")


@pytest.mark.parametrize("value,text", [
    (True, "true"), (False, "false"), (4096, "4096"), (0.7, "0.7"), (1.0, "1"),
    (100.0, "100"), (123456.0, "123456"), (1e6, "1e+06"), (1234567.0, "1.234567e+06"),
    (0.0001, "0.0001"), (0.00001, "1e-05"), (-2.5, "-2.5"), ("s", "s")])
def test_macro_values_are_substituted_as_go_prints_them(value: object, text: str) -> None:
    assert go_text(value, "w") == text


def test_toml_strings_round_trip() -> None:
    tricky = 'a"b\\c\td\ne\x01f\x7fg é "qwen:7b/x"'
    values: dict[str, Any] = {"s": tricky, "a": [tricky, "x"], "t": {"K Y": tricky},
                              "n": 3, "f": 2.0, "b": True, "p": [1, 2]}
    text = dumps(["comment\nwith newline"], [("[[models]]", values)])
    assert tomllib.loads(text) == {"models": [values]}


def test_runs_as_a_module(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "jano.importers.llama_swap",
                           str(FIXTURES / "macros.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert loaded(done.stdout).model("coder") is not None
    assert done.stderr.startswith(f"{PREFIX}models.docker-llama.cmdStop: ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    done = subprocess.run([sys.executable, "-m", "jano.importers.llama_swap", str(bad)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "invalid YAML" in done.stderr


def test_group_names_never_collide() -> None:
    cfg, _ = convert_text(
        "models:\n  b:\n    cmd: x ${PORT}\n  c:\n    cmd: y ${PORT}\n"
        "  d:\n    cmd: z ${PORT}\n  e:\n    cmd: w ${PORT}\n"
        "groups:\n  a:\n    swap: false\n    members: [b]\n"
        "  a-b:\n    members: [c]\n  default:\n    members: [d]\n")
    assert {m.name: m.group for m in cfg.models} == {
        "b": "a-b-2", "c": "a-b", "d": "default", "e": "ungrouped"}
