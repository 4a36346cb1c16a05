"""
Jano's configuration: TOML in, frozen records out.  Pure: no Twisted.

Every error is a :class:`ConfigError` whose message is one line naming the
key path and what was expected, so ``twistd jano`` can print it and stop
without a traceback.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from jano.records import DEFAULT_HEALTH, ModelSpec

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is the one-line reason."""


@dataclass(frozen=True, slots=True)
class CallerKey:
    """One named API key (``server.api_keys``): who is calling, and their limits."""

    name: str
    key: str = field(repr=False)
    #: Requests of this caller waiting in Jano's queues at most (``None``: no limit).
    max_queued: Optional[int] = None
    #: Requests of this caller per minute at most (``None``: no limit).
    requests_per_minute: Optional[int] = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    #: Seconds to wait for an upstream's response headers before answering 504.
    upstream_timeout: float = 600.0
    #: Largest request body accepted; larger gets 413 before more is read.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Seconds a client may leave a response unread before it is dropped.
    idle_write_timeout: float = 300.0
    #: Seconds ``SIGTERM`` waits for in-flight streams before closing them.
    shutdown_grace: float = 30.0
    #: Open client connections at most; more are closed unread.
    max_connections: int = 2048
    #: Open connections from one client address at most.
    max_connections_per_client: int = 1024
    #: Seconds a client connection may idle between requests (or trickle a head in).
    idle_timeout: float = 60.0
    #: Seconds without a body byte mid-stream before the request ends as stalled.
    stall_timeout: float = 120.0
    #: Stalls or header timeouts in a row that mark a model stalled (0: never).
    stall_threshold: int = 3
    #: Seconds a stalled model's requests fail fast before one may try again.
    stall_cooldown: float = 30.0
    #: Response header carrying each request's id ("" : none).
    request_id_header: str = "X-Jano-Request-Id"
    #: Bearer token for the proxy routes (``None``: open).
    api_key: Optional[str] = field(default=None, repr=False)
    #: Named keys for the proxy routes; each caller's name goes into its usage records.
    api_keys: tuple[CallerKey, ...] = field(default=(), repr=False)
    #: Bearer token for loading and unloading models (``None``: ``api_key``).
    admin_key: Optional[str] = field(default=None, repr=False)
    #: Bearer token for the telemetry routes (``None``: open).
    telemetry_key: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_wait: float = 120.0
    max_queue: int = 256
    swap_timeout: float = 300.0
    ready_timeout: float = 300.0
    retry_backoff: float = 5.0
    #: Seconds a swap away from an idle resident waits for more requests for it.
    collate: float = 0.25
    #: Seconds a model swapped in is not evicted for an idle gap (0: off).
    min_residency: float = 0.0
    #: Seconds idle before a resident is unloaded, for models without ``ttl`` (0: never).
    ttl: float = 0.0
    #: Models loaded (swapped in) at start-up, at most one per group.
    preload: tuple[str, ...] = ()
    #: group -> model known to be resident at start-up.
    initial_model: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SwapConfig:
    #: argv; ``{model}`` and ``{previous}`` are substituted.  Empty: no script
    #: (only possible when no group has more than one swappable model).
    command: tuple[str, ...] = ()
    #: argv run to unload a model (``{model}`` substituted).  Empty: ``command``
    #: with an empty ``{model}`` and ``{previous}`` = the model unloaded.
    unload: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    usage_ring: int = 1000
    health_interval: float = 5.0
    thrash_swaps_per_hour: int = 20
    #: Seconds of backend load time on a request that caused no swap that count
    #: as a hidden reload (Ollama's ``load_duration``).
    reload_threshold: float = 0.5
    #: The SQLite file usage records are kept in ("" or ":memory:": memory only,
    #: gone at restart).  A config file that names none gets
    #: :func:`default_database`.
    database: str = ""
    #: Usage records and samples older than this many days are deleted (0: kept).
    retention_days: float = 90.0
    #: Usage records beyond this many are deleted, oldest first (0: no cap).
    max_rows: int = 1_000_000


@dataclass(frozen=True, slots=True)
class Config:
    models: tuple[ModelSpec, ...]
    server: ServerConfig = ServerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    swap: SwapConfig = SwapConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    #: Where it was read from (``None``: built in code).
    source: Optional[str] = None
    demo: bool = False

    def model(self, name: str) -> Optional[ModelSpec]:
        for spec in self.models:
            if spec.name == name:
                return spec
        return None


# --- validation helpers -------------------------------------------------------


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in table:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(allowed)})")


