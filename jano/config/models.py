"""
The ``[[models]]``, ``[processes]`` and ``[groups.<name>]`` tables: what
each model is, how Jano runs the servers it manages, and what each group
(one GPU, one host) holds.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from jano.config.checks import check_keys, get, positive, table, type_name, upstream_url
from jano.config.records import ConfigError, GroupConfig, ProcessesConfig
from jano.records import DEFAULT_HEALTH, ModelSpec

__all__ = ["parse_models", "parse_processes", "parse_groups", "parse_memory", "MANAGED_UPSTREAM"]

_MODEL_KEYS = ("name", "upstream", "upstreams", "kind", "health", "max_concurrency", "group",
               "always_on", "ttl", "command", "env", "cwd", "stop_timeout", "port", "memory",
               "spread")
#: What one replica (a table in ``upstreams``) may set for itself; the rest is the model's.
_REPLICA_KEYS = ("url", "group", "command", "env", "cwd", "port", "max_concurrency", "memory")

#: The upstream of a managed model that names none.
MANAGED_UPSTREAM = "http://127.0.0.1:{port}"

_PLACEHOLDER = re.compile(r"\{([a-z_]*)\}")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(MiB|GiB|TiB|MB|GB|TB|M|G|T)?\s*$", re.IGNORECASE)
_MIB_PER = {"mib": 1.0, "m": 1.0, "mb": 1e6 / 2**20, "gib": 1024.0, "g": 1024.0,
            "gb": 1e9 / 2**20, "tib": 1024.0**2, "t": 1024.0**2, "tb": 1e12 / 2**20}


def parse_memory(value: object, where: str) -> int:
    """``8192``, ``"8192 MiB"``, ``"8 GiB"``, ``"8G"`` (binary), ``"8 GB"`` (decimal) -> MiB."""
    if isinstance(value, int) and not isinstance(value, bool):
        mib = float(value)
    elif isinstance(value, str) and (m := _MEMORY.match(value)):
        mib = float(m.group(1)) * _MIB_PER[(m.group(2) or "MiB").lower()]
    else:
        raise ConfigError(f"{where}: expected MiB as an integer or a size such as \"24 GiB\", "
                          f"got {type_name(value)} {value!r}")
    if mib < 1:
        raise ConfigError(f"{where}: expected at least 1 MiB, got {value!r}")
    return int(round(mib))


def parse_processes(doc: Mapping[str, Any], base: Path,
                    default_runs: Callable[[], Path]) -> ProcessesConfig:
    """``[processes]``: the ports and logs of the servers Jano runs."""
    raw = table(doc, "processes")
    check_keys(raw, ("port_range", "log_bytes", "restart_backoff", "restart_backoff_max",
                     "runs_dir"), "processes")
    runs = get(raw, "runs_dir", "processes", str, None)
    ports = raw.get("port_range", [10100, 10299])
    if (not isinstance(ports, list) or len(ports) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
            or not 1024 <= ports[0] <= ports[1] <= 65535):
        raise ConfigError(f"processes.port_range: expected [first, last] with "
                          f"1024 <= first <= last <= 65535, got {ports!r}")
    backoff = get(raw, "restart_backoff", "processes", float, 2.0, positive)
    return ProcessesConfig(
        port_range=(ports[0], ports[1]),
        log_bytes=get(raw, "log_bytes", "processes", int, 256 * 1024,
                      lambda v: None if 4096 <= v <= 64 * 2**20 else "expected 4096 to 67108864"),
        restart_backoff=backoff,
        restart_backoff_max=get(raw, "restart_backoff_max", "processes", float, 300.0,
                                lambda v: None if v >= backoff
                                else "expected at least processes.restart_backoff"),
        runs_dir=str(default_runs()) if runs is None else str(base / runs) if runs else "",
    )


def parse_groups(doc: Mapping[str, Any]) -> dict[str, GroupConfig]:
    """``[groups.<name>]``: a memory budget per group."""
    raw = table(doc, "groups")
    groups: dict[str, GroupConfig] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"groups.{name}: expected a table ([groups.{name}]), "
                              f"got {type_name(value)}")
        check_keys(value, ("memory",), f"groups.{name}")
        memory = parse_memory(value["memory"], f"groups.{name}.memory") if "memory" in value else None
        groups[name] = GroupConfig(memory=memory)
    return groups


def _argv(m: Mapping[str, Any], path: str) -> tuple[str, ...]:
    command = m.get("command", [])
    if isinstance(command, str):
        raise ConfigError(f"{path}.command: expected an array of strings (argv), got a string; "
                          "write [\"llama-server\", \"-m\", \"/models/x.gguf\", \"--port\", \"{port}\"]")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ConfigError(f"{path}.command: expected an array of strings (argv)")
    if "command" in m and (not command or not command[0]):
        raise ConfigError(f"{path}.command: the program name (first element) is empty")
    for arg in command:
        for name in _PLACEHOLDER.findall(arg):
            if name not in ("port", "model"):
                raise ConfigError(f"{path}.command: unknown placeholder {{{name}}} in {arg!r} "
                                  "(expected {port} or {model})")
    return tuple(command)


def _env(m: Mapping[str, Any], path: str) -> tuple[tuple[str, str], ...]:
    env = m.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{path}.env: expected a table of NAME = \"value\" strings")
    for name in env:
        if not name or "=" in name or "\0" in name or "\0" in env[name]:
            raise ConfigError(f"{path}.env: {name!r} is not a valid environment variable name")
    return tuple(sorted(env.items()))


def _name(m: Mapping[str, Any], path: str) -> str:
    name: str = get(m, "name", path, str, None,
                    lambda v: None if v.strip() == v and v else
                    "expected a non-empty name without surrounding spaces")
    return name


def _model(m: Mapping[str, Any], path: str, base: Path) -> ModelSpec:
    name = _name(m, path)
    path = f"{path} ({name})"
    command = _argv(m, path)
    managed = bool(command)
    for key in ("env", "cwd", "stop_timeout", "port"):
        if key in m and not managed:
            raise ConfigError(f"{path}.{key}: only for a model Jano runs itself (give command)")
    port = get(m, "port", path, int, None,
               lambda v: None if 1 <= v <= 65535 else "expected a TCP port (1 to 65535)")
    if "upstream" in m:
        upstream = get(m, "upstream", path, str, None,
                       lambda v: upstream_url(v.replace("{port}", "1")))
        if "{port}" in upstream and not managed:
            raise ConfigError(f"{path}.upstream: {{port}} is only for a model with a command")
    elif managed:
        upstream = MANAGED_UPSTREAM
    else:
        raise ConfigError(f"{path}.upstream: missing (expected the backend's base URL, e.g. "
                          "http://127.0.0.1:8080, or a command for Jano to run)")
    if managed and "{port}" not in upstream and port is None:
        raise ConfigError(f"{path}.upstream: a managed model's upstream needs {{port}} or a "
                          "fixed models[].port, so Jano knows where its server listens")
    if port is not None:
        upstream = upstream.replace("{port}", str(port))
    kind = get(m, "kind", path, str, "llamacpp",
               lambda v: None if v in DEFAULT_HEALTH else "expected one of llamacpp, ollama, openai")
    cwd = get(m, "cwd", path, str, None, lambda v: None if v else "expected a directory")
    if cwd is not None:
        where = base / cwd
        if not where.is_dir():
            raise ConfigError(f"{path}.cwd: {str(where)!r} is not a directory")
        cwd = str(where)
    return ModelSpec(
        name=name, upstream=upstream.rstrip("/"), kind=kind,
        health=get(m, "health", path, str, DEFAULT_HEALTH[kind],
                   lambda v: None if v.startswith("/") else "expected a path starting with /"),
        max_concurrency=get(m, "max_concurrency", path, int, 4,
                            lambda v: None if 1 <= v <= 10_000 else "expected 1 to 10000"),
        group=get(m, "group", path, str, "default",
                  lambda v: None if v else "expected a non-empty group name"),
        always_on=get(m, "always_on", path, bool, False),
        ttl=get(m, "ttl", path, float, None,
                lambda v: None if v >= 0 else "expected 0 (never) or more seconds"),
        command=command, env=_env(m, path), cwd=cwd,
        stop_timeout=get(m, "stop_timeout", path, float, 10.0, positive),
        port=port,
        memory=parse_memory(m["memory"], f"{path}.memory") if "memory" in m else None,
        spread=get(m, "spread", path, bool, False),
    )


def _replicas(m: Mapping[str, Any], path: str, base: Path) -> list[ModelSpec]:
    """
    ``upstreams``: one spec per replica, named ``<name>@<group>`` (``<name>@<n>``,
    n from 1, for a replica without a group, which then is its own group).  A
    replica is the model's table with its own ``url`` as ``upstream`` and its
    own keys (:data:`_REPLICA_KEYS`) on top; ``{model}`` in its command is the
    model's name, as clients send it.
    """
    name = _name(m, path)
    where = f"{path} ({name})"
    if "upstream" in m:
        raise ConfigError(f"{where}.upstreams: give upstream or upstreams, not both")
    for key in ("group", "port"):
        if key in m:
            raise ConfigError(f"{where}.{key}: each replica has its own; give it in upstreams "
                              f"({{ url = \"http://...\", {key} = ... }})")
    raw = m["upstreams"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.upstreams: expected a non-empty array of URLs or tables "
                          "({ url = \"http://host-a:8080\", group = \"host-a\" })")
    specs: list[ModelSpec] = []
    for j, entry in enumerate(raw):
        rpath = f"{where}.upstreams[{j}]"
        if isinstance(entry, str):
            entry = {"url": entry}
        elif not isinstance(entry, dict):
            raise ConfigError(f"{rpath}: expected a URL or a table with url, got "
                              f"{type_name(entry)}")
        check_keys(entry, _REPLICA_KEYS, rpath)
        group = get(entry, "group", rpath, str, None,
                    lambda v: None if v and "@" not in v and "+" not in v
                    else "expected a non-empty group name without @ or +")
        if "url" not in entry and "command" not in entry and "command" not in m:
            raise ConfigError(f"{rpath}.url: missing (expected the replica's base URL, e.g. "
                              "http://127.0.0.2:8080, or a command for Jano to run)")
        replica = f"{name}@{group if group is not None else j + 1}"
        merged = {k: v for k, v in m.items() if k not in ("upstreams", "name")}
        merged.update({k: v for k, v in entry.items() if k not in ("url", "group")})
        if "url" in entry:
            merged["upstream"] = entry["url"]
        merged["name"] = replica
        merged["group"] = group if group is not None else replica
        try:
            spec = _model(merged, rpath, base)
        except ConfigError as e:  # name the key as the user wrote it
            raise ConfigError(str(e).replace(").upstream:", ").url:")) from None
        command = spec.command
        if "{" not in name:  # the server is asked for the model by the name clients use
            command = tuple(a.replace("{model}", name) for a in command)
        spec = replace(spec, serves=name, command=command)
        clash = next((s for s in specs if s.group == spec.group), None)
        if clash is not None:
            raise ConfigError(f"{rpath}.group: {spec.group!r} is also {clash.name!r}'s group; "
                              "two replicas of one model must be in different groups")
        specs.append(spec)
    return specs


def parse_models(raw_models: object, base: Path) -> list[ModelSpec]:
    """
    ``[[models]]``: at least one, unique names, fixed ports used once; a
    model with ``upstreams`` gives one spec per replica (:func:`_replicas`).
    """
    if raw_models is None or raw_models == []:
        raise ConfigError("models: at least one [[models]] table is required")
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise ConfigError("models: expected an array of tables ([[models]])")
    models: list[ModelSpec] = []
    names: set[str] = set()
    ports: dict[int, str] = {}
    for i, m in enumerate(raw_models):
        path = f"models[{i}]"
        check_keys(m, _MODEL_KEYS, path)
        if "name" not in m:
            raise ConfigError(f"{path}.name: missing (every model needs a name)")
        if "spread" in m and "upstreams" not in m:
            raise ConfigError(f"{path}.spread: only for a model with upstreams (replicas to "
                              "spread it over)")
        specs = _replicas(m, path, base) if "upstreams" in m else [_model(m, path, base)]
        for spec in specs:
            for name in {spec.name, spec.public_name}:
                if name in names and (name == spec.name or spec is specs[0]):
                    raise ConfigError(f"{path} ({spec.name}).name: duplicate model name "
                                      f"{name!r}")
                names.add(name)
            if spec.port is not None:
                if spec.port in ports:
                    raise ConfigError(f"{path} ({spec.name}).port: {spec.port} is also "
                                      f"{ports[spec.port]!r}'s port")
                ports[spec.port] = spec.name
            models.append(spec)
    return models


def group_budget_errors(models: list[ModelSpec], groups: Mapping[str, GroupConfig]) -> Optional[str]:
    """One line when a model cannot fit its group's budget at all."""
    for spec in models:
        budget = groups.get(spec.group, GroupConfig()).memory
        if budget is not None and not spec.always_on:
            if spec.memory is None:
                return (f"models ({spec.name}).memory: group {spec.group!r} has a memory budget, "
                        "so each of its models needs memory")
            if spec.memory > budget:
                return (f"models ({spec.name}).memory: {spec.memory} MiB is more than group "
                        f"{spec.group!r}'s budget of {budget} MiB")
    return None
