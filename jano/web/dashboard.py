"""The dashboard: static files shipped in the package, served at ``/ui``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.web.server import Request

if TYPE_CHECKING:
    from klein import Klein

    from jano.api import Jano

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
          ".css": b"text/css; charset=utf-8", ".png": b"image/png", ".svg": b"image/svg+xml"}


def _file(request: Request, name: str) -> bytes:
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error":{"message":"not found","type":"not_found_error","code":404}}'
    request.setHeader(b"content-type", _TYPES.get(path.suffix, b"application/octet-stream"))
    request.setHeader(b"cache-control", b"no-cache")
    return path.read_bytes()


def install(app: "Klein", jano: "Jano", guard: Callable[[Request, Optional[str]], Any]) -> None:
    """Add the dashboard routes.  The page itself is public; its data routes are guarded."""

    @app.route("/", methods=["GET", "HEAD"])
    @app.route("/ui", methods=["GET", "HEAD"])
    def index(request: Request) -> bytes:
        return _file(request, "index.html")

    @app.route("/ui/", methods=["GET", "HEAD"])
    def index_slash(request: Request) -> bytes:
        # The page loads its files relative to itself ("ui/app.js"), which
        # resolves from /ui and / only: send /ui/ to /ui (relative, so a prefix
        # mount works too).
        request.setResponseCode(308)
        request.setHeader(b"location", b"../ui")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"see ../ui\n"

    @app.route("/ui/<name>", methods=["GET", "HEAD"])
    def asset(request: Request, name: str) -> bytes:
        return _file(request, name)
