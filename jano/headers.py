"""
Header fields as they came over the wire.

:class:`WireHeaders` is a ``twisted.web.http_headers.Headers`` that keeps each
field name the way the sender spelled it (Twisted's re-capitalises every name)
and skips the per-call name encoding Twisted does.  Jano builds one per parsed
request and per upstream response head, so a proxied request hands the
backend, and a response hands the client, the same names it was given.

Lookups are case-insensitive, as HTTP says.  A name set again later keeps its
first spelling.  Values are bytes; any CR or LF in a value set through the API
becomes a space, as Twisted does.
"""

from __future__ import annotations

from typing import AnyStr, Iterator, Mapping, Optional, Sequence, TypeVar, Union, overload

from twisted.web.http_headers import Headers

_T = TypeVar("_T")


def _bytes(s: Union[str, bytes], encoding: str = "latin-1") -> bytes:
    return s.encode(encoding) if isinstance(s, str) else s


def _clean(value: Union[str, bytes]) -> bytes:
    v = value.encode("utf-8") if isinstance(value, str) else value
    if b"\r" in v or b"\n" in v:
        return b" ".join(v.splitlines())
    return v


class WireHeaders(Headers):
    """
    ``Headers`` keyed by the lower-cased name, remembering the first spelling.

    ``_rawHeaders`` maps lower-cased names to their values; ``_names`` maps
    them to the spelling that is written out.
    """

    __slots__ = ("_names",)

    def __init__(self, rawHeaders: Optional[Mapping[AnyStr, Sequence[AnyStr]]] = None) -> None:
        self._rawHeaders: dict[bytes, list[bytes]] = {}
        self._names: dict[bytes, bytes] = {}
        if rawHeaders is not None:
            for name, values in rawHeaders.items():
                self.setRawHeaders(name, values)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[bytes, bytes]]) -> "WireHeaders":
        """From parsed ``(name as sent, value)`` pairs, values already free of CR and LF."""
        h = cls()
        raw = h._rawHeaders
        names = h._names
        for name, value in pairs:
            key = name.lower()
            values = raw.get(key)
            if values is None:
                raw[key] = [value]
                names[key] = name
            else:
                values.append(value)
        return h

    def copy_from(self, other: Headers, drop: frozenset[bytes] = frozenset()) -> None:
        """
        Set every field of ``other`` but those whose lower-cased name is in
        ``drop`` (a faster path when ``other`` is a ``WireHeaders`` too: its
        values are already clean).
        """
        if type(other) is not WireHeaders:
            for name, values in other.getAllRawHeaders():
                if name.lower() not in drop:
                    self.setRawHeaders(name, values)
            return
        raw = self._rawHeaders
        names = self._names
        spelled = other._names
        for key, values in other._rawHeaders.items():
            if key not in drop:
                raw[key] = list(values)
                if key not in names:
                    names[key] = spelled[key]

    def __repr__(self) -> str:
        return f"WireHeaders({dict(self.getAllRawHeaders())!r})"

    def copy(self) -> "WireHeaders":
        h = WireHeaders()
        h._rawHeaders = {k: list(v) for k, v in self._rawHeaders.items()}
        h._names = dict(self._names)
        return h

    def hasHeader(self, name: AnyStr) -> bool:
        return _bytes(name).lower() in self._rawHeaders

    def removeHeader(self, name: AnyStr) -> None:
        key = _bytes(name).lower()
        self._rawHeaders.pop(key, None)
        self._names.pop(key, None)

    def setRawHeaders(self, name: Union[str, bytes], values: Sequence[Union[str, bytes]]) -> None:
        spelled = _bytes(name)
        key = spelled.lower()
        self._rawHeaders[key] = [_clean(v) for v in values]
        self._names.setdefault(key, spelled)

    def addRawHeader(self, name: Union[str, bytes], value: Union[str, bytes]) -> None:
        spelled = _bytes(name)
        key = spelled.lower()
        values = self._rawHeaders.get(key)
        if values is None:
            self._rawHeaders[key] = [_clean(value)]
            self._names[key] = spelled
        else:
            values.append(_clean(value))

    @overload
    def getRawHeaders(self, name: AnyStr) -> Optional[Sequence[AnyStr]]: ...

    @overload
    def getRawHeaders(self, name: AnyStr, default: _T) -> Union[Sequence[AnyStr], _T]: ...

    def getRawHeaders(self, name: AnyStr, default: object = None) -> object:
        if isinstance(name, str):
            found = self._rawHeaders.get(name.encode("latin-1").lower())
            return [v.decode("utf-8") for v in found] if found else default
        return self._rawHeaders.get(name.lower()) or default

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        names = self._names
        for key, values in self._rawHeaders.items():
            yield names[key], values
