"""Named host groups from where users already keep them: Slurm allocations and Ansible inventories.

A campaign on 200 nodes does not start with a hand-written host list: the nodes come from a Slurm
allocation (``SLURM_JOB_NODELIST=node[01-64],gpu[1-2]``) or from the Ansible inventory the site
already maintains. ``--hosts-from SOURCE`` (repeatable) reads such a source into named groups that
a Python config sees as ``hosts["clients"]`` and a YAML experiment as ``on: clients``. The runner
fits next to those tools instead of asking users to copy their host lists into it.

Sources:

* ``slurm`` — ``$SLURM_JOB_NODELIST`` (or ``$SLURM_NODELIST``), a compressed node list that
  :mod:`remote_runner.hostsets` expands; group ``slurm``.
* ``slurm:FILE`` — a recorded node list or the output of ``scontrol show hostnames`` (one name a
  line); group ``slurm``. Nothing of Slurm needs to be installed.
* ``ansible:INVENTORY`` — an INI or YAML inventory, or the JSON that ``ansible-inventory --list``
  prints, parsed here without Ansible. Every group becomes a group of the same name; ``all``
  holds every host. ``ansible_host``/``ansible_user``/``ansible_port`` become the
  ``user@host:port`` spelling the runner connects to. Ansible's ranges (``web[01:20]``,
  ``[a:f]``, ``[1:9:2]``) and ClusterShell's (``node[01-64]``) both expand.
* ``FILE`` — a plain list: host sets, separated by newlines or commas, ``#`` comments; group
  named after the file (its base name without extension).

Every source also adds its hosts to ``all``. Errors are :class:`ConfigError` naming the source,
file and line, raised before any host is touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import string
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional

from remote_runner import hostsets
from remote_runner.errors import ConfigError, shown

LOG = logging.getLogger(__name__)

ALL = "all"
SLURM = "slurm"
_ANSIBLE_RANGE = re.compile(r"\[([^\]:]*):([^\]:]*)(?::(\d+))?\]")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class HostGroups(Mapping[str, List[str]]):
    """Ordered named groups of host names; ``all`` is every host of every source.

    A read-only mapping for configs: ``hosts["clients"]`` is a fresh list (a config may change
    it freely), and an unknown group fails with the names of the known ones.
    """

    groups: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, name: str, hosts: Iterable[str]) -> None:
        """Add *hosts* to group *name* (created if new) and to ``all``, keeping order."""
        hosts = list(hosts)
        for key in (name, ALL):
            merged = self.groups.get(key, []) + hosts
            self.groups[key] = list(dict.fromkeys(merged))

    def __getitem__(self, name: str) -> List[str]:
        if name not in self.groups:
            known = ", ".join(repr(g) for g in self.groups) or "none; use --hosts-from"
            raise KeyError(f"no host group {name!r} (known groups: {known})")
        return list(self.groups[name])

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def as_dict(self) -> Dict[str, List[str]]:
        """A copy as a plain dict of lists."""
        return {name: list(hosts) for name, hosts in self.groups.items()}


def load(sources: Iterable[str], environ: Optional[Mapping[str, str]] = None) -> HostGroups:
    """Read every ``--hosts-from`` *source* (in order) into one :class:`HostGroups`."""
    env = os.environ if environ is None else environ
    groups = HostGroups()
    for source in sources:
        read_source(source, groups, env)
    return groups


def read_source(source: str, groups: HostGroups, environ: Mapping[str, str]) -> None:
    """Add the groups of one source to *groups*."""
    kind, sep, rest = source.partition(":")
    if source == SLURM:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("--hosts-from slurm: SLURM_JOB_NODELIST is not set (run inside an "
                              "allocation, e.g. `salloc -N4`, or give a recorded list: "
                              "--hosts-from slurm:FILE)")
        groups.add(SLURM, _expand(nodelist, "$SLURM_JOB_NODELIST", None))
    elif sep and kind == SLURM:
        groups.add(SLURM, plain_list(_read(rest, source), rest))
    elif sep and kind == "ansible":
        parse_ansible(_read(rest, source), rest, groups)
    elif os.path.exists(source):
        name = os.path.splitext(os.path.basename(source))[0]
        if not _GROUP_NAME.match(name):
            raise ConfigError(f"--hosts-from {source}: the file name {name!r} is not a usable "
                              "group name (letters, digits, _ . -)")
        groups.add(name, plain_list(_read(source, source), source))
    else:
        raise ConfigError(f"--hosts-from {source!r}: not a file, and not one of slurm, "
                          "slurm:FILE, ansible:INVENTORY")


def _read(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"--hosts-from {source}: cannot read {path}: {reason}",
                          file=path) from None


def _expand(text: str, path: str, line: Optional[int]) -> List[str]:
    try:
        return hostsets.expand(text)
    except hostsets.HostSetError as exc:
        raise ConfigError(str(exc), file=path, line=line, field="--hosts-from") from None


def plain_list(text: str, path: str) -> List[str]:
    """Hosts from a recorded node list or ``scontrol show hostnames`` output (one a line)."""
    hosts: List[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            hosts.extend(_expand(line, path, number))
    if not hosts:
        raise ConfigError("no hosts in this list", file=path, field="--hosts-from")
    return list(dict.fromkeys(hosts))


# --------------------------------------------------------------------------- Ansible

def ansible_pattern(name: str, path: str, line: Optional[int]) -> List[str]:
    """Expand Ansible's ``web[01:20]``/``db-[a:f]``/``[1:9:2]`` and ClusterShell's ``[01-20]``."""
    match = _ANSIBLE_RANGE.search(name)
    if not match:
        return _expand(name, path, line)
    lo, hi, step_text = match.group(1), match.group(2), match.group(3)
    step = int(step_text) if step_text else 1
    if lo.isdigit() and hi.isdigit():
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        values = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1, step)]
    elif len(lo) == 1 and len(hi) == 1 and lo in string.ascii_letters and hi in string.ascii_letters:
        values = [chr(c) for c in range(ord(lo), ord(hi) + 1, step)]
    else:
        raise ConfigError(f"bad range [{match.group(0)[1:-1]}] in host pattern {name!r} "
                          "(expected [1:9], [01:50] or [a:f])", file=path, line=line,
                          field="--hosts-from")
    if not values or len(values) > hostsets.MAX_HOSTS:
        raise ConfigError(f"range in host pattern {name!r} is empty or larger than "
                          f"{hostsets.MAX_HOSTS} hosts", file=path, line=line, field="--hosts-from")
    head, tail = name[:match.start()], name[match.end():]
    out: List[str] = []
    for value in values:
        out.extend(ansible_pattern(head + value + tail, path, line))
    return out


#: What a host name, address or user from an inventory may hold (no spaces, quotes or shell
#: characters: they become ssh destinations, so a mistake is named here, at its line).
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.:%@\[\]-]+")


def _check_connection_vars(alias: str, variables: Mapping[str, Any], path: str,
                           line: Optional[int]) -> None:
    """Warn, at the inventory's line, of a host, user or port that cannot be a destination
    (``ansible_port=22x``, a templated ``{{ vault_user }}``): a run that uses the host then fails
    at the config's line; an inventory's hosts the run does not use stay harmless."""
    problems = [f"{key}={str(variables[key])[:80]!r} is not a host name, address or user name"
                for key in ("ansible_host", "ansible_ssh_host", "ansible_user", "ansible_ssh_user")
                if variables.get(key) is not None and not _SAFE_WORD.fullmatch(str(variables[key]))]
    problems += [f"{key}={str(variables[key])[:20]!r} is not a port (1-65535)"
                 for key in ("ansible_port", "ansible_ssh_port")
                 if variables.get(key) is not None
                 and not (str(variables[key]).isdigit() and 0 < int(str(variables[key])) < 65536)]
    for problem in problems:
        LOG.warning("%s%s: host %r: %s", path, f":{line}" if line else "", alias, problem)


def connect_name(alias: str, variables: Mapping[str, Any]) -> str:
    """``user@host:port`` from ``ansible_host``/``ansible_user``/``ansible_port`` (else *alias*)."""
    host = str(variables.get("ansible_host") or variables.get("ansible_ssh_host") or alias)
    user = variables.get("ansible_user") or variables.get("ansible_ssh_user")
    port = variables.get("ansible_port") or variables.get("ansible_ssh_port")
    if ":" in host and port:
        host = f"[{host}]"
    return (f"{user}@" if user else "") + host + (f":{port}" if port else "")


class _Inventory:
    """Groups as Ansible builds them: direct hosts, child groups, per-host connection vars."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.hosts: Dict[str, List[str]] = {}
        self.children: Dict[str, List[str]] = {}
        self.hostvars: Dict[str, Dict[str, Any]] = {}
        self.order: List[str] = []

    def group(self, name: str) -> None:
        if name not in self.hosts:
            self.hosts[name] = []
            self.children[name] = []
            self.order.append(name)

    def add_host(self, group: str, alias: str, variables: Mapping[str, Any],
                 line: Optional[int] = None) -> None:
        _check_connection_vars(alias, variables, self.path, line)
        self.group(group)
        self.hosts[group].append(alias)
        self.hostvars.setdefault(alias, {}).update(variables)

    def resolve(self, name: str, seen: tuple = ()) -> List[str]:
        if name in seen:
            raise ConfigError(f"group {name!r} contains itself (through "
                              f"{' -> '.join(seen + (name,))})", file=self.path,
                              field="--hosts-from")
        out = list(self.hosts.get(name, []))
        for child in self.children.get(name, []):
            out.extend(self.resolve(child, seen + (name,)))
        return list(dict.fromkeys(out))

    def into(self, groups: HostGroups) -> None:
        resolved = {name: self.resolve(name) for name in self.order}
        if not any(resolved.values()):
            raise ConfigError("the inventory has no hosts", file=self.path, field="--hosts-from")
        for name, aliases in resolved.items():
            groups.add(name, [connect_name(a, self.hostvars.get(a, {})) for a in aliases])


