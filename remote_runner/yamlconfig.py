"""Experiments written in YAML: host groups, variables, one component for many hosts.

tmuxp and Ansible users declare sessions and host groups in YAML, and most experiments need no
Python: a server, N clients that differ only by host, a checker. A YAML experiment holds the
same component fields as a Python one, plus three things that replace Python's loops::

    vars:                      # values for {name} in strings; an arg parser's option of the
      port: 5555               # same name (-a/--extra-args) overrides one
    hosts:                     # groups: a host set (see remote_runner.hostsets) or a list
      server: h1
      clients: h[2-3]
    components:
      - name: subscriber-{host}
        on: clients            # one component per host of the group (or a host set)
        executable: pubsub.py
        args: [subscribe, "{server_addr}", "{port}"]
        files: {demo/pubsub.py: pubsub.py}
        start_index: 2
      - name: worker-{index}
        host: server           # a group of one host, or a host name as in Python configs
        count: 4               # four copies; {index} is 1..4

``{host}`` is the component's host and ``{index}`` its 1-based position in its ``on:`` group or
``count``; ``{{`` and ``}}`` are literal braces. A string that is exactly ``"{var}"`` keeps the
variable's type (so ``start_index: "{index}"`` is a number).

The file is read with PyYAML's safe loader only (no Python objects, no tags that run code),
extended to remember the line of every key and to refuse duplicate keys, which plain YAML
silently overwrites. Every error names the YAML file, the line and the field. The result is an
ordinary :class:`~remote_runner.config.Config`, so muddlers, arg parsers and validation work on
YAML experiments exactly as on Python ones, and validation errors point at YAML lines.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Dict, List, Optional, Tuple

import yaml

from remote_runner import hostsets
from remote_runner.config import (LEGAL_FIELDS, Config, Origin, component_at, set_field_at)
from remote_runner.errors import ConfigError

TOP_KEYS = ("vars", "hosts", "components")
EXPANSION_KEYS = ("on", "count")
#: The largest YAML experiment read (its lines are kept for messages, which costs).
MAX_YAML_BYTES = 4 << 20
#: Fields whose value is a mapping (anywhere else, ``{name}`` unquoted is a mistake).
MAPPING_FIELDS = ("files", "env")
_VAR = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _unquoted_variable(value: Any) -> str:
    """The name in ``{name}`` written without quotes (YAML reads a mapping ``{name: null}``)."""
    if isinstance(value, dict) and len(value) == 1:
        (name, empty), = value.items()
        if empty is None and isinstance(name, str) and _VAR.fullmatch("{" + name + "}"):
            return name
    return ""


class LineMap(dict):
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    lines: Dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    """The safe loader, plus key lines and a refusal of duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineMap:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, "expected a mapping",
                                                    node.start_mark)
        own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
        self.flatten_mapping(node)  # (`<<: *base`: the merged pairs come first, then our own)
        merged = len(node.value) - own
        result = LineMap()
        result.line = node.start_mark.line + 1
        result.lines = {}
        written: set = set()  # keys this mapping wrote itself: only those may not repeat
        for at, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, bool) and isinstance(key_node, yaml.ScalarNode):
                key = key_node.value  # YAML 1.1 reads the key `on:` (and yes/no/off) as a bool
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found an unhashable key", key_node.start_mark) from None
            if at >= merged:
                if key in written:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {result.lines[key]})",
                        key_node.start_mark)
                written.add(key)  # (it overrides a merged one of that name, as YAML says)
            result[key] = self.construct_object(value_node, deep=deep)
            result.lines[key] = key_node.start_mark.line + 1
        return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            _LineLoader.construct_mapping)


