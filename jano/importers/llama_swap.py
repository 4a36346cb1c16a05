"""
``python -m jano.importers.llama_swap config.yaml > jano.toml``: a llama-swap
config in, the equivalent Jano TOML out, and on stderr one line for every
setting that could not be carried over, and why.  Exit status 2 when the
YAML cannot be read or makes no sense as a llama-swap config.

The mapping:

- ``models.<id>`` -> one ``[[models]]`` named ``<id>``, in the file's order.
- ``cmd`` -> ``command``: comment lines dropped, lines ending in ``\\``
  joined, macros expanded, then split into words as a POSIX shell would
  (``shlex``), which is what llama-swap does.  llama-swap runs the words
  without a shell, and so does Jano, so the command is *not* wrapped in
  ``sh -c``: a ``|`` or ``$HOME`` stays a literal argument in both (a note
  points it out), and wrapping would break a quoted ``$`` in a regex.
- ``${PORT}`` -> ``{port}`` and ``${MODEL_ID}`` -> ``{model}`` in
  ``command`` (elsewhere ``${MODEL_ID}`` becomes the id itself).  Global and
  model ``macros`` (the model's win) are expanded, also inside each other;
  an unknown macro or a loop is an error.  ``${env.NAME}`` is replaced by
  its value now, as llama-swap does when it loads its config (a note names
  each); an unset one is an error.
- ``proxy`` -> nothing when it is local and uses ``${PORT}`` (the default
  ``http://localhost:${PORT}`` included: Jano's default upstream is
  ``http://127.0.0.1:{port}``); a local fixed port -> ``port``; any other
  URL -> ``upstream`` as given, plus ``port``.  Two models on one fixed port
  (fine in llama-swap, which runs one at a time) get ``{port}`` in place of
  the later one's ``--port N``, or an error when there is none.
- ``checkEndpoint`` -> ``health``; ``none`` keeps the default with a note
  (Jano always waits for health).  ``ttl`` -> ``ttl`` (``-1``: unset, so
  ``globalTTL`` -> ``scheduler.ttl`` applies); ``concurrencyLimit`` ->
  ``max_concurrency`` (0, llama-swap's 10, leaves Jano's default of 4);
  ``env`` ``NAME=value`` list -> table;
  ``unloadTimeout`` (the model's, else the global one) -> ``stop_timeout``.
- Groups: models in no group -> Jano group ``default``, one at a time like
  llama-swap's own default group.  ``swap: true`` -> one Jano group of that
  name; ``swap: false`` -> each member alone in group ``<group>-<model>``,
  so all may be loaded at once (Jano does not know they share a GPU); a
  name already taken gets ``-2``, ``-3``...
  ``exclusive`` has no counterpart: Jano's groups never unload each other (a
  note when there are several).  ``persistent`` therefore holds by itself;
  its members are not made ``always_on``, which would also load them at
  start-up and exempt them from ``ttl``.  ``matrix`` -> a note, every model
  in ``default``.
- ``hooks.on_startup.preload`` -> ``scheduler.preload`` (aliases resolved);
  of several in one Jano group the last is kept, as it is the one llama-swap
  leaves loaded; the others become notes.
- ``startPort`` (default 5800) -> ``processes.port_range = [startPort,
  startPort + 199]``; ``healthCheckTimeout`` (at least 15, default 120) ->
  ``scheduler.ready_timeout``.
- Everything else set to something (aliases, unlisted, name, description,
  filters, useModelName, cmdStop, apiKeys, peers, logging, ...) -> a note.
  API keys are never copied, so no secret lands in the TOML.

One model's conversion is :mod:`~jano.importers.llama_swap_model`; macros
and ``cmd`` splitting :mod:`~jano.importers.llama_swap_cmd`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from jano.importers.llama_swap_cmd import LlamaSwapError, macro_table
from jano.importers.llama_swap_model import (MODEL_WHY, ModelConverter, flag, free_fixed_ports,
                                             is_set, number)
from jano.importers.toml_out import Value, dumps

__all__ = ["LlamaSwapError", "convert", "load_yaml", "main"]

PREFIX = "jano.importers.llama_swap: "
_TOP_DONE = ("models", "macros", "groups", "routing", "matrix", "hooks", "startPort",
             "healthCheckTimeout", "globalTTL", "unloadTimeout", "apiKeys", "peers")
_LOGS = "Jano logs through twistd (--logfile, --syslog)"
_TOP_WHY = {
    "logLevel": _LOGS, "logTimeFormat": _LOGS, "logRequests": _LOGS,
    "logToStdout": "Jano keeps each server's output in memory ([processes] log_bytes)",
    "metricsMaxInMemory": "Jano keeps usage in [telemetry] usage_ring and database",
    "store": "Jano keeps usage in [telemetry] database",
    "captureBuffer": "Jano does not capture request and response bodies",
    "sendLoadingState": MODEL_WHY["sendLoadingState"],
    "includeAliasesInList": "Jano has no model aliases",
    "profiles": "Jano routes by model name only", "selectors": "Jano routes by model name only",
    "ui": "Jano has its own dashboard", "performance": "Jano has its own dashboard and metrics",
    "upstream": "Jano has no /upstream passthrough", "tailcat": "Jano has no Tailcat listener",
}


def _unused(name: str, taken: set[str]) -> str:
    suffix = 1
    while (found := name if suffix == 1 else f"{name}-{suffix}") in taken:
        suffix += 1
    return found


class _Converter(ModelConverter):
    """The whole config: models, then groups, preloads and the top-level keys."""

    def groups(self, ids: Sequence[str]) -> dict[str, str]:
        """Each model's Jano group."""
        raw, where = self.doc.get("groups"), "groups"
        routing = self.doc.get("routing")
        if isinstance(routing, dict):
            router = routing.get("router") or {}
            settings = (router.get("settings") or {}) if isinstance(router, dict) else {}
            if isinstance(settings, dict) and "groups" in settings:
                raw, where = settings["groups"], "routing.router.settings.groups"
            for key in routing:
                if key != "router":
                    self.note(f"routing.{key}", "not carried over: Jano orders its queues "
                              "itself, to swap as rarely as it can")
            matrix = (isinstance(router, dict) and router.get("use") == "matrix"
                      or isinstance(settings, dict) and is_set(settings.get("matrix")))
        else:
            matrix = False
        if matrix or is_set(self.doc.get("matrix")):
            self.note("matrix", "not carried over: Jano has no swap matrix; every model not in "
                      "a group is in group default, one loaded at a time; split them into "
                      "groups (one per GPU) by hand")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise LlamaSwapError(f"{where}: expected a mapping of group names to groups")
        assigned: dict[str, str] = {}
        names = {str(gid) for gid in raw}  # Jano group names in use
        exclusive: list[tuple[str, str]] = []
        for gid, group in raw.items():
            path = f"{where}.{gid}"
            if not isinstance(group, dict):
                raise LlamaSwapError(f"{path}: expected a mapping (swap, exclusive, members)")
            members = group.get("members", [])
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise LlamaSwapError(f"{path}.members: expected a list of model ids")
            swap = flag(group, "swap", path, True)
            for key in group:
                if key not in ("members", "swap", "exclusive", "persistent"):
                    self.note(f"{path}.{key}", "not a llama-swap group setting; ignored")
            known = [m for m in members if m in ids]
            for m in members:
                if m not in ids:
                    self.note(f"{path}.members", f"{m} is not a model; ignored")
                elif m in assigned:
                    raise LlamaSwapError(f"{path}.members: {m} is also in another group")
                elif swap:
                    assigned[m] = str(gid)
                else:
                    assigned[m] = name = _unused(f"{gid}-{m}", names)
                    names.add(name)
            if not swap and known:
                self.note(f"{path}.swap", f"false: each member has a Jano group of its own "
                          f"({', '.join(assigned[m] for m in known)}), so all may be loaded at "
                          "once; to budget one GPU instead, put them in one group with "
                          "[groups.<name>] memory and each model's memory")
            if flag(group, "exclusive", path, True) and known:
                exclusive.append((f"{path}.exclusive", "not carried over: in llama-swap "
                                  "loading one of its models unloads every other group"))
            if flag(group, "persistent", path, False):
                self.note(f"{path}.persistent", "holds by itself: Jano never unloads a model "
                          "to load another group's; members are not made always_on (that "
                          "would load them at start-up and ignore ttl)")
        default = "default" if "default" not in names else _unused("ungrouped", names)
        groups = {mid: assigned.get(mid, default) for mid in ids}
        if len(set(groups.values())) > 1:
            if len(assigned) < len(ids):
                exclusive.append((where, f"models in no group are in Jano group {default}; "
                                  "in llama-swap loading one of them unloads every group"))
            for path, text in exclusive:
                self.note(path, f"{text}; Jano's groups (one per GPU) never unload each other")
        return groups

    def preload(self, groups: Mapping[str, str]) -> list[str]:
        hooks = self.doc.get("hooks") or {}
        if not isinstance(hooks, dict) or not isinstance(hooks.get("on_startup") or {}, dict):
            raise LlamaSwapError("hooks: expected a mapping with on_startup: {preload: [...]}")
        startup = hooks.get("on_startup") or {}
        for key in hooks:
            if key != "on_startup":
                self.note(f"hooks.{key}", "not carried over: Jano has only on_startup preload")
        for key in startup:
            if key != "preload" and is_set(startup[key]):
                self.note(f"hooks.on_startup.{key}", "not carried over: " + (
                    "Jano has no profiles" if key == "profile" else "Jano has only preload"))
        names = startup.get("preload") or []
        if not isinstance(names, list):
            raise LlamaSwapError("hooks.on_startup.preload: expected a list of model ids")
        chosen: dict[str, str] = {}
        for name in (str(n).strip() for n in names):
            real = name if name in groups else self.aliases.get(name)
            if real is None:
                if name:
                    self.note("hooks.on_startup.preload", f"{name} is not a model; ignored")
                continue
            earlier = chosen.pop(groups[real], None)
            if earlier is not None and earlier != real:
                self.note("hooks.on_startup.preload", f"{earlier} not preloaded: {real} shares "
                          f"its Jano group {groups[real]} and is loaded after it (llama-swap "
                          "would load it, then swap it out)")
            chosen[groups[real]] = real
        return list(chosen.values())

    def top_level_notes(self) -> None:
        keys = self.doc.get("apiKeys")
        if is_set(keys):
            count = len(keys) if isinstance(keys, list) else 1
            self.note("apiKeys", f"not carried over: {count} key(s), not copied so that no "
                      "secret lands in this file; add [[server.api_keys]] (name, and key or "
                      "key_file) yourself")
        peers = self.doc.get("peers")
        for peer, conf in (peers.items() if isinstance(peers, dict) else ()):
            url = conf.get("proxy", "?") if isinstance(conf, dict) else "?"
            self.note(f"peers.{peer}", f"not carried over: Jano has no peers; each of its "
                      f"models could be a [[models]] with upstream = \"{url}\" and no command "
                      "(its apiKey would not be sent)")
        for key, value in self.doc.items():
            if key not in _TOP_DONE and is_set(value):
                why = _TOP_WHY.get(key, "not a llama-swap setting this importer knows")
                self.note(str(key), f"not carried over: {why}")