def parse_ansible(text: str, path: str, groups: HostGroups) -> None:
    """Add the groups of an Ansible inventory (INI, YAML or ``--list`` JSON) to *groups*."""
    stripped = text.lstrip()
    inventory = _Inventory(path)
    if not stripped.startswith("{"):
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line.startswith("[") and not line.endswith("]") and "]" not in line:
                raise ConfigError(f"unclosed section header {line[:60]!r} (write [name])",
                                  file=path, line=number, field="--hosts-from")
    if stripped.startswith("{"):
        _json_inventory(text, inventory)
    elif re.search(r"^\s*\[[^\]]+\]\s*$", text, re.M) and not re.search(r"^\s*\w[\w.-]*:\s*$",
                                                                            text, re.M):
        _ini_inventory(text, inventory)
    else:
        _yaml_inventory(text, inventory)
    inventory.into(groups)


def _ini_inventory(text: str, inv: _Inventory) -> None:
    section, kind = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.match(r"^\[([^\]:]+)(?::(\w+))?\]$", line)
        if header:
            section, kind = header.group(1).strip(), header.group(2) or "hosts"
            if kind not in ("hosts", "children", "vars"):
                raise ConfigError(f"unknown section kind ':{kind}' (expected :children or :vars)",
                                  file=inv.path, line=number, field="--hosts-from")
            inv.group(section)
            continue
        if kind == "vars":
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise ConfigError(f"cannot read this line: {exc}", file=inv.path, line=number,
                              field="--hosts-from") from None
        if not words:
            continue
        if kind == "children":
            inv.group(words[0])
            inv.group(section)
            inv.children[section].append(words[0])
            continue
        variables = {}
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if not eq:
                raise ConfigError(f"expected key=value after the host name, got {word!r}",
                                  file=inv.path, line=number, field="--hosts-from")
            variables[key] = value
        for alias in ansible_pattern(words[0], inv.path, number):
            inv.add_host(section, alias, variables, number)


