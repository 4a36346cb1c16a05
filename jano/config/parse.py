"""
The parser: a TOML document in, a :class:`~jano.config.records.Config` out,
and where ``twistd jano`` looks for its file and keeps its history.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional

from jano.config.checks import (api_keys, check_keys, get, header_name, positive, read_key,
                                table)
from jano.config.records import (DEFAULT_LISTEN, Config, ConfigError, GroupConfig, SchedulerConfig,
                                 ServerConfig, SwapConfig, TelemetryConfig)
from jano.config.models import group_budget_errors, parse_groups, parse_models, parse_processes



def parse_config(doc: Mapping[str, Any], *, source: Optional[str] = None,
                 base: Optional[Path] = None) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    base = base or Path.cwd()
    check_keys(doc, ("server", "scheduler", "swap", "telemetry", "models", "processes", "groups"),
               "")

    srv = table(doc, "server")
    check_keys(srv, ("listen", "upstream_timeout", "max_body_bytes", "idle_write_timeout",
                      "shutdown_grace", "api_key", "api_key_file", "telemetry_key",
                      "telemetry_key_file", "max_connections", "max_connections_per_client",
                      "idle_timeout", "admin_key", "admin_key_file", "api_keys", "stall_timeout",
                      "stall_threshold", "stall_cooldown", "request_id_header"), "server")
    server = ServerConfig(
        listen=get(srv, "listen", "server", str, DEFAULT_LISTEN),
        upstream_timeout=get(srv, "upstream_timeout", "server", float, 600.0, positive),
        max_body_bytes=get(srv, "max_body_bytes", "server", int, 8 * 1024 * 1024,
                            lambda v: None if v >= 1024 else "expected at least 1024"),
        idle_write_timeout=get(srv, "idle_write_timeout", "server", float, 300.0, positive),
        shutdown_grace=get(srv, "shutdown_grace", "server", float, 30.0,
                            lambda v: None if v >= 0 else "expected 0 or more"),
        max_connections=get(srv, "max_connections", "server", int, 2048,
                             lambda v: None if v >= 1 else "expected at least 1"),
        max_connections_per_client=get(srv, "max_connections_per_client", "server", int, 1024,
                                        lambda v: None if v >= 1 else "expected at least 1"),
        idle_timeout=get(srv, "idle_timeout", "server", float, 60.0, positive),
        stall_timeout=get(srv, "stall_timeout", "server", float, 120.0, positive),
        stall_threshold=get(srv, "stall_threshold", "server", int, 3,
                             lambda v: None if v >= 0 else "expected 0 (never) or more"),
        stall_cooldown=get(srv, "stall_cooldown", "server", float, 30.0, positive),
        request_id_header=get(srv, "request_id_header", "server", str, "X-Jano-Request-Id",
                               header_name),
        api_key=read_key(srv, "api_key", "server", base),
        telemetry_key=read_key(srv, "telemetry_key", "server", base),
        admin_key=read_key(srv, "admin_key", "server", base),
        api_keys=api_keys(srv.get("api_keys", []), base),
    )

    sch = table(doc, "scheduler")
    check_keys(sch, ("max_wait", "max_queue", "swap_timeout", "ready_timeout", "retry_backoff",
                      "initial_model", "collate", "min_residency", "ttl", "preload"), "scheduler")
    preload_raw = sch.get("preload", [])
    if not isinstance(preload_raw, list) or not all(isinstance(v, str) for v in preload_raw):
        raise ConfigError("scheduler.preload: expected an array of model names")
    initial_raw = sch.get("initial_model", {})
    if isinstance(initial_raw, str):
        initial_raw = {"": initial_raw}  # resolved against the model's group below
    if not isinstance(initial_raw, dict) or not all(isinstance(v, str) for v in initial_raw.values()):
        raise ConfigError("scheduler.initial_model: expected a model name or a table of group = model")

    swp = table(doc, "swap")
    check_keys(swp, ("command", "unload"), "swap")
    unload = swp.get("unload", [])
    if not isinstance(unload, list) or not all(isinstance(a, str) for a in unload):
        raise ConfigError("swap.unload: expected an array of strings (argv)")
    command = swp.get("command", [])
    if isinstance(command, str):
        raise ConfigError("swap.command: expected an array of strings (argv), got a string; "
                          "write [\"path/to/script\", \"{model}\"]")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ConfigError("swap.command: expected an array of strings (argv)")

    tel = table(doc, "telemetry")
    check_keys(tel, ("usage_ring", "health_interval", "thrash_swaps_per_hour",
                      "reload_threshold", "database", "retention_days", "max_rows"), "telemetry")
    database = get(tel, "database", "telemetry", str, None)
    if database is None:
        database = str(default_database())
    elif database not in ("", ":memory:"):
        database = str(base / database)
    telemetry = TelemetryConfig(
        usage_ring=get(tel, "usage_ring", "telemetry", int, 1000,
                        lambda v: None if 1 <= v <= 1_000_000 else "expected 1 to 1000000"),
        health_interval=get(tel, "health_interval", "telemetry", float, 5.0, positive),
        thrash_swaps_per_hour=get(tel, "thrash_swaps_per_hour", "telemetry", int, 20,
                                   lambda v: None if v >= 1 else "expected at least 1"),
        reload_threshold=get(tel, "reload_threshold", "telemetry", float, 0.5, positive),
        database=database,
        retention_days=get(tel, "retention_days", "telemetry", float, 90.0,
                            lambda v: None if v >= 0 else "expected 0 (keep) or more days"),
        max_rows=get(tel, "max_rows", "telemetry", int, 1_000_000,
                      lambda v: None if v >= 0 else "expected 0 (no cap) or more"),
    )

    models = parse_models(doc.get("models"), base)
    processes = parse_processes(doc, base, default_runs_dir)
    groups = parse_groups(doc)
    problem = group_budget_errors(models, groups)
    if problem:
        raise ConfigError(problem)

    served = {s.serves: s for s in models if s.serves is not None}
    initial: dict[str, str] = {}
    for group, name in initial_raw.items():
        spec = next((s for s in models if s.name == name), None)
        if spec is None and name in served:
            raise ConfigError(f"scheduler.initial_model: {name!r} has replicas; name the one "
                              f"loaded (such as {served[name].name!r}) under its group")
        if spec is None:
            raise ConfigError(f"scheduler.initial_model: {name!r} is not a configured model")
        if group and group != spec.group:
            raise ConfigError(f"scheduler.initial_model.{group}: {name!r} is in group {spec.group!r}")
        if spec.managed:
            raise ConfigError(f"scheduler.initial_model: {name!r} is run by Jano (it has a "
                              "command), so it is never resident before Jano starts it; "
                              "use scheduler.preload")
        initial[spec.group] = name

    preload: list[str] = []
    preloaded_groups: dict[str, str] = {}
    for name in preload_raw:
        spec = next((s for s in models if s.name == name), None)
        if spec is None and name in served:  # loaded on the replica a request would choose
            if served[name].always_on:
                raise ConfigError(f"scheduler.preload: {name!r} is always_on (always loaded "
                                  "already)")
            preload.append(name)
            continue
        if spec is None:
            raise ConfigError(f"scheduler.preload: {name!r} is not a configured model")
        if spec.always_on:
            raise ConfigError(f"scheduler.preload: {name!r} is always_on (always loaded already)")
        if spec.group in preloaded_groups and groups.get(spec.group, GroupConfig()).memory is None:
            raise ConfigError(f"scheduler.preload: {name!r} and {preloaded_groups[spec.group]!r} "
                              f"share group {spec.group!r}, which holds one model at a time")
        preloaded_groups[spec.group] = name
        preload.append(name)

    swappable: dict[str, int] = {}
    scripted: set[str] = set()
    for spec in models:
        if not spec.always_on:
            swappable[spec.group] = swappable.get(spec.group, 0) + 1
            if not spec.managed:
                scripted.add(spec.group)
    needs = [g for g, n in swappable.items() if g in scripted and (n > 1 or g not in initial)]
    if not command and needs:
        raise ConfigError(
            f"swap.command: missing, but group {needs[0]!r} needs swaps "
            "(set [swap] command, give its models a command for Jano to run, mark the model "
            "always_on, or name it in scheduler.initial_model)")

    scheduler = SchedulerConfig(
        max_wait=get(sch, "max_wait", "scheduler", float, 120.0, positive),
        max_queue=get(sch, "max_queue", "scheduler", int, 256,
                       lambda v: None if 1 <= v <= 1_000_000 else "expected 1 to 1000000"),
        swap_timeout=get(sch, "swap_timeout", "scheduler", float, 300.0, positive),
        ready_timeout=get(sch, "ready_timeout", "scheduler", float, 300.0, positive),
        retry_backoff=get(sch, "retry_backoff", "scheduler", float, 5.0,
                           lambda v: None if v >= 0 else "expected 0 or more"),
        ttl=get(sch, "ttl", "scheduler", float, 0.0,
                 lambda v: None if v >= 0 else "expected 0 (never) or more seconds"),
        preload=tuple(preload),
        collate=get(sch, "collate", "scheduler", float, 0.25,
                     lambda v: None if 0 <= v <= 10 else "expected 0 to 10 (seconds)"),
        min_residency=get(sch, "min_residency", "scheduler", float, 0.0,
                           lambda v: None if v >= 0 else "expected 0 or more"),
        initial_model=initial,
    )
    return Config(models=tuple(models), server=server, scheduler=scheduler,
                  swap=SwapConfig(tuple(command), tuple(unload)), telemetry=telemetry,
                  processes=processes, groups=groups, source=source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file; relative paths in it are relative to the working directory, as in a shell."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return parse_config(doc, source=str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def default_database(env: Mapping[str, str] = os.environ) -> Path:
    """
    Where usage history lives when the config names no ``telemetry.database``:
    systemd's ``$STATE_DIRECTORY`` (the unit's ``StateDirectory=jano``, i.e.
    ``/var/lib/jano``), else ``$XDG_STATE_HOME/jano``, else ``~/.local/state/jano``.
    """
    state = env.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "usage.sqlite3"
    return _user_state(env) / "usage.sqlite3"


def _user_state(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/jano``, else ``~/.local/state/jano``."""
    xdg = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "~"), ".local", "state")
    return Path(xdg) / "jano"


def default_runs_dir(env: Mapping[str, str] = os.environ) -> Path:
    """
    Where the records of Jano runs with managed servers go (``processes.runs_dir``):
    systemd's ``$RUNTIME_DIRECTORY`` (``RuntimeDirectory=jano``), else
    ``$XDG_RUNTIME_DIR/jano``, else ``$XDG_STATE_HOME/jano/runs`` or
    ``~/.local/state/jano/runs``.
    """
    runtime = env.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0])
    xdg_run = env.get("XDG_RUNTIME_DIR")
    if xdg_run:
        return Path(xdg_run) / "jano"
    return _user_state(env) / "runs"


def default_config_paths(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where ``twistd jano`` looks when ``--config`` is not given, in order."""
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    return [Path("jano.toml"), Path(xdg) / "jano" / "jano.toml", Path("/etc/jano/jano.toml")]


def find_config(env: Mapping[str, str] = os.environ) -> Optional[Path]:
    for p in default_config_paths(env):
        if p.is_file():
            return p
    return None
