"""
Stage 1, in: one class-based Klein app serves every route.

Jano's own routes (``/health``, ``/status``, ``/usage``, ``/metrics``, the
model lists, the dashboard) are ordinary Klein routes.  Everything else
reaches :meth:`JanoApp.forward`, a catch-all branch route that routes the
request to a model (:mod:`jano.routing`) and hands it to an
:class:`jano.forward.Exchange`, whose Deferred Klein holds until the last
byte (and cancels if the client leaves first).

The app is also the live state the routes read (models, keys, the
telemetry): a config reload sets these attributes in place.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import NotFound

from jano import __version__
from jano.errors import Refusal, error_body
from jano.forward import Exchange, Forwarder
from jano.interfaces import Lifecycle
from jano.records import ModelSpec, iso
from jano.routing import MODEL_HEADER, route
from jano.telemetry import Telemetry
from jano.telemetry.queue import queue_body
from jano.telemetry.store import UsageStore
from jano.swap.logring import LogRing
from jano.web import dashboard, history, params
from jano.web.lifecycle import model_status, ollama_ps, request_load, request_unload
from jano.web.limits import CallerLimits
from jano.web.logs import LogFollowers, follow_logs, logs_page, parse_tail
from jano.web.site import UNAUTHORIZED, Keys, bearer_ok

#: Paths Jano answers itself: another method on them gets 405, never the backend.
OWN_ROUTES = frozenset({b"/health", b"/status", b"/usage", b"/metrics", b"/ui",
                        b"/v1/models", b"/api/tags", b"/api/ps", b"/queue"})

_BAD_PATH = Refusal(400, "invalid path", "invalid_request_error", "bad_request")
_DRAINING = Refusal(503, "Jano is shutting down", "unavailable_error", "draining")


def local_path(request: Request) -> bytes:
    """
    The raw path below wherever Jano is mounted (it may be ``putChild``-ed
    under a prefix; :class:`Mount` records how deep).
    """
    depth = getattr(request, "jano_depth", 0)
    if not depth:
        return request.path
    return b"/" + b"/".join(request.path.split(b"/")[1 + depth:])


def _target(request: Request, path: bytes) -> bytes:
    """Path and query below the mount point, as received: what the upstream gets."""
    uri = request.uri
    if getattr(request, "jano_depth", 0):
        _, q, query = uri.partition(b"?")
        return path + q + query
    return uri


def _answer(request: Request, answer: Any) -> Any:
    """``(status, body)``, or a Deferred of one, as JSON."""
    if isinstance(answer, Deferred):
        return answer.addCallback(lambda a: _json(request, *a))
    return _json(request, *answer)


def _json(request: Request, status: int, obj: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(request: Request, status: int, message: str, kind: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return error_body(local_path(request), status, message, kind)


class Mount(Resource):
    """
    The resource Jano is: it notes how deep it is mounted, then lets Klein
    route.  (Klein moves path segments between ``prepath`` and ``postpath``
    as it matches; the depth recorded here keeps the raw path recoverable.)
    """

    isLeaf = True

    def __init__(self, app: "JanoApp") -> None:
        super().__init__()
        self.app = app
        self._klein = app.app.resource()

    def render(self, request: Request) -> Any:
        depth = len(request.prepath or ())
        if depth:
            request.jano_depth = depth  # type: ignore[attr-defined]
        return self._klein.render(request)


class JanoApp:
    """
    Jano's routes and the live state they read.

    :param fallback: the loaded model, for requests that name none.
    :param lifecycle: the scheduler, for the model states and the load and
        unload endpoints.
    :param admin_key: the bearer token of the load and unload endpoints
        (``None``: ``api_key``).
    """

    app = Klein()
    app.url_map.merge_slashes = False  # forward "//x" as it came, never redirect it

    def __init__(self, models: tuple[ModelSpec, ...], forwarder: Forwarder,
                 telemetry: Telemetry, fallback: Callable[[], Optional[ModelSpec]], *,
                 lifecycle: Lifecycle, clock: IReactorTime, keys: Optional[Keys] = None,
                 store: Optional[UsageStore] = None,
                 admin_key: Optional[str] = None,
                 telemetry_key: Optional[str] = None, started_at: float = 0.0,
                 usage_ring: int = 1000, thrash_swaps_per_hour: int = 20) -> None:
        self.forwarder = forwarder
        self.telemetry = telemetry
        self.fallback = fallback
        self.clock = clock
        #: The proxy routes' keys (and the model lists').
        self.keys = keys if keys is not None else Keys()
        #: Per-caller limits, checked before a request is queued.
        self.limits = CallerLimits({}, forwarder.queued_by)
        self.admin_key = admin_key
        self.lifecycle = lifecycle
        self.store = store
        self.telemetry_key = telemetry_key
        self.started_at = started_at
        self.usage_ring = usage_ring
        self.thrash_swaps_per_hour = thrash_swaps_per_hour
        self.draining = False
        #: A managed model's log ring, by name (``None``: Jano does not run it).
        self.logs_of: Callable[[str], Optional[LogRing]] = lambda name: None
        #: The open ``/logs/...?follow=1`` responses, ended when Jano stops.
        self.log_followers = LogFollowers()
        self.set_models(models)

    def set_models(self, models: tuple[ModelSpec, ...]) -> None:
        self.models = models
        self.by_name = {m.name: m for m in models}

    def resource(self) -> IResource:
        return Mount(self)

    def _denied(self, request: Request, key: Optional[str]) -> Optional[bytes]:
        if bearer_ok(request.requestHeaders, key):
            return None
        return self._unauthorized(request)

    def _denied_keys(self, request: Request) -> Optional[bytes]:
        if self.keys.caller(request.requestHeaders)[0]:
            return None
        return self._unauthorized(request)

    def _unauthorized(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="jano"')
        return _error(request, 401, "missing or wrong bearer token", "authentication_error")

    # --- Jano's own routes --------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok", "version": __version__,
                                    "draining": self.draining})

    @app.route("/status", methods=["GET", "HEAD"])
    def status(self, request: Request) -> bytes:
        denied = self._denied(request, self.telemetry_key)
        if denied:
            return denied
        body = self.telemetry.status()
        body["thrashSwapsPerHour"] = self.thrash_swaps_per_hour
        return _json(request, 200, body)

    @app.route("/usage", methods=["GET", "HEAD"])
    def usage(self, request: Request) -> Any:
        denied = self._denied(request, self.telemetry_key)
        if denied:
            return denied
        args = request.args or {}
        if self.store is not None and any(name in args for name in history.HISTORY_PARAMS):
            return _answer(request, history.usage_page(self.store, args))
        ring = self.usage_ring
        raw = (request.args or {}).get(b"limit", [b"50"])
        try:
            if len(raw) != 1:
                raise ValueError
            limit = int(raw[0].decode("ascii"), 10)
            if not 1 <= limit <= ring:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            return _json(request, 400, {"error": {
                "message": f"limit must be a single whole number from 1 to {ring}",
                "type": "invalid_request_error", "code": 400}})
        return _json(request, 200, {"data": self.telemetry.usage(limit), "limit": limit})

    @app.route("/queue", methods=["GET", "HEAD"])
    def queue(self, request: Request) -> bytes:
        denied = self._denied(request, self.telemetry_key)
        if denied:
            return denied
        return _json(request, 200, queue_body(self.forwarder.live_requests(),
                                              self.lifecycle.snapshot(), self.clock.seconds()))

    @app.route("/usage/summary", methods=["GET", "HEAD"])
    def usage_summary(self, request: Request) -> Any:
        denied = self._denied(request, self.telemetry_key)
        return denied or _answer(request, history.usage_summary(self.store, request.args or {},
                                                                self.clock.seconds()))

    @app.route("/usage/series", methods=["GET", "HEAD"])
    def usage_series(self, request: Request) -> Any:
        denied = self._denied(request, self.telemetry_key)
        return denied or _answer(request, history.usage_series(self.store, request.args or {},
                                                               self.clock.seconds()))

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: Request) -> bytes:
        denied = self._denied(request, self.telemetry_key)
        if denied:
            return denied
        accept = request.getHeader(b"accept")
        ctype, body = self.telemetry.metrics(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", ctype.encode())
        return body

    @app.route("/logs/<path:name>", methods=["GET", "HEAD"])
    def logs(self, request: Request, name: str) -> Any:
        denied = self._denied(request, self.telemetry_key)
        if denied:
            return denied
        ring = self.logs_of(name)
        spec = self.by_name.get(name)
        if ring is None and spec is not None and spec.replicas:
            return _error(request, 404, f"{name!r} is served by replicas, each with its own "
                          "log: " + ", ".join(f"/logs/{r}" for r in spec.replicas),
                          "not_found_error")
        if ring is None:
            return _error(request, 404, f"no log for {name!r}: only the servers Jano runs "
                          "(models with a command) have one", "not_found_error")
        try:
            tail = parse_tail(request)
            follow = params.choice(request.args or {}, "follow", ("0", "1"))
        except params.BadParameter as e:
            return _error(request, 400, str(e), "invalid_request_error")
        if follow == "1":
            return follow_logs(request, ring, self.clock, tail=100 if tail is None else tail,
                               followers=self.log_followers,
                               stall_timeout=self.forwarder.idle_write_timeout)
        return logs_page(request, ring, tail)

    @app.route("/v1/models", methods=["GET", "HEAD"])
    def openai_models(self, request: Request) -> bytes:
        denied = self._denied_keys(request)
        if denied:
            return denied
        created = int(self.started_at)
        snap = self.lifecycle.snapshot()
        return _json(request, 200, {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "jano",
             "status": {"value": model_status(m, snap)}}  # llama-server router mode's field
            for m in self.models]})

    @app.route("/api/tags", methods=["GET", "HEAD"])
    def ollama_tags(self, request: Request) -> bytes:
        denied = self._denied_keys(request)
        if denied:
            return denied
        when = iso(self.started_at)
        return _json(request, 200, {"models": [
            {"name": m.name, "model": m.name, "modified_at": when} for m in self.models]})

    @app.route("/api/ps", methods=["GET", "HEAD"])
    def ollama_ps(self, request: Request) -> bytes:
        denied = self._denied_keys(request)
        if denied:
            return denied
        return _json(request, 200, ollama_ps(self.models, self.lifecycle.snapshot()))

    # --- load and unload on request -----------------------------------------------------

    @app.route("/models/<path:name>/load", methods=["POST"])
    def load_model(self, request: Request, name: str) -> bytes:
        return self._lifecycle(request, name, request_load)

    @app.route("/models/<path:name>/unload", methods=["POST"])
    def unload_model(self, request: Request, name: str) -> bytes:
        return self._lifecycle(request, name, request_unload)

    def _lifecycle(self, request: Request, name: str,
                   act: Callable[[Lifecycle, ModelSpec], tuple[int, dict[str, object]]]) -> bytes:
        denied = (self._denied(request, self.admin_key) if self.admin_key is not None
                  else self._denied_keys(request))
        if denied:
            return denied
        spec = self.by_name.get(name)
        if spec is None:
            return _error(request, 404, f"model {name!r} not found", "not_found_error")
        if self.draining:
            request.setHeader(b"retry-after", b"5")
            return _error(request, 503, "Jano is shutting down", "unavailable_error")
        status, body = act(self.lifecycle, spec)
        return _json(request, status, body)

    # --- the dashboard: the page is public, its data routes are guarded -------------------

    @app.route("/ui", methods=["GET", "HEAD"])
    def dashboard_page(self, request: Request) -> bytes:
        return dashboard.page(request, "index.html")

    @app.route("/ui/", methods=["GET", "HEAD"])
    def dashboard_slash(self, request: Request) -> bytes:
        return dashboard.to_page(request)

    @app.route("/ui/<name>", methods=["GET", "HEAD"])
    def dashboard_asset(self, request: Request, name: str) -> bytes:
        return dashboard.page(request, name)

    # --- everything else goes to a model ------------------------------------------------

    @app.route("/", branch=True)
    def forward(self, request: Request) -> Any:
        path = local_path(request)
        method = request.method
        if path == b"/" and method in (b"GET", b"HEAD") and b"text/html" in (
                request.getHeader(b"accept") or b""):
            return dashboard.page(request, "index.html")  # a browser at Jano's root
        if path in OWN_ROUTES or path.startswith(b"/ui/"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _error(request, 405, "method not allowed; use GET, HEAD",
                          "invalid_request_error")
        if path.startswith(b"/models/") and path.endswith((b"/load", b"/unload")):
            request.setHeader(b"allow", b"POST")
            return _error(request, 405, "method not allowed; use POST", "invalid_request_error")
        fwd = self.forwarder
        arrived = fwd.clock.seconds()
        allowed, caller = self.keys.caller(request.requestHeaders)
        if not allowed:
            request.setHeader(b"www-authenticate", b'Bearer realm="jano"')
            fwd.refuse(request, path, UNAUTHORIZED, arrived)
            return None
        decoded = unquote_to_bytes(path)  # what the backend will see once it decodes
        if b"\x00" in decoded or b".." in decoded.split(b"/"):
            fwd.refuse(request, path, _BAD_PATH, arrived)
            return None
        body = b""
        content = request.content
        if content is not None:
            content.seek(0)
            body = content.read()
        decision = route(method, path, body, request.getHeader(MODEL_HEADER),
                         self.by_name, self.fallback)
        if isinstance(decision, Refusal):
            fwd.refuse(request, path, decision, arrived)
            return None
        if self.draining:
            fwd.refuse(request, path, _DRAINING, arrived, decision.spec.name, retry_after=5.0,
                       caller=caller)
            return None
        over = self.limits.check(caller, arrived) if decision.admit else None
        if over is not None:
            fwd.refuse(request, path, over[0], arrived, decision.spec.name, retry_after=over[1],
                       caller=caller)
            return None
        return Exchange(self.forwarder, request, decision.spec, body, decision.admit,
                        decision.stream_hint, arrived, path, _target(request, path),
                        caller).start()

    @app.handle_errors(NotFound)  # type: ignore[arg-type]
    def not_routed(self, request: Request, failure: Any) -> Any:
        # Paths werkzeug's converters cannot match (an empty segment first, say)
        # are still the backend's business.
        return self.forward(request)