def convert(doc: object, source: str, env: Mapping[str, str] = os.environ) -> tuple[str, list[str]]:
    """
    A parsed llama-swap config in, ``(toml_text, notes)`` out.

    :raises LlamaSwapError: when it cannot be converted.
    """
    if not isinstance(doc, dict):
        raise LlamaSwapError("expected a mapping at the top level (a llama-swap config)")
    raw_models = doc.get("models")
    if not isinstance(raw_models, dict) or not raw_models:
        raise LlamaSwapError("models: expected a mapping of model ids to their settings")
    conv = _Converter(doc, env)
    macros = macro_table(doc.get("macros"), "macros")
    models = [conv.model(str(mid), raw, macros) for mid, raw in raw_models.items()]
    free_fixed_ports(models, conv.notes)
    groups = conv.groups([str(m["name"]) for m in models])
    for m in models:
        if groups[str(m["name"])] != "default":
            m["group"] = groups[str(m["name"])]
            # Keep the keys in the order the docs list them.
            for key in ("ttl", "env", "stop_timeout"):
                if key in m:
                    m[key] = m.pop(key)
    preload = conv.preload(groups)
    conv.top_level_notes()
    start = int(number(doc, "startPort", "", 5800, 1))
    if start < 1024:
        conv.note("startPort", f"{start} is below 1024, which Jano does not allocate; "
                  "port_range starts at 1024")
        start = 1024
    if start > 65535:
        raise LlamaSwapError(f"startPort: {start} is not a port")
    scheduler: dict[str, Value] = {
        "ready_timeout": max(15.0, number(doc, "healthCheckTimeout", "", 120, 0))}
    if "globalTTL" in doc:
        scheduler["ttl"] = number(doc, "globalTTL", "", 0, 0)
    if preload:
        scheduler["preload"] = preload
    tables: list[tuple[str, Mapping[str, Value]]] = [
        ("[processes]", {"port_range": [start, min(start + 199, 65535)]}),
        ("[scheduler]", scheduler)]
    tables += [("[[models]]", m) for m in models]
    comments = [f"Generated from {source} by jano.importers.llama_swap.",
                "What could not be carried over was listed on stderr when it ran."]
    return dumps(comments, tables), conv.notes