def _yaml_inventory(text: str, inv: _Inventory) -> None:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"not an INI, YAML or JSON inventory: {exc}", file=inv.path,
                          line=mark.line + 1 if mark else None, field="--hosts-from") from None
    if not isinstance(doc, dict):
        raise ConfigError("a YAML inventory maps group names to {hosts:, children:}",
                          file=inv.path, field="--hosts-from")
    for name, body in doc.items():
        _yaml_group(str(name), body, inv)


def _yaml_group(name: str, body: Any, inv: _Inventory) -> None:
    inv.group(name)
    if body is None:
        return
    if not isinstance(body, dict):
        raise ConfigError(f"group {name!r} must be a mapping with hosts:/children:/vars:",
                          file=inv.path, field="--hosts-from")
    hosts = body.get("hosts") or {}
    if isinstance(hosts, list):  # not Ansible's spelling, but an obvious one: names, or
        listed: Dict[Any, Any] = {}  # one-host mappings (`- web1: {ansible_host: …}`)
        for item in hosts:
            if isinstance(item, dict):
                listed.update(item)
            elif isinstance(item, (str, int)) and not isinstance(item, bool):
                listed[item] = None
            else:
                raise ConfigError(f"group {name!r}: a host in 'hosts' must be a name, got "
                                  f"{shown(item)}", file=inv.path, field="--hosts-from")
        hosts = listed
    if not isinstance(hosts, dict):
        raise ConfigError(f"group {name!r}: 'hosts' must map host names to their variables",
                          file=inv.path, field="--hosts-from")
    for pattern, variables in hosts.items():
        if not isinstance(pattern, (str, int)) or isinstance(pattern, bool):
            raise ConfigError(f"group {name!r}: a host name must be text, got {shown(pattern)}",
                              file=inv.path, field="--hosts-from")
        for alias in ansible_pattern(str(pattern), inv.path, None):
            inv.add_host(name, alias, variables if isinstance(variables, dict) else {})
    children = body.get("children") or {}
    if isinstance(children, list) and all(isinstance(c, str) for c in children):
        children = {c: None for c in children}
    if not isinstance(children, dict):
        raise ConfigError(f"group {name!r}: 'children' must map group names to groups, got "
                          f"{shown(children)}", file=inv.path, field="--hosts-from")
    for child, child_body in children.items():
        _yaml_group(str(child), child_body, inv)
        inv.children[name].append(str(child))


