"""
Small frozen values shared by every layer.  No Twisted imports here.

Times are floats in seconds: ``*_at`` values come from the injected clock's
``seconds()`` (wall clock in production, a ``Clock`` in tests); durations are
differences of those.  ``None`` always means "not observed", never zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Sequence

BackendKind = Literal["llamacpp", "ollama", "openai"]

#: Health path used when a model's config names none.
DEFAULT_HEALTH: dict[str, str] = {
    "llamacpp": "/health",
    "ollama": "/api/version",
    "openai": "/v1/models",
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One configured model: where it is served and how it may be used."""

    name: str
    #: Base URL without a trailing slash, e.g. ``http://127.0.0.1:8080``.
    upstream: str
    kind: BackendKind = "llamacpp"
    #: Path (with optional query) polled for readiness and health.
    health: str = "/health"
    max_concurrency: int = 4
    #: Models in one group share one slot: exactly one of them is resident.
    group: str = "default"
    #: Never swapped, always routable (an embedding server beside the GPU model).
    always_on: bool = False
    #: Seconds idle (nothing queued or in flight) before the model is unloaded;
    #: ``None``: the scheduler's default; 0: never.
    ttl: Optional[float] = None
    #: The server's argv when Jano runs it itself (a *managed* model); empty:
    #: the model is loaded by the swap script, or always there.
    command: tuple[str, ...] = ()
    #: Extra environment for ``command`` (name, value), on top of Jano's own.
    env: tuple[tuple[str, str], ...] = ()
    #: Working directory for ``command`` (``None``: Jano's).
    cwd: Optional[str] = None
    #: Seconds between SIGTERM and SIGKILL when the managed server is stopped.
    stop_timeout: float = 10.0
    #: The TCP port of a managed server (``{port}`` in ``command``); ``None``
    #: until Jano allocates it, and for models Jano does not run.
    port: Optional[int] = None
    #: MiB the model needs once loaded (``groups.<name>.memory`` budgets);
    #: ``None``: not stated.
    memory: Optional[int] = None
    #: For a replica: a request may go to another replica (loading the model
    #: there if its GPU is idle) when it would start sooner than in the queue of
    #: the one holding the model (:mod:`jano.scheduler.choice`).
    spread: bool = False
    #: For a replica (one of several instances serving one model, see
    #: :mod:`jano.scheduler.replicas`): the name clients use; ``None``: the
    #: model serves under its own name.
    serves: Optional[str] = None
    #: For the model clients see when replicas serve it: its replicas' names, in
    #: configuration order.  Such a spec is never admitted nor forwarded to
    #: itself (its ``upstream`` is empty); each replica is.
    replicas: tuple[str, ...] = ()

    @property
    def health_url(self) -> str:
        return self.upstream + self.health

    @property
    def managed(self) -> bool:
        """Jano starts and stops this model's server itself."""
        return bool(self.command)

    @property
    def public_name(self) -> str:
        """The name clients use for what this spec serves."""
        return self.serves if self.serves is not None else self.name


def client_models(specs: Sequence[ModelSpec]) -> tuple[ModelSpec, ...]:
    """
    The models clients see, from the configured instances: a model without
    replicas as it is; the replicas of one model as one spec, at the place of
    the first, with their ``replicas`` named, the sum of their
    ``max_concurrency``, their groups joined by ``+`` (no group has that
    name, so nothing mistakes it for one) and no upstream.
    """
    out: list[ModelSpec] = []
    done: set[str] = set()
    for spec in specs:
        served = spec.serves
        if served is None:
            out.append(spec)
            continue
        if served in done:
            continue
        done.add(served)
        reps = [r for r in specs if r.serves == served]
        out.append(ModelSpec(
            name=served, upstream="", kind=spec.kind, health=spec.health,
            max_concurrency=sum(r.max_concurrency for r in reps),
            group="+".join(r.group for r in reps), always_on=all(r.always_on for r in reps),
            ttl=spec.ttl, memory=spec.memory, replicas=tuple(r.name for r in reps)))
    return tuple(out)


UsageSource = Literal["llamacpp-timings", "openai-usage", "ollama"]
TimedBy = Literal["backend", "router"]