def load_yaml(text: str) -> object:
    """YAML as llama-swap's Go parser reads it: only true and false are booleans."""
    import yaml

    loader: Any = type("Loader", (yaml.SafeLoader,), {})
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                 re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    try:
        result: object = yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise LlamaSwapError(f"invalid YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise LlamaSwapError(f"invalid YAML: {' '.join(str(e).split())}") from None
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jano.importers.llama_swap",
        description="Convert a llama-swap YAML config to Jano's TOML (on stdout); what "
                    "cannot be carried over is listed on stderr.")
    parser.add_argument("config", help="llama-swap config.yaml (- for stdin)")
    args = parser.parse_args(argv)
    try:
        import yaml  # noqa: F401
    except ImportError:
        print(f"{PREFIX}PyYAML is not installed: pip install 'jano[import]'", file=sys.stderr)
        return 2
    source = "<stdin>" if args.config == "-" else args.config
    try:
        try:
            data = sys.stdin.buffer.read() if args.config == "-" else Path(args.config).read_bytes()
            text = data.decode("utf-8")
        except OSError as e:
            raise LlamaSwapError(f"cannot read it: {e.strerror}") from None
        except UnicodeDecodeError:
            raise LlamaSwapError("not UTF-8 text") from None
        toml_text, notes = convert(load_yaml(text), source)
        from jano.config import ConfigError, parse_config

        try:
            parse_config(tomllib.loads(toml_text))
        except ConfigError as e:
            raise LlamaSwapError(f"the converted config would not load in Jano: {e}") from None
    except LlamaSwapError as e:
        print(f"{PREFIX}{source}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(toml_text)
    for line in notes:
        print(PREFIX + line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