def _json_inventory(text: str, inv: _Inventory) -> None:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"bad JSON inventory: {exc.msg}", file=inv.path, line=exc.lineno,
                          field="--hosts-from") from None
    if not isinstance(doc, dict):
        raise ConfigError("a JSON inventory is an object of groups (ansible-inventory --list)",
                          file=inv.path, field="--hosts-from")
    meta = doc.get("_meta") or {}
    hostvars = meta.get("hostvars") or {} if isinstance(meta, dict) else None
    if not isinstance(hostvars, dict):
        raise ConfigError("'_meta' must be an object whose 'hostvars' maps hosts to their "
                          "variables", file=inv.path, field="--hosts-from")
    for name, body in doc.items():
        if name == "_meta":
            continue
        inv.group(name)
        if isinstance(body, list):  # a dynamic inventory's short form: group -> [hosts]
            body = {"hosts": body}
        if not isinstance(body, dict):
            raise ConfigError(f"group {name!r} must be an object or a list of hosts",
                              file=inv.path, field="--hosts-from")
        for key in ("hosts", "children"):
            names = body.get(key) or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"group {name!r}: {key!r} must be a list of names, got "
                                  f"{shown(names)}", file=inv.path, field="--hosts-from")
        for alias in body.get("hosts") or []:
            variables = hostvars.get(alias) or {}
            if not isinstance(variables, dict):
                raise ConfigError(f"the variables of host {alias!r} must be an object, got "
                                  f"{shown(variables)}", file=inv.path, field="--hosts-from")
            inv.add_host(name, alias, variables)
        for child in body.get("children") or []:
            inv.group(child)
            inv.children[name].append(child)
