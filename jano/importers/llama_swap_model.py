"""
One llama-swap model (``models.<id>``) as one Jano ``[[models]]`` table; the
mapping is described in :mod:`jano.importers.llama_swap`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast
from urllib.parse import urlsplit

from jano.importers.llama_swap_cmd import (PORT, MODEL, Expander, LlamaSwapError, macro_table,
                                           shell_features, split_command, strip_comments)
from jano.importers.toml_out import Value

__all__ = ["ModelConverter", "free_fixed_ports", "is_set", "number", "flag"]

DEFAULT_PROXY = "http://localhost:${PORT}"
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
_MODEL_DONE = ("cmd", "proxy", "checkEndpoint", "ttl", "env", "concurrencyLimit", "macros",
               "unloadTimeout", "aliases")
MODEL_WHY = {
    "cmdStop": "Jano stops a server with SIGTERM to its process group, then SIGKILL after "
               "stop_timeout",
    "unlisted": "Jano lists every model",
    "name": "Jano has no display names",
    "description": "Jano has no model descriptions",
    "useModelName": "Jano forwards the request body unchanged, model name included",
    "filters": "Jano forwards the request body unchanged (no stripParams or setParams)",
    "metadata": "Jano has no per-model metadata",
    "capabilities": "Jano has no per-model capabilities",
    "sendLoadingState": "Jano does not write loading messages into responses",
    "timeouts": "Jano's timeouts are server-wide ([server] upstream_timeout, idle_timeout)",
    "compat": "Jano has no per-model compatibility switches",
}


def is_set(value: object) -> bool:
    return value not in (None, False, "", [], {})


def number(raw: Mapping[str, Any], key: str, where: str, default: float,
            minimum: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        where = f"{where}.{key}" if where else key
        raise LlamaSwapError(f"{where}: expected a number of at least {minimum:g}, "
                             f"got {value!r}")
    return float(value)


def flag(raw: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = raw.get(key, default)
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    if isinstance(value, str) and value.lower() in words:  # YAML 1.1 words, as Go reads them
        return words[value.lower()]
    if not isinstance(value, bool):
        raise LlamaSwapError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


class ModelConverter:
    """Converts models, collecting notes and the aliases (for ``preload``) on the way."""

    def __init__(self, doc: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.notes: list[str] = []
        self.aliases: dict[str, str] = {}

    def note(self, where: str, text: str) -> None:
        self.notes.append(f"{where}: {text}")

    def model(self, mid: str, raw: object, macros: Mapping[str, str]) -> dict[str, Value]:
        path = f"models.{mid}"
        if not isinstance(raw, dict):
            raise LlamaSwapError(f"{path}: expected a mapping of settings")
        cmd = raw.get("cmd")
        if not isinstance(cmd, str) or not cmd.strip():
            raise LlamaSwapError(f"{path}.cmd: missing (the command that starts the server)")
        env_used: set[str] = set()
        expand = Expander({**macros, **macro_table(raw.get("macros"), f"{path}.macros")},
                          self.env, env_used)
        argv = split_command(expand(strip_comments(cmd), f"{path}.cmd", MODEL), f"{path}.cmd")
        out: dict[str, Value] = {"name": mid, "command": argv}
        odd = shell_features(argv)
        if odd:
            self.note(f"{path}.cmd", f"passed to the program as literal arguments: "
                      f"{' '.join(odd)} (llama-swap runs cmd without a shell, and so does "
                      "Jano); for a shell write sh -c '...'")
        proxy_raw = raw.get("proxy", DEFAULT_PROXY)
        if not isinstance(proxy_raw, str):
            raise LlamaSwapError(f"{path}.proxy: expected a URL, got {proxy_raw!r}")
        proxy = expand(proxy_raw, f"{path}.proxy", mid)
        uses_port = any("{port}" in a for a in argv)
        if PORT in proxy and not uses_port:
            raise LlamaSwapError(f"{path}.proxy: {proxy_raw} uses ${{PORT}} but cmd does not "
                                 "(give proxy the URL the server listens on)")
        out.update(self.upstream(proxy.replace(PORT, "{port}"), f"{path}.proxy"))
        if "port" in out and uses_port:
            self.note(f"{path}.proxy", f"a fixed port, so Jano gives cmd's ${{PORT}} the same "
                      f"port {out['port']} (llama-swap gave it one from startPort)")
        if "{port}" not in str(out.get("upstream", "{port}")):
            self.note(f"{path}.proxy", f"not on this host: Jano runs cmd here, then polls "
                      f"{out['upstream']} for health; it also wants port {out['port']} free "
                      "here before each start")
        check = raw.get("checkEndpoint", "/health")
        if not isinstance(check, str):
            raise LlamaSwapError(f"{path}.checkEndpoint: expected a path or none")
        check = expand(check, f"{path}.checkEndpoint", mid).strip()
        if check == "none":
            self.note(f"{path}.checkEndpoint", "none is not carried over: Jano always waits "
                      "for the server's health, here /health; set health to a path that "
                      "answers 200 once the server is ready")
        elif check.lstrip("/"):
            check = check if check.startswith("/") else "/" + check
            if check != "/health":
                out["health"] = check
        limit = number(raw, "concurrencyLimit", path, 0, 0)
        if limit:
            out["max_concurrency"] = min(max(int(limit), 1), 10_000)
        ttl = raw.get("ttl", -1)
        if ttl != -1:
            out["ttl"] = number(raw, "ttl", path, -1, 0)
        out["env"] = self.environment(raw.get("env"), f"{path}.env", expand, mid)
        stop = number(raw, "unloadTimeout", path, 0, 0) or number(
            self.doc, "unloadTimeout", "", 0, 0) or 10.0
        if stop != 10.0:
            out["stop_timeout"] = stop
        if not out["env"]:
            del out["env"]
        for name in sorted(env_used):
            self.note(path, f"${{env.{name}}} was replaced by its value here and now, not "
                      "when Jano starts the server")
        self.alias(mid, raw.get("aliases"), path)
        for key, value in raw.items():
            if key not in _MODEL_DONE and is_set(value):
                why = MODEL_WHY.get(key, "not a llama-swap setting this importer knows")
                self.note(f"{path}.{key}", f"not carried over: {why}")
        return out

    def upstream(self, url: str, where: str) -> dict[str, Value]:
        parts = urlsplit(url)
        host, _, port_text = parts.netloc.rpartition(":")
        if not host or "]" in port_text:
            host, port_text = parts.netloc, ""
        if parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment:
            raise LlamaSwapError(f"{where}: expected an http:// or https:// base URL, got {url!r}")
        if host == "localhost":
            host = "127.0.0.1"
        if port_text and port_text != "{port}" and not port_text.isdigit():
            raise LlamaSwapError(f"{where}: {port_text!r} is not a port")
        port = int(port_text) if port_text.isdigit() else (443 if parts.scheme == "https" else 80)
        local = host.strip("[]") in _LOCAL_HOSTS
        out: dict[str, Value] = {}
        if local:
            rebuilt = f"{parts.scheme}://{host}:{{port}}{parts.path}".rstrip("/")
            if rebuilt != "http://127.0.0.1:{port}":
                out["upstream"] = rebuilt
        else:
            out["upstream"] = url.rstrip("/")
        if port_text != "{port}":
            out["port"] = port
        return out

    def environment(self, raw: object, where: str, expand: Expander,
                    mid: str) -> dict[str, str]:
        if raw is None:
            return {}
        if not isinstance(raw, list):
            raise LlamaSwapError(f"{where}: expected a list of NAME=value strings")
        table: dict[str, str] = {}
        for i, item in enumerate(raw):
            text = expand(item, f"{where}[{i}]", mid) if isinstance(item, str) else ""
            name, eq, val = text.partition("=")
            if not eq or not name or PORT in text:
                raise LlamaSwapError(f"{where}[{i}]: expected NAME=value without ${{PORT}}, "
                                     f"got {item!r}")
            table[name] = val
        return table

    def alias(self, mid: str, raw: object, path: str) -> None:
        if not is_set(raw):
            return
        if not isinstance(raw, list):
            raise LlamaSwapError(f"{path}.aliases: expected a list")
        names = [str(a.get("id", "")) if isinstance(a, dict) else str(a) for a in raw]
        for name in names:
            self.aliases[name] = mid
        self.note(f"{path}.aliases", f"not carried over: Jano has no model aliases; clients "
                  f"asking for {', '.join(names)} must ask for {mid} instead")


def free_fixed_ports(models: Sequence[dict[str, Value]], notes: list[str]) -> None:
    """Give a later model on an already used fixed port ``{port}`` for its ``--port N``."""
    owners: dict[object, str] = {}
    for m in models:
        port = m.get("port")
        if port is None:
            continue
        if port not in owners:
            owners[port] = str(m["name"])
            continue
        argv = list(cast(list[str], m["command"]))
        local = "{port}" in str(m.get("upstream", "{port}"))
        for i, arg in enumerate(argv if local else ()):
            if arg == "--port" and i + 1 < len(argv) and argv[i + 1] == str(port):
                argv[i + 1] = "{port}"
            elif arg == f"--port={port}":
                argv[i] = "--port={port}"
            else:
                continue
            m["command"] = argv
            del m["port"]
            notes.append(f"models.{m['name']}.proxy: port {port} is also {owners[port]}'s, so "
                         "Jano gives this model a port of its own in place of --port "
                         f"{port}")
            break
        else:
            raise LlamaSwapError(f"models.{m['name']}.proxy: port {port} is also "
                                 f"{owners[port]}'s and cmd has no --port {port} to replace; "
                                 "Jano needs one port per model (use ${PORT} in cmd)")

