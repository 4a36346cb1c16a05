"""The dashboard: static files shipped in the package, served at ``/ui``."""

from __future__ import annotations

from pathlib import Path

from twisted.web.server import Request

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
          ".css": b"text/css; charset=utf-8", ".png": b"image/png", ".svg": b"image/svg+xml"}


def page(request: Request, name: str) -> bytes:
    """One shipped file by name (no paths), or a JSON 404."""
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error":{"message":"not found","type":"not_found_error","code":404}}'
    request.setHeader(b"content-type", _TYPES.get(path.suffix, b"application/octet-stream"))
    request.setHeader(b"cache-control", b"no-cache")
    return path.read_bytes()


def to_page(request: Request) -> bytes:
    """
    ``/ui/`` -> ``/ui``: the page loads its files relative to itself
    (``ui/app.js``), which resolves from ``/ui`` and ``/`` only (relative, so
    a prefix mount works too).
    """
    request.setResponseCode(308)
    request.setHeader(b"location", b"../ui")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"see ../ui\n"