def _get(table: Mapping[str, Any], key: str, path: str, kind: type, default: Any,
         check: Optional[Callable[[Any], Optional[str]]] = None) -> Any:
    where = f"{path}.{key}"
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}[kind]
        raise ConfigError(f"{where}: expected {expected}, got {_type_name(value)} {value!r}")
    if check is not None:
        problem = check(value)
        if problem:
            raise ConfigError(f"{where}: {problem}, got {value!r}")
    return value


def _positive(value: float) -> Optional[str]:
    return None if value > 0 else "expected a positive number"


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table ([{key}]), got {_type_name(value)}")
    return value


def _header_name(value: str) -> Optional[str]:
    token = "!#$%&'*+-.^_`|~"
    if value and not all(c.isascii() and (c.isalnum() or c in token) for c in value):
        return "expected a header name (letters, digits and -), or \"\" for none"
    return None


def _upstream(value: str) -> Optional[str]:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL"
    if parts.query or parts.fragment:
        return "expected a base URL without query or fragment"
    return None


def _read_key(table: Mapping[str, Any], key: str, path: str, base: Path) -> Optional[str]:
    """A secret given inline (``key``) or in a file (``key_file``)."""
    inline = _get(table, key, path, str, None)
    file_ = _get(table, key + "_file", path, str, None)
    if inline is not None and file_ is not None:
        raise ConfigError(f"{path}.{key}: give {key} or {key}_file, not both")
    if file_ is not None:
        try:
            inline = (base / file_).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{path}.{key}_file: cannot read {file_!r}: {e.strerror}") from None
    if inline is not None and not inline:
        raise ConfigError(f"{path}.{key}: the key is empty")
    return inline


def _api_keys(raw: Any, base: Path) -> tuple[CallerKey, ...]:
    if not isinstance(raw, list) or not all(isinstance(k, dict) for k in raw):
        raise ConfigError("server.api_keys: expected an array of tables "
                          "([[server.api_keys]] with name and key or key_file)")
    keys: list[CallerKey] = []
    for i, entry in enumerate(raw):
        path = f"server.api_keys[{i}]"
        _check_keys(entry, ("name", "key", "key_file", "max_queued", "requests_per_minute"), path)
        name = _get(entry, "name", path, str, None,
                    lambda v: None if v and len(v) <= 64 and v.isprintable() else
                    "expected a short printable name")
        if name is None:
            raise ConfigError(f"{path}.name: missing (every key needs a caller name)")
        key = _read_key(entry, "key", path, base)
        if key is None:
            raise ConfigError(f"{path}.key: missing (give key or key_file)")
        if any(k.name == name for k in keys):
            raise ConfigError(f"{path}.name: duplicate caller name {name!r}")
        if any(hmac_equal(k.key, key) for k in keys):
            raise ConfigError(f"{path}.key: the same key as another caller's")
        keys.append(CallerKey(
            name=name, key=key,
            max_queued=_get(entry, "max_queued", path, int, None,
                            lambda v: None if v >= 1 else "expected at least 1"),
            requests_per_minute=_get(entry, "requests_per_minute", path, int, None,
                                     lambda v: None if v >= 1 else "expected at least 1")))
    return tuple(keys)


def hmac_equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


# --- the parser ---------------------------------------------------------------

_MODEL_KEYS = ("name", "upstream", "kind", "health", "max_concurrency", "group", "always_on",
               "ttl")


