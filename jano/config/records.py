"""
The configuration's frozen records, and :class:`ConfigError`.  No Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from jano.records import ModelSpec, client_models

__all__ = ["DEFAULT_LISTEN", "CallerKey", "Config", "ConfigError", "GroupConfig",
           "ProcessesConfig", "SchedulerConfig", "ServerConfig", "SwapConfig", "TelemetryConfig"]

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
class ProcessesConfig:
    """``[processes]``: how Jano runs the model servers it manages."""

    #: Ports (inclusive) ``{port}`` is allocated from, in order.
    port_range: tuple[int, int] = (10100, 10299)
    #: Bytes of each managed server's output kept in memory (never on disk).
    log_bytes: int = 256 * 1024
    #: Seconds a crashed server waits before its first restart; doubled per crash in a row.
    restart_backoff: float = 2.0
    #: The ceiling of that wait.
    restart_backoff_max: float = 300.0
    #: Where each Jano run with managed servers leaves a record, so that the
    #: next one kills what a run killed with SIGKILL left (``""``: no records).
    runs_dir: str = ""


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """``[groups.<name>]``: one GPU's (or host's) budget."""

    #: MiB the group's residents may account for together (``None``: one at a time).
    memory: Optional[int] = None


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
    #: Every instance Jano schedules: each model, and each replica of a model
    #: with ``upstreams`` (:attr:`ModelSpec.serves` names its model);
    #: :meth:`client_models` are the models clients see.
    models: tuple[ModelSpec, ...]
    server: ServerConfig = ServerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    swap: SwapConfig = SwapConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    processes: ProcessesConfig = ProcessesConfig()
    groups: Mapping[str, GroupConfig] = field(default_factory=dict)
    #: Where it was read from (``None``: built in code).
    source: Optional[str] = None
    demo: bool = False

    def client_models(self) -> tuple[ModelSpec, ...]:
        """The models clients see: the replicas of one model as one (:func:`client_models`)."""
        return client_models(self.models)

    def model(self, name: str) -> Optional[ModelSpec]:
        for spec in self.models:
            if spec.name == name:
                return spec
        return None
