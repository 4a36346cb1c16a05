"""
The web layer: a root resource that sends model traffic straight to the
proxy, and a Klein app for Jano's own routes (``/health``, ``/status``,
``/usage``, ``/metrics``, ``/ui``, and the model lists).

Model traffic skips Klein's routing on purpose: it is the hot path, and one
dictionary lookup decides it.
"""

from __future__ import annotations

import hmac
import json
from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from jano import __version__
from jano.h1 import raw_error
from jano.proxy import Exchange, Forwarder, write_error
from jano.records import ModelSpec
from jano.routing import MODEL_HEADER, Refusal, Routed, error_body, route

if TYPE_CHECKING:
    from jano.telemetry import Telemetry


class JanoRequest(server.Request):
    """
    A request whose body is kept in memory (never in a temporary file: bodies
    hold prompts) and bounded: a body announced or found larger than the
    site's ``max_body_bytes`` is answered 413 at once and the connection
    closed, without reading the rest.
    """

    max_body_bytes = 8 * 1024 * 1024
    _too_large = False
    _received = 0
    _content_type: Optional[Sequence[bytes]] = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Twisted parses every POST's Content-Type with the email package, only to
        # decode HTML form bodies into request.args: about a tenth of Jano's CPU per
        # request.  Jano forwards bodies untouched, so the header is held back while
        # Twisted parses the request line and put back before rendering (process()).
        ctype = self.requestHeaders.getRawHeaders(b"content-type")
        if ctype is not None:
            self._content_type = ctype
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        site = getattr(self.channel, "site", None)
        self.max_body_bytes = getattr(site, "max_body_bytes", self.max_body_bytes)
        limit = self.max_body_bytes
        if length is not None and length > limit:
            self._refuse_too_large()

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._refuse_too_large()
            return
        if self.content is not None:
            self.content.write(data)

    def _refuse_too_large(self) -> None:
        self._too_large = True
        self.content = BytesIO()
        # Called before requestReceived: the path is only known to the channel yet.
        target = getattr(self.channel, "_path", None) or b"/"
        path = target.split(b"?", 1)[0]
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.write(raw_error(
                413, f"request body larger than {self.max_body_bytes} bytes", path))
            channel.loseConnection()

    def process(self) -> None:
        if self._content_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._content_type)
        if self._too_large:
            return
        super().process()


class JanoChannel(http.HTTPChannel):
    """HTTP/1.1 channel that answers an over-long header line with 431 instead of a silent close."""

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(raw_error(
                431, f"a request line or header exceeds {self.MAX_LENGTH} bytes"))
            self.loseConnection()