class Usage(NamedTuple):
    """
    Token counts and timings for one response, as the backend reported them.

    Every field the backend did not report is ``None``.  ``gen_tok_s`` is
    ``timed_by="backend"`` when the backend gave a duration, ``"router"`` when
    Jano derived it from its own observation of the stream, ``None`` when
    nobody timed it.
    """

    source: UsageSource
    prompt_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    prompt_ms: Optional[float] = None
    generation_ms: Optional[float] = None
    gen_tok_s: Optional[float] = None
    prompt_tok_s: Optional[float] = None
    timed_by: Optional[TimedBy] = None
    #: Time the backend spent loading the model for this request (Ollama's
    #: ``load_duration``); ``None`` when the backend does not report it.
    load_ms: Optional[float] = None


SwapResult = Literal["ok", "failed", "timeout", "not_ready"]


@dataclass(frozen=True, slots=True)
class SwapEvent:
    """
    One swap attempt of one group, reported once it has ended; an unload
    (``kind == "unload"``) is a swap to nothing: ``to_model`` is ``None``.
    """

    group: str
    from_model: Optional[str]
    to_model: Optional[str]
    started_at: float
    duration: float
    result: SwapResult
    #: Human-readable cause when ``result != "ok"``.
    error: Optional[str] = None
    kind: Literal["swap", "unload", "reload"] = "swap"
    #: Why an unload ran: ``"idle"`` (its TTL) or ``"requested"``.
    reason: Optional[str] = None
    #: Seconds per phase, in order: ``stop``/``start``/``ready`` for managed
    #: models, ``script``/``ready`` for the swap script; empty when unknown.
    phases: tuple[tuple[str, float], ...] = ()
    #: Every model this swap unloaded, in the order given to the swapper:
    #: with a memory budget, all the residents evicted for ``to_model``
    #: (``from_model`` is only the first); without one, ``(from_model,)``
    #: when there was a previous model; for an unload, the unloaded model.
    evicted: tuple[str, ...] = ()


Outcome = Literal[
    "completed",  # the upstream body ended cleanly
    "client_disconnected",  # the client went away (queued or mid-stream)
    "upstream_error",  # refused, timed out, died mid-stream
    "upstream_stalled",  # no body byte for stall_timeout mid-stream
    "rejected",  # answered by Jano itself with an error (queue full, swap failed, bad input)
]


class LiveRequest(NamedTuple):
    """A request Jano holds right now, as ``GET /queue`` shows it."""

    id: int
    model: str
    #: ``queued``, ``waiting_headers`` (forwarded, no answer yet) or ``streaming``.
    phase: str
    arrived_at: float
    #: When the scheduler let it go (``None`` while queued).
    dispatched_at: Optional[float]
    #: The named key it came with (``None``: none).
    caller: Optional[str] = None


class UsageRecord(NamedTuple):
    """
    What ``/usage`` shows for one request.  Never any prompt or completion text.

    This and :class:`Usage` are named tuples rather than frozen dataclasses:
    one of each is made per request, and a tuple is several times cheaper
    to build.
    """

    id: int
    model: Optional[str]
    method: str
    path: str
    status: Optional[int]
    stream: bool
    arrived_at: float
    queue_wait: Optional[float]
    waited_for_swap: bool
    ttfb: Optional[float]
    duration: Optional[float]
    usage: Optional[Usage]
    outcome: Outcome
    #: The name of the API key the caller used (``server.api_keys``), else ``None``.
    caller: Optional[str] = None


HealthState = Literal["up", "down", "loading", "unloaded", "unknown", "stalled"]


@dataclass(eq=False)
class Ticket:
    """
    One admitted request: the one mutable record here (the scheduler sets
    ``dispatched_at`` and ``waited_for_swap``; the forward stage reads them).  Hand it back to :meth:`jano.scheduler.Scheduler.release` exactly
    once, when the forwarded request has ended in any way.

    Compared by identity: two requests with equal fields are still two tickets.
    """

    model: str
    arrived_at: float
    dispatched_at: Optional[float] = None
    #: A swap of the model's group ran (or was running) between arrival and dispatch.
    waited_for_swap: bool = False
    #: The instance the request was dispatched to (set by the scheduler): the
    #: model itself, or the replica chosen for it; its upstream gets the request.
    served_by: Optional[ModelSpec] = None
    #: Replicas given up on before this one (their swap failed, they went down).
    failovers: int = 0
    #: When the request was queued again on another replica after the last
    #: failover (``None``: never); ``arrived_at`` stays its arrival at Jano.
    requeued_at: Optional[float] = None

    @property
    def queue_wait(self) -> Optional[float]:
        """Seconds between arrival and dispatch; ``None`` until dispatched."""
        if self.dispatched_at is None:
            return None
        return self.dispatched_at - self.arrived_at


