"""
How the fake model server answers: status line, headers and error bodies in
the shape of the backend it plays (``llamacpp``, ``ollama`` or ``openai``).
"""

from __future__ import annotations

from http import HTTPStatus

from twisted.web.server import Request

import jano.demo.formats as formats
from jano.demo.generation import Flavor

__all__ = ["Replies"]


class Replies:
    """The answers of a fake of one ``flavor``; each returns the body for ``render``."""

    def __init__(self, flavor: Flavor) -> None:
        self.flavor = flavor

    @staticmethod
    def set_status(request: Request, status: int) -> None:
        """Set ``status`` with its standard reason phrase (Twisted lacks some, e.g. 429)."""
        try:
            phrase = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            phrase = None
        request.setResponseCode(status, phrase)

    def headers(self, request: Request, content_type: bytes, sse: bool = False) -> None:
        request.setHeader(b"content-type", content_type)
        if self.flavor == "llamacpp":
            request.setHeader(b"server", b"llama.cpp")
            request.setHeader(b"access-control-allow-origin", b"")
            if sse:
                request.setHeader(b"x-accel-buffering", b"no")

    def json(self, request: Request, status: int, payload: bytes, content_type: bytes) -> bytes:
        self.set_status(request, status)
        self.headers(request, content_type)
        return payload

    def error(self, request: Request, status: int, message: str, *,
              ollama: bool = False) -> bytes:
        payload, content_type = formats.error_body(self.flavor, status, message, ollama=ollama)
        return self.json(request, status, payload, content_type)

    def not_found(self, request: Request) -> bytes:
        return self.error(request, 404, "File Not Found")