class JanoSite(server.Site):
    """A ``Site`` using :class:`JanoRequest`, without per-request access logging."""

    requestFactory = JanoRequest
    protocol = JanoChannel  # type: ignore[assignment]  # HTTP/1.1 only: no TLS, so no HTTP/2

    def __init__(self, resource: IResource, *, max_body_bytes: int = 8 * 1024 * 1024,
                 **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.max_body_bytes = max_body_bytes

    def log(self, request: http.Request) -> None:
        """Access logs are off: telemetry keeps what is needed, and no query strings."""


def local_path(request: Request) -> bytes:
    """The path below wherever Jano is mounted (it may be ``putChild``-ed under a prefix)."""
    if not request.prepath:
        return request.path
    return b"/" + b"/".join(request.postpath or [])


def _bearer_ok(request: Request, key: Optional[str]) -> bool:
    if key is None:
        return True
    got = request.getHeader(b"authorization") or b""
    scheme, _, token = got.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


def _json(request: Request, status: int, obj: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj, separators=(",", ":")).encode()


class Jano:
    """
    The live state the web layer reads: models, scheduler, telemetry.

    Replaced pieces (on config reload) are swapped here, so the resources
    never hold stale references.
    """

    def __init__(self, models: tuple[ModelSpec, ...], forwarder: Forwarder,
                 telemetry: "Telemetry", fallback: Callable[[], Optional[ModelSpec]], *,
                 clock: IReactorTime, api_key: Optional[str] = None,
                 telemetry_key: Optional[str] = None, started_at: float = 0.0,
                 usage_ring: int = 1000, thrash_swaps_per_hour: int = 20) -> None:
        self.forwarder = forwarder
        self.telemetry = telemetry
        self.fallback = fallback
        self.clock = clock
        self.api_key = api_key
        self.telemetry_key = telemetry_key
        self.started_at = started_at
        self.usage_ring = usage_ring
        self.thrash_swaps_per_hour = thrash_swaps_per_hour
        self.draining = False
        self.set_models(models)

    def set_models(self, models: tuple[ModelSpec, ...]) -> None:
        self.models = models
        self.by_name = {m.name: m for m in models}


class JanoResource(Resource):
    """The root: Jano's own routes through Klein, everything else proxied."""

    isLeaf = True
    log = Logger()

    def __init__(self, jano: Jano) -> None:
        super().__init__()
        self.jano = jano
        self.api = make_api(jano).resource()

    @staticmethod
    def is_own(method: bytes, path: bytes, accept: Optional[bytes]) -> bool:
        """Whether Jano answers this itself (Klein) rather than forwarding it."""
        return path in OWN_ROUTES or path.startswith(b"/ui/") or (
            path == b"/" and method == b"GET" and b"text/html" in (accept or b""))

    def render(self, request: Request) -> Any:
        path = local_path(request)
        if self.is_own(request.method, path, request.getHeader(b"accept")):
            return self.api.render(request)
        return self.proxy(request, path)

    def proxy(self, request: Request, path: bytes) -> Any:
        jano = self.jano
        fwd = jano.forwarder
        arrived = fwd.clock.seconds()
        if not _bearer_ok(request, jano.api_key):
            request.setHeader(b"www-authenticate", b'Bearer realm="jano"')
            fwd.refuse(request, Refusal(401, "missing or wrong API key", "authentication_error",
                                        "unauthorized"), arrived)
            return NOT_DONE_YET
        if (b".." in path and b".." in path.split(b"/")) or b"\x00" in path or b"%00" in request.uri:
            fwd.refuse(request, Refusal(400, "invalid path", "invalid_request_error",
                                        "bad_request"), arrived)
            return NOT_DONE_YET
        body: Optional[bytes] = getattr(request, "body", None)  # jano.h1.ProxyRequest
        if body is None:
            body = b""
            content = request.content
            if content is not None:
                content.seek(0)
                body = content.read()
        decision = route(request.method, path, body, request.getHeader(MODEL_HEADER),
                         jano.by_name, jano.fallback)
        if isinstance(decision, Refusal):
            fwd.refuse(request, decision, arrived)
            return NOT_DONE_YET
        if jano.draining:
            fwd.refuse(request, Refusal(503, "Jano is shutting down", "unavailable_error",
                                        "draining"), arrived, decision.spec.name,
                       retry_after=5.0)
            return NOT_DONE_YET
        uri = request.uri
        if request.prepath:  # mounted below a prefix: forward only what is below it
            _, q, query = uri.partition(b"?")
            uri = path + q + query
        Exchange(fwd, request, decision.spec, body, decision.admit, decision.stream_hint,
                 arrived, uri).start()
        return NOT_DONE_YET


OWN_ROUTES = frozenset({b"/health", b"/status", b"/usage", b"/metrics", b"/ui",
                        b"/v1/models", b"/api/tags"})


def _iso(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def make_api(jano: Jano) -> Klein:
    """Klein routes for everything Jano answers itself."""
    app = Klein()

    def guard(request: Request, key: Optional[str]) -> Optional[bytes]:
        if _bearer_ok(request, key):
            return None
        request.setHeader(b"www-authenticate", b'Bearer realm="jano"')
        path = local_path(request)
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"application/json")
        return error_body(path, 401, "missing or wrong bearer token", "authentication_error")

    @app.route("/health", methods=["GET", "HEAD"])
    def health(request: Request) -> bytes:
        return _json(request, 200, {"status": "ok", "version": __version__,
                                    "draining": jano.draining})

    @app.route("/status", methods=["GET", "HEAD"])
    def status(request: Request) -> bytes:
        denied = guard(request, jano.telemetry_key)
        if denied:
            return denied
        body = jano.telemetry.status()
        body["thrashSwapsPerHour"] = jano.thrash_swaps_per_hour
        return _json(request, 200, body)

    @app.route("/usage", methods=["GET", "HEAD"])
    def usage(request: Request) -> bytes:
        denied = guard(request, jano.telemetry_key)
        if denied:
            return denied
        ring = jano.usage_ring
        raw = request.args.get(b"limit", [b"50"])
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
        return _json(request, 200, {"data": jano.telemetry.usage(limit), "limit": limit})

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(request: Request) -> bytes:
        denied = guard(request, jano.telemetry_key)
        if denied:
            return denied
        accept = request.getHeader(b"accept")
        ctype, body = jano.telemetry.metrics(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", ctype.encode())
        return body

    @app.route("/v1/models", methods=["GET", "HEAD"])
    def openai_models(request: Request) -> bytes:
        denied = guard(request, jano.api_key)
        if denied:
            return denied
        created = int(jano.started_at)
        return _json(request, 200, {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "jano"}
            for m in jano.models]})

    @app.route("/api/tags", methods=["GET", "HEAD"])
    def ollama_tags(request: Request) -> bytes:
        denied = guard(request, jano.api_key)
        if denied:
            return denied
        when = _iso(jano.started_at)
        return _json(request, 200, {"models": [
            {"name": m.name, "model": m.name, "modified_at": when} for m in jano.models]})

    from jano.web import dashboard as ui

    ui.install(app, jano, guard)

    from werkzeug.exceptions import MethodNotAllowed, NotFound

    @app.handle_errors(MethodNotAllowed)  # type: ignore[arg-type]
    def not_allowed(request: Request, failure: Any) -> bytes:
        allowed = failure.value.valid_methods or ["GET"]
        request.setHeader(b"allow", ", ".join(allowed).encode())
        path = local_path(request)
        request.setResponseCode(405)
        request.setHeader(b"content-type", b"application/json")
        return error_body(path, 405, f"method not allowed; use {', '.join(allowed)}",
                          "invalid_request_error")

    @app.handle_errors(NotFound)  # type: ignore[arg-type]
    def not_found(request: Request, failure: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error_body(local_path(request), 404, "not found", "not_found_error")

    return app