@dataclass(frozen=True, slots=True)
class ModelState:
    """The scheduler's view of one model at one instant."""

    name: str
    group: str
    always_on: bool
    queued: int
    in_flight: int
    #: Arrival time of the oldest queued request, ``None`` when none waits.
    oldest_queued_at: Optional[float]
    #: True while this model is loaded: its group's resident, or one of the residents
    #: of a group with a memory budget (always true for always_on).
    resident: bool
    #: Set after a failed swap: requests fail fast until this time.
    down_until: Optional[float] = None
    #: Cause of the last failed swap, while ``down_until`` is set.
    down_reason: Optional[str] = None
    #: Observed mean seconds a request holds its slot (``None``: none finished yet).
    service_mean: Optional[float] = None
    max_concurrency: int = 4
    #: When this idle resident will be unloaded (its TTL); ``None`` if not idle,
    #: not resident or no TTL.
    unload_at: Optional[float] = None
    #: For a replica: the model it serves (see :attr:`ModelSpec.serves`).
    serves: Optional[str] = None
    #: For a replica: its upstream, without credentials (:func:`public_url`).
    upstream: Optional[str] = None


@dataclass(frozen=True, slots=True)
class GroupState:
    """
    One swap group: which models are loaded and whether a swap (a load) runs.

    A group without a memory budget holds one model: ``resident``, and
    ``residents`` is that one or empty.  A group with a budget holds any set
    of models that fits it: ``residents``, and ``resident`` is the most
    recently loaded of them (so views written for one model still work).
    """

    name: str
    resident: Optional[str]
    #: When the resident model finished loading (``None`` if never seen loading).
    loaded_at: Optional[float]
    swapping_to: Optional[str] = None
    swap_started_at: Optional[float] = None
    #: The resident being unloaded (``swap_started_at`` says since when).
    unloading: Optional[str] = None
    #: When the idle resident will be unloaded (its TTL), ``None`` if not idle or no TTL;
    #: with a budget, the first of the residents' (each has its own, see ``ModelState``).
    unload_at: Optional[float] = None
    #: Observed mean seconds of a swap in this group (``None``: none seen yet).
    swap_mean: Optional[float] = None
    #: Every loaded model, the most recently loaded last.
    residents: tuple[str, ...] = ()
    #: MiB the group's models may use together; ``None``: one model at a time.
    memory_budget: Optional[int] = None
    #: MiB the residents take (their configured ``memory``); ``None`` without a budget.
    memory_used: Optional[int] = None
    #: The residents the running load (``swapping_to``) stops first.
    evicting: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """Everything telemetry reads from the scheduler, taken at ``at``."""

    at: float
    models: tuple[ModelState, ...]
    groups: tuple[GroupState, ...]
    draining: bool = False
    #: When the scheduler last let a request go (``None``: never).
    last_dispatch_at: Optional[float] = None
    #: Each replica on its own (``models`` holds one entry per model clients
    #: see, the replicas of one model added up); empty without replicas.
    replicas: tuple[ModelState, ...] = ()


def public_url(url: str) -> str:
    """``url`` fit to show on ``/status``: scheme, host, port and path; never credentials."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- timestamps: the one place clock seconds become wire formats -------------------------


def iso(t: Optional[float]) -> Optional[str]:
    """Clock seconds as ISO 8601 UTC with milliseconds and a ``Z``, or ``None``."""
    if t is None:
        return None
    from datetime import datetime, timezone

    stamp = datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def ms(seconds: Optional[float]) -> Optional[float]:
    """Seconds to milliseconds, rounded to the microsecond, or ``None``."""
    if seconds is None:
        return None
    return round(seconds * 1000.0, 3)