def read_yaml(path: str) -> Any:
    """Parse *path* safely, reporting syntax errors at their line."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the YAML experiment: {exc.strerror}", file=path) from None
    if len(text) > MAX_YAML_BYTES:  # (a data file given to -c by mistake: minutes to parse)
        raise ConfigError(f"more than {MAX_YAML_BYTES >> 20} MiB: not an experiment file "
                          "(is -c given a data file?)", file=path)
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"YAML error: {problem}", file=path,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", file=path) from None


class _Reader:
    """Turns the parsed document into Components, with errors at YAML lines."""

    def __init__(self, path: str, document: Any, extra_options: Any,
                 inventory: Optional[Dict[str, List[str]]] = None) -> None:
        self.inventory = dict(inventory or {})
        self.path = path
        self.doc = document
        self.extra = extra_options

    def fail(self, message: str, line: Optional[int], component: Optional[str] = None,
             field: Optional[str] = None) -> ConfigError:
        return ConfigError(message, file=self.path, line=line, component=component, field=field)

    # -- top level -----------------------------------------------------------

    def config(self) -> Config:
        doc = self.doc
        if not isinstance(doc, LineMap):
            raise self.fail("a YAML experiment is a mapping with 'components' "
                            "(and optionally 'vars' and 'hosts')", 1)
        for key in doc:
            if key not in TOP_KEYS:
                raise self.fail(f"unknown top-level key {key!r}{_hint(key, TOP_KEYS)}; "
                                f"expected {', '.join(TOP_KEYS)}", doc.lines[key], field=str(key))
        variables = self.variables(doc.get("vars"), doc.lines.get("vars"))
        groups = self.groups(doc.get("hosts"), doc.lines.get("hosts"), variables)
        items = doc.get("components")
        if not isinstance(items, list) or not items:
            raise self.fail("'components' must be a non-empty list of components",
                            doc.lines.get("components", doc.line), field="components")
        config = Config()
        for item in items:
            for component, origin in self.expand(item, variables, groups, doc.lines["components"]):
                config.add_component_at(component, origin)
        return config

    def variables(self, raw: Any, line: Optional[int]) -> Dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, LineMap):
            raise self.fail("'vars' must be a mapping of name: value", line, field="vars")
        out: Dict[str, Any] = {}
        for name, value in raw.items():
            where = raw.lines[name]
            if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise self.fail(f"variable name {name!r} must be a word (letters, digits, _)",
                                where, field="vars")
            if name in ("host", "index"):
                raise self.fail(f"{{{name}}} is set per component; choose another variable name",
                                where, field="vars")
            if isinstance(value, (dict, list)) or value is None:
                raise self.fail(f"variable {name!r} must be a string, number or boolean",
                                where, field="vars")
            override = _option(self.extra, name)
            out[name] = value if override is None else override
        return out

    def groups(self, raw: Any, line: Optional[int], variables: Dict[str, Any]
               ) -> Dict[str, List[str]]:
        groups: Dict[str, List[str]] = dict(self.inventory)  # --hosts-from groups
        if raw is None:
            return groups
        if not isinstance(raw, LineMap):
            raise self.fail("'hosts' must map group names to host sets or lists", line,
                            field="hosts")
        for name, value in raw.items():
            where = raw.lines[name]
            if not isinstance(name, str) or not name:
                raise self.fail(f"group name {name!r} must be a string", where, field="hosts")
            entries = value if isinstance(value, list) else [value]
            hosts: List[str] = []
            for entry in entries:
                if not isinstance(entry, str) or not entry.strip():
                    raise self.fail(f"group {name!r}: {entry!r} is not a host name or host set",
                                    where, field="hosts")
                text = self.substitute(entry, variables, where, None, "hosts")
                if text in groups:
                    hosts.extend(groups[text])
                    continue
                try:
                    hosts.extend(hostsets.expand(text))
                except hostsets.HostSetError as exc:
                    raise self.fail(f"group {name!r}: {exc}", where, field="hosts") from None
            groups[name] = list(dict.fromkeys(hosts))
        return groups

    # -- one component entry -------------------------------------------------

    def expand(self, item: Any, variables: Dict[str, Any], groups: Dict[str, List[str]],
               list_line: int) -> List[Tuple[Any, Origin]]:
        if not isinstance(item, LineMap):
            raise self.fail("each entry of 'components' must be a mapping of fields",
                            list_line, field="components")
        label = item.get("name") if isinstance(item.get("name"), str) else None
        for key in item:
            if key not in LEGAL_FIELDS + EXPANSION_KEYS:
                allowed = sorted(LEGAL_FIELDS + EXPANSION_KEYS)
                raise self.fail(f"unknown field {key!r}{_hint(key, allowed)}; legal fields: "
                                + ", ".join(allowed), item.lines[key], label, str(key))
        if "on" in item and "count" in item:
            raise self.fail("give either 'on' (one per host of a group) or 'count' "
                            "(copies on one host), not both", item.lines["count"], label, "count")
        if "on" in item and "host" in item:
            raise self.fail("'on' sets the host of each copy; remove 'host'", item.lines["host"],
                            label, "host")
        copies: List[Tuple[str, int]] = []
        if "on" in item:
            copies = [(h, i) for i, h in enumerate(self.on_hosts(item, variables, groups, label), 1)]
        else:
            host = self.one_host(item, variables, groups, label)
            count = self.count(item, variables, label)
            copies = [(host, i) for i in range(1, count + 1)] if count else [(host, 1)]
        out = []
        for host, index in copies:
            scope = dict(variables, host=host, index=index)
            component = component_at(Origin(self.path, item.line))
            for key, value in item.items():
                if key in EXPANSION_KEYS:
                    continue
                where = Origin(self.path, item.lines[key])
                value = host if key == "host" else self.fill(key, value, scope, where.line, label)
                set_field_at(component, key, value, where)
            if "on" in item:
                set_field_at(component, "host", host, Origin(self.path, item.lines["on"]))
            out.append((component, Origin(self.path, item.line)))
        return out

    def on_hosts(self, item: LineMap, variables: Dict[str, Any],
                 groups: Dict[str, List[str]], label: Optional[str]) -> List[str]:
        where = item.lines["on"]
        value = item["on"]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"'on' must name a host group or a host set, got {value!r}", where,
                            label, "on")
        text = self.substitute(value, variables, where, label, "on")
        if text in groups:
            if not groups[text]:  # (else the component would vanish from the run unsaid)
                raise self.fail(f"group {text!r} has no hosts", where, label, "on")
            return groups[text]
        close = difflib.get_close_matches(text, list(groups), 1, 0.75)
        if close and not any(ch in text for ch in "[],"):
            raise self.fail(f"{text!r} is no group (did you mean {close[0]!r}?); for one host of "
                            f"that name write 'host: {text}'", where, label, "on")
        try:
            return hostsets.expand(text)
        except hostsets.HostSetError as exc:
            known = f" (groups: {', '.join(groups)})" if groups else ""
            raise self.fail(f"{exc}{known}", where, label, "on") from None

    def one_host(self, item: LineMap, variables: Dict[str, Any], groups: Dict[str, List[str]],
                 label: Optional[str]) -> Any:
        if "host" not in item:
            return None  # validation reports the missing host at the component's line
        value, where = item["host"], item.lines["host"]
        if not isinstance(value, str):
            return value  # validation reports the type
        text = self.substitute(value, variables, where, label, "host")
        if text in groups:
            if len(groups[text]) != 1:
                raise self.fail(f"group {text!r} has {len(groups[text])} hosts; use 'on: {text}' "
                                "for one component per host", where, label, "host")
            return groups[text][0]
        return text

    def count(self, item: LineMap, variables: Dict[str, Any], label: Optional[str]) -> int:
        if "count" not in item:
            return 0
        value = item["count"]
        if isinstance(value, str):  # "{n}": a variable's value (a number keeps its type)
            value = self.substitute(value, variables, item.lines["count"], label, "count")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"count must be a positive integer, got {value!r}",
                            item.lines["count"], label, "count")
        return value

    # -- substitution ---------------------------------------------------------

    def fill(self, key: str, value: Any, scope: Dict[str, Any], line: int,
             label: Optional[str]) -> Any:
        """Substitute variables in the field *key*: a string, list items, mapping keys and values.

        Every field takes them (``ready: "tcp:{port}"``, ``env: {PORT: "{port}"}``,
        ``settle: "{settle}"``); validation then checks the result as it checks a value
        written out.
        """
        def one(v: Any) -> Any:
            unquoted = _unquoted_variable(v)
            if unquoted:
                raise self.fail(f"{{{unquoted}}} without quotes is a YAML mapping, not a variable; "
                                f'write "{{{unquoted}}}"', line, label, key)
            return self.substitute(v, scope, line, label, key) if isinstance(v, str) else v
        if key not in MAPPING_FIELDS and _unquoted_variable(value):
            return one(value)
        if isinstance(value, list):
            return [one(v) for v in value]
        if isinstance(value, dict):
            return {one(k): one(v) for k, v in value.items()}
        return one(value)

    def substitute(self, text: str, scope: Dict[str, Any], line: Optional[int],
                   label: Optional[str], field: str) -> Any:
        """Replace ``{name}`` in *text*; a text that is only ``{name}`` keeps the value's type."""
        whole = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", text)
        if whole and whole.group(1) in scope:
            return scope[whole.group(1)]

        def one(match: "re.Match[str]") -> str:
            token = match.group(0)
            if token in ("{{", "}}"):
                return token[0]
            name = match.group(1)
            if name not in scope:
                known = ", ".join(sorted(scope)) or "none"
                raise self.fail(f"unknown variable {{{name}}} in {text!r} (known: {known}; "
                                "write {{ and }} for literal braces)", line, label, field)
            return str(scope[name])

        return _VAR.sub(one, text)


def _option(extra: Any, name: str) -> Any:
    """Return option *name* from an arg parser's result (Namespace or dict), else None."""
    if extra is None:
        return None
    if isinstance(extra, dict):
        value = extra.get(name)
    else:
        value = getattr(extra, name, None)
    return None if value == "" else value


def _hint(name: Any, choices: Any) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str, extra_options: Any = None,
                inventory: Optional[Dict[str, List[str]]] = None) -> Config:
    """Read the YAML experiment at *path* into a :class:`Config`.

    *inventory* holds the ``--hosts-from`` groups; the file's own ``hosts:`` groups may use
    them by name and, with the same name, replace them.
    """
    return _Reader(path, read_yaml(path), extra_options, inventory).config()