def parse_config(doc: Mapping[str, Any], *, source: Optional[str] = None,
                 base: Optional[Path] = None) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    base = base or Path.cwd()
    _check_keys(doc, ("server", "scheduler", "swap", "telemetry", "models"), "")

    srv = _table(doc, "server")
    _check_keys(srv, ("listen", "upstream_timeout", "max_body_bytes", "idle_write_timeout",
                      "shutdown_grace", "api_key", "api_key_file", "telemetry_key",
                      "telemetry_key_file", "max_connections", "max_connections_per_client",
                      "idle_timeout", "admin_key", "admin_key_file", "api_keys", "stall_timeout",
                      "stall_threshold", "stall_cooldown", "request_id_header"), "server")
    server = ServerConfig(
        listen=_get(srv, "listen", "server", str, DEFAULT_LISTEN),
        upstream_timeout=_get(srv, "upstream_timeout", "server", float, 600.0, _positive),
        max_body_bytes=_get(srv, "max_body_bytes", "server", int, 8 * 1024 * 1024,
                            lambda v: None if v >= 1024 else "expected at least 1024"),
        idle_write_timeout=_get(srv, "idle_write_timeout", "server", float, 300.0, _positive),
        shutdown_grace=_get(srv, "shutdown_grace", "server", float, 30.0,
                            lambda v: None if v >= 0 else "expected 0 or more"),
        max_connections=_get(srv, "max_connections", "server", int, 2048,
                             lambda v: None if v >= 1 else "expected at least 1"),
        max_connections_per_client=_get(srv, "max_connections_per_client", "server", int, 1024,
                                        lambda v: None if v >= 1 else "expected at least 1"),
        idle_timeout=_get(srv, "idle_timeout", "server", float, 60.0, _positive),
        stall_timeout=_get(srv, "stall_timeout", "server", float, 120.0, _positive),
        stall_threshold=_get(srv, "stall_threshold", "server", int, 3,
                             lambda v: None if v >= 0 else "expected 0 (never) or more"),
        stall_cooldown=_get(srv, "stall_cooldown", "server", float, 30.0, _positive),
        request_id_header=_get(srv, "request_id_header", "server", str, "X-Jano-Request-Id",
                               _header_name),
        api_key=_read_key(srv, "api_key", "server", base),
        telemetry_key=_read_key(srv, "telemetry_key", "server", base),
        admin_key=_read_key(srv, "admin_key", "server", base),
        api_keys=_api_keys(srv.get("api_keys", []), base),
    )

    sch = _table(doc, "scheduler")
    _check_keys(sch, ("max_wait", "max_queue", "swap_timeout", "ready_timeout", "retry_backoff",
                      "initial_model", "collate", "min_residency", "ttl", "preload"), "scheduler")
    preload_raw = sch.get("preload", [])
    if not isinstance(preload_raw, list) or not all(isinstance(v, str) for v in preload_raw):
        raise ConfigError("scheduler.preload: expected an array of model names")
    initial_raw = sch.get("initial_model", {})
    if isinstance(initial_raw, str):
        initial_raw = {"": initial_raw}  # resolved against the model's group below
    if not isinstance(initial_raw, dict) or not all(isinstance(v, str) for v in initial_raw.values()):
        raise ConfigError("scheduler.initial_model: expected a model name or a table of group = model")

    swp = _table(doc, "swap")
    _check_keys(swp, ("command", "unload"), "swap")
    unload = swp.get("unload", [])
    if not isinstance(unload, list) or not all(isinstance(a, str) for a in unload):
        raise ConfigError("swap.unload: expected an array of strings (argv)")
    command = swp.get("command", [])
    if isinstance(command, str):
        raise ConfigError("swap.command: expected an array of strings (argv), got a string; "
                          "write [\"path/to/script\", \"{model}\"]")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ConfigError("swap.command: expected an array of strings (argv)")

    tel = _table(doc, "telemetry")
    _check_keys(tel, ("usage_ring", "health_interval", "thrash_swaps_per_hour",
                      "reload_threshold", "database", "retention_days", "max_rows"), "telemetry")
    database = _get(tel, "database", "telemetry", str, None)
    if database is None:
        database = str(default_database())
    elif database not in ("", ":memory:"):
        database = str(base / database)
    telemetry = TelemetryConfig(
        usage_ring=_get(tel, "usage_ring", "telemetry", int, 1000,
                        lambda v: None if 1 <= v <= 1_000_000 else "expected 1 to 1000000"),
        health_interval=_get(tel, "health_interval", "telemetry", float, 5.0, _positive),
        thrash_swaps_per_hour=_get(tel, "thrash_swaps_per_hour", "telemetry", int, 20,
                                   lambda v: None if v >= 1 else "expected at least 1"),
        reload_threshold=_get(tel, "reload_threshold", "telemetry", float, 0.5, _positive),
        database=database,
        retention_days=_get(tel, "retention_days", "telemetry", float, 90.0,
                            lambda v: None if v >= 0 else "expected 0 (keep) or more days"),
        max_rows=_get(tel, "max_rows", "telemetry", int, 1_000_000,
                      lambda v: None if v >= 0 else "expected 0 (no cap) or more"),
    )

    raw_models = doc.get("models")
    if raw_models is None or raw_models == []:
        raise ConfigError("models: at least one [[models]] table is required")
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise ConfigError("models: expected an array of tables ([[models]])")
    models: list[ModelSpec] = []
    seen: set[str] = set()
    for i, m in enumerate(raw_models):
        path = f"models[{i}]"
        _check_keys(m, _MODEL_KEYS, path)
        if "name" not in m:
            raise ConfigError(f"{path}.name: missing (every model needs a name)")
        name = _get(m, "name", path, str, None,
                    lambda v: None if v.strip() == v and v else "expected a non-empty name without surrounding spaces")
        path = f"models[{i}] ({name})"
        if name in seen:
            raise ConfigError(f"{path}.name: duplicate model name {name!r}")
        seen.add(name)
        if "upstream" not in m:
            raise ConfigError(f"{path}.upstream: missing (expected the backend's base URL, e.g. http://127.0.0.1:8080)")
        upstream = _get(m, "upstream", path, str, None, _upstream).rstrip("/")
        kind = _get(m, "kind", path, str, "llamacpp",
                    lambda v: None if v in DEFAULT_HEALTH else "expected one of llamacpp, ollama, openai")
        health = _get(m, "health", path, str, DEFAULT_HEALTH[kind],
                      lambda v: None if v.startswith("/") else "expected a path starting with /")
        models.append(ModelSpec(
            name=name, upstream=upstream, kind=kind, health=health,
            max_concurrency=_get(m, "max_concurrency", path, int, 4,
                                 lambda v: None if 1 <= v <= 10_000 else "expected 1 to 10000"),
            group=_get(m, "group", path, str, "default",
                       lambda v: None if v else "expected a non-empty group name"),
            always_on=_get(m, "always_on", path, bool, False),
            ttl=_get(m, "ttl", path, float, None,
                     lambda v: None if v >= 0 else "expected 0 (never) or more seconds"),
        ))

    initial: dict[str, str] = {}
    for group, name in initial_raw.items():
        spec = next((s for s in models if s.name == name), None)
        if spec is None:
            raise ConfigError(f"scheduler.initial_model: {name!r} is not a configured model")
        if group and group != spec.group:
            raise ConfigError(f"scheduler.initial_model.{group}: {name!r} is in group {spec.group!r}")
        initial[spec.group] = name

    preload: list[str] = []
    preloaded_groups: dict[str, str] = {}
    for name in preload_raw:
        spec = next((s for s in models if s.name == name), None)
        if spec is None:
            raise ConfigError(f"scheduler.preload: {name!r} is not a configured model")
        if spec.always_on:
            raise ConfigError(f"scheduler.preload: {name!r} is always_on (always loaded already)")
        if spec.group in preloaded_groups:
            raise ConfigError(f"scheduler.preload: {name!r} and {preloaded_groups[spec.group]!r} "
                              f"share group {spec.group!r}, which holds one model at a time")
        preloaded_groups[spec.group] = name
        preload.append(name)

    swappable: dict[str, int] = {}
    for spec in models:
        if not spec.always_on:
            swappable[spec.group] = swappable.get(spec.group, 0) + 1
    if not command and any(n > 1 or spec_group not in initial for spec_group, n in swappable.items()):
        many = [g for g, n in swappable.items() if n > 1 or g not in initial]
        raise ConfigError(
            f"swap.command: missing, but group {many[0]!r} needs swaps "
            "(set [swap] command, mark the model always_on, or name it in scheduler.initial_model)")

    scheduler = SchedulerConfig(
        max_wait=_get(sch, "max_wait", "scheduler", float, 120.0, _positive),
        max_queue=_get(sch, "max_queue", "scheduler", int, 256,
                       lambda v: None if 1 <= v <= 1_000_000 else "expected 1 to 1000000"),
        swap_timeout=_get(sch, "swap_timeout", "scheduler", float, 300.0, _positive),
        ready_timeout=_get(sch, "ready_timeout", "scheduler", float, 300.0, _positive),
        retry_backoff=_get(sch, "retry_backoff", "scheduler", float, 5.0,
                           lambda v: None if v >= 0 else "expected 0 or more"),
        ttl=_get(sch, "ttl", "scheduler", float, 0.0,
                 lambda v: None if v >= 0 else "expected 0 (never) or more seconds"),
        preload=tuple(preload),
        collate=_get(sch, "collate", "scheduler", float, 0.25,
                     lambda v: None if 0 <= v <= 10 else "expected 0 to 10 (seconds)"),
        min_residency=_get(sch, "min_residency", "scheduler", float, 0.0,
                           lambda v: None if v >= 0 else "expected 0 or more"),
        initial_model=initial,
    )
    return Config(models=tuple(models), server=server, scheduler=scheduler,
                  swap=SwapConfig(tuple(command), tuple(unload)), telemetry=telemetry,
                  source=source)


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
    xdg = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "~"), ".local", "state")
    return Path(xdg) / "jano" / "usage.sqlite3"


def default_config_paths(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where ``twistd jano`` looks when ``--config`` is not given, in order."""
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    return [Path("jano.toml"), Path(xdg) / "jano" / "jano.toml", Path("/etc/jano/jano.toml")]


def find_config(env: Mapping[str, str] = os.environ) -> Optional[Path]:
    for p in default_config_paths(env):
        if p.is_file():
            return p
    return None
