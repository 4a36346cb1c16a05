"""
Checks of single values of the TOML document: each failure is a
:class:`~jano.config.records.ConfigError` naming the key path.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from jano.config.records import CallerKey, ConfigError

def type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def check_keys(table: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in table:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(allowed)})")


def get(table: Mapping[str, Any], key: str, path: str, kind: type, default: Any,
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
        raise ConfigError(f"{where}: expected {expected}, got {type_name(value)} {value!r}")
    if check is not None:
        problem = check(value)
        if problem:
            raise ConfigError(f"{where}: {problem}, got {value!r}")
    return value


def positive(value: float) -> Optional[str]:
    return None if value > 0 else "expected a positive number"


def table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table ([{key}]), got {type_name(value)}")
    return value


def header_name(value: str) -> Optional[str]:
    token = "!#$%&'*+-.^_`|~"
    if value and not all(c.isascii() and (c.isalnum() or c in token) for c in value):
        return "expected a header name (letters, digits and -), or \"\" for none"
    return None


def upstream_url(value: str) -> Optional[str]:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL"
    if parts.query or parts.fragment:
        return "expected a base URL without query or fragment"
    return None


def read_key(table: Mapping[str, Any], key: str, path: str, base: Path) -> Optional[str]:
    """A secret given inline (``key``) or in a file (``key_file``)."""
    inline = get(table, key, path, str, None)
    file_ = get(table, key + "_file", path, str, None)
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


def api_keys(raw: Any, base: Path) -> tuple[CallerKey, ...]:
    if not isinstance(raw, list) or not all(isinstance(k, dict) for k in raw):
        raise ConfigError("server.api_keys: expected an array of tables "
                          "([[server.api_keys]] with name and key or key_file)")
    keys: list[CallerKey] = []
    for i, entry in enumerate(raw):
        path = f"server.api_keys[{i}]"
        check_keys(entry, ("name", "key", "key_file", "max_queued", "requests_per_minute"), path)
        name = get(entry, "name", path, str, None,
                    lambda v: None if v and len(v) <= 64 and v.isprintable() else
                    "expected a short printable name")
        if name is None:
            raise ConfigError(f"{path}.name: missing (every key needs a caller name)")
        key = read_key(entry, "key", path, base)
        if key is None:
            raise ConfigError(f"{path}.key: missing (give key or key_file)")
        if any(k.name == name for k in keys):
            raise ConfigError(f"{path}.name: duplicate caller name {name!r}")
        if any(hmac_equal(k.key, key) for k in keys):
            raise ConfigError(f"{path}.key: the same key as another caller's")
        keys.append(CallerKey(
            name=name, key=key,
            max_queued=get(entry, "max_queued", path, int, None,
                            lambda v: None if v >= 1 else "expected at least 1"),
            requests_per_minute=get(entry, "requests_per_minute", path, int, None,
                                     lambda v: None if v >= 1 else "expected at least 1")))
    return tuple(keys)


def hmac_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# --- the parser ---------------------------------------------------------------
