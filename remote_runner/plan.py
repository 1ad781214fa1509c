"""The plan of a run, as ``--dry-run`` shows it: what would happen where, and why.

A dry run must answer the questions a user has *before* touching a cluster: which machine does
each name reach (address, port, user, jump hosts), would SSH trust it (is its key known), which
files would be copied and for what reason, and which window starts when. pyinfra's two-phase
``--dry`` and Ansible's ``--check`` answer them by asking the hosts without changing them; so do
we, unless ``--no-connect`` asks for a purely local plan:

* the route of each host comes from ssh_config exactly as a run would resolve it
  (:class:`remote_runner.ssh.Connection` is built, not connected);
* with a connection, each file's reason is found the way a run finds it — size and mode by one
  ``stat`` command, then SHA-1 of those that match — but nothing is written: no directory,
  no file, no screen session, and no host key is recorded (a host whose key is unknown is not
  contacted at all: its files are "not checked");
* secrets are masked: the SSH password never appears, and an argument that follows a flag
  named like a password, token or key (or is ``--password=…``) is shown as ``***``.

The plan is data (:class:`RunPlan`); :func:`render_text` makes the text on stdout and
:meth:`RunPlan.to_dict` the ``--json`` document (schema ``remote-runner/plan/1``, described in
the README). Both are deterministic, so two configs that mean the same (a Python experiment and
its YAML twin) give equal plans.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from remote_runner import sync
from remote_runner.errors import RunnerError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec, Experiment
    from remote_runner.runner import RunOptions
    from remote_runner.ssh import Connection, SSHOptions

PLAN_SCHEMA = "remote-runner/plan/1"
MASK = "***"
#: Where a temporary base_dir would be (it does not exist before the run).
TEMP_BASE = "/<temporary base_dir of {name}>"
#: Where a localhost component without base_dir runs.
LOCAL_CWD = "{cwd} (where remote_runner was started)"
#: Flags whose value is a secret (matched on the flag name, case-insensitive).
_SECRET_FLAG = re.compile(r"^-{1,2}[\w.-]*(pass(word|wd|phrase)?|secret|token|api[-_]?key|"
                          r"credential|private[-_]?key)[\w.-]*$", re.I)
_SECRET_ASSIGN = re.compile(r"^(-{0,2}[\w.-]*(pass(word|wd|phrase)?|secret|token|api[-_]?key|"
                            r"credential|private[-_]?key)[\w.-]*=).+$", re.I)

# Reasons a file would be copied, in the words the plan uses.
MISSING, SIZE, MODE, HASH, ALWAYS = "missing", "size", "mode", "hash", "always-copy"
UNCHANGED, NOT_CHECKED, NEW_BASE = "unchanged", "not checked", "missing (new temporary base_dir)"


@dataclass(frozen=True)
class Hop:
    """One machine on the way: the name written, and what it resolves to."""

    name: str
    user: str
    address: str
    port: int
    host_key: str  # "known" or "unknown"

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


@dataclass
class FilePlan:
    """One file a host would receive, and why (or why not)."""

    src: str
    dest: str
    size: int
    mode: str
    components: List[str]
    reason: str = NOT_CHECKED

    @property
    def copies(self) -> bool:
        return self.reason not in (UNCHANGED, NOT_CHECKED)


@dataclass
class WindowPlan:
    """One component's window."""

    host: str
    name: str
    start_index: Any
    argv: List[str]
    cwd: str
    wait: bool
    mirror: bool


@dataclass
class HostPlan:
    """Everything the run would do on one host."""

    host: str
    local: bool
    route: Optional[Hop] = None
    jumps: List[Hop] = field(default_factory=list)
    proxy_command: Optional[str] = None
    checked: bool = False
    problem: Optional[str] = None
    files: List[FilePlan] = field(default_factory=list)
    windows: List[WindowPlan] = field(default_factory=list)

    @property
    def copy_count(self) -> int:
        return sum(1 for f in self.files if f.copies)

    @property
    def copy_bytes(self) -> int:
        return sum(f.size for f in self.files if f.copies)


@dataclass
class RunPlan:
    """The whole plan: settings, hosts and the start order."""

    config_file: str
    screen: str
    state_dir: str
    kill_previous: bool
    terminate: bool
    connected: bool
    hosts: List[HostPlan]
    order: List[Tuple[Any, List[str]]]

    @property
    def problems(self) -> Dict[str, str]:
        return {h.host: h.problem for h in self.hosts if h.problem}

    def to_dict(self) -> Dict[str, Any]:
        """Return the ``--json`` document (stable keys, see the README's schema)."""
        hosts = []
        for h in self.hosts:
            item = asdict(h)
            item["route"] = None if h.route is None else dict(asdict(h.route), target=h.route.target)
            item["jumps"] = [dict(asdict(j), target=j.target) for j in h.jumps]
            for f, plan_file in zip(item["files"], h.files):
                f["copy"] = plan_file.copies
            item["copy_files"] = h.copy_count
            item["copy_bytes"] = h.copy_bytes
            hosts.append(item)
        return {
            "schema": PLAN_SCHEMA,
            "config_file": self.config_file,
            "screen": self.screen,
            "state_dir": self.state_dir,
            "kill_previous": self.kill_previous,
            "terminate": self.terminate,
            "connected": self.connected,
            "hosts": hosts,
            "order": [{"start_index": index, "components": names} for index, names in self.order],
        }


# --------------------------------------------------------------------------- secrets

def mask_args(argv: Sequence[str], secrets: Sequence[str] = ()) -> List[str]:
    """Return *argv* with secret values replaced by ``***`` (see the module docstring)."""
    out: List[str] = []
    hide_next = False
    for arg in argv:
        text = str(arg)
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        assign = _SECRET_ASSIGN.match(text)
        if assign:
            out.append(assign.group(1) + MASK)
            continue
        for secret in secrets:
            if secret:
                text = text.replace(secret, MASK)
        out.append(text)
        hide_next = bool(_SECRET_FLAG.match(text))
    return out


# --------------------------------------------------------------------------- building

def build(experiment: "Experiment", options: "RunOptions",
          ssh_options: Optional["SSHOptions"] = None, connect: bool = True,
          argv_of: Optional[Any] = None) -> RunPlan:
    """Work out the plan; with *connect*, ask each host (read-only) which files differ."""
    from remote_runner.runner import DEFAULT_STATE_DIR, component_argv
    from remote_runner.ssh import SSHOptions

    ssh_options = ssh_options or SSHOptions()
    secrets = [ssh_options.password] if ssh_options.password else []
    argv_of = argv_of or component_argv
    by_host: Dict[str, List["ComponentSpec"]] = {}
    for spec in experiment.components:
        by_host.setdefault(spec.host, []).append(spec)
    hosts: List[HostPlan] = []
    for host in sorted(by_host):
        specs = by_host[host]
        plan = HostPlan(host=host, local=host == "localhost")
        if not plan.local:
            _describe_route(plan, ssh_options)
        plan.files = _files(host, specs)
        plan.windows = [WindowPlan(host=host, name=s.name, start_index=s.start_index,
                                   argv=mask_args(argv_of(s), secrets),
                                   cwd=s.base_dir or (LOCAL_CWD.format(cwd=os.getcwd())
                                                      if plan.local else
                                                      TEMP_BASE.format(name=s.name)),
                                   wait=s.wait, mirror=s.mirror)
                        for s in sorted(specs, key=lambda s: (s.start_index, s.name))]
        for item in plan.files:
            if item.dest.startswith("/<"):
                item.reason = NEW_BASE
            elif options.always_copy:
                item.reason = ALWAYS
        hosts.append(plan)
    if connect:
        remote = [h for h in hosts if not h.local and any(f.reason == NOT_CHECKED for f in h.files)]
        with ThreadPoolExecutor(max_workers=max(1, min(options.forks, len(remote) or 1))) as pool:
            list(pool.map(lambda h: _check_host(h, ssh_options), remote))
    waves: Dict[Any, List[str]] = {}
    for spec in experiment.components:
        waves.setdefault(spec.start_index, []).append(f"{spec.host}:{spec.name}")
    order = [(index, sorted(waves[index])) for index in sorted(waves)]
    state = options.remote_done_dir or DEFAULT_STATE_DIR.format(screen=options.screen)
    return RunPlan(config_file=experiment.config_file, screen=options.screen, state_dir=state,
                   kill_previous=options.kill_first, terminate=options.terminate,
                   connected=connect, hosts=hosts, order=order)


def _hop(connection: "Connection", name: str) -> Hop:
    return Hop(name=name, user=connection.username, address=connection.hostname,
               port=connection.port, host_key="known" if connection.host_key_known() else "unknown")


def _describe_route(plan: HostPlan, ssh_options: "SSHOptions") -> None:
    """Fill in where *plan.host* leads, as ssh_config resolves it (nothing is contacted)."""
    from remote_runner.ssh import Connection, SSHOptions

    connection = Connection(plan.host, ssh_options)
    plan.route = _hop(connection, plan.host)
    plan.proxy_command = connection.proxy_command
    hop_options = SSHOptions(ssh_config_file=ssh_options.ssh_config_file)
    plan.jumps = [_hop(Connection(j, hop_options), j) for j in connection.jumps]


def _files(host: str, specs: Sequence["ComponentSpec"]) -> List[FilePlan]:
    """Every file the host would receive (directories expanded), with its components."""
    found: Dict[str, FilePlan] = {}
    for spec in specs:
        base = spec.base_dir or TEMP_BASE.format(name=spec.name)
        for upload in sync.make_plan(host, [(f, base) for f in spec.files]).files:
            item = found.get(upload.dest)
            if item is None:
                found[upload.dest] = FilePlan(src=upload.src, dest=upload.dest, size=upload.size,
                                              mode=f"{upload.mode:04o}", components=[spec.name])
            elif spec.name not in item.components:
                item.components.append(spec.name)
    return [found[dest] for dest in sorted(found)]


def _check_host(plan: HostPlan, ssh_options: "SSHOptions") -> None:
    """Connect (never recording a host key) and classify the files still unchecked."""
    from remote_runner.shell import RemoteShell
    from remote_runner.ssh import Connection, SSHOptions

    unknown = [h.name for h in ([plan.route] if plan.route else []) + plan.jumps
               if h.host_key == "unknown"]
    if unknown:
        plan.problem = (f"host key of {', '.join(unknown)} is not in known_hosts; a dry run "
                        "records none (a real run needs --accept-new-host-keys)")
        return
    options = SSHOptions(**{**ssh_options.__dict__, "accept_new_host_keys": False})
    try:
        connection = Connection(plan.host, options).connect()
    except RunnerError as exc:
        plan.problem = str(exc)
        return
    try:
        shell = RemoteShell(connection, plan.host)
        todo = [f for f in plan.files if f.reason == NOT_CHECKED]
        attrs = sync.remote_stat(shell, [f.dest for f in todo if "\n" not in f.dest])
        if attrs is None:
            attrs = sync.remote_attrs(connection.sftp, {posixpath.dirname(f.dest) for f in todo})
        same_shape = []
        for item in todo:
            size, mode = attrs.get(item.dest, (-1, 0))
            if size < 0 or not stat.S_ISREG(mode):
                item.reason = MISSING
            elif size != item.size:
                item.reason = SIZE
            elif f"{stat.S_IMODE(mode):04o}" != item.mode:
                item.reason = MODE
            else:
                same_shape.append(item)
        if same_shape:
            hashes, _tool = sync.remote_sha1(shell, [f.dest for f in same_shape])
            for item in same_shape:
                same = hashes.get(item.dest) == sync.local_sha1(item.src)
                item.reason = UNCHANGED if same else HASH
        plan.checked = True
    except RunnerError as exc:
        plan.problem = str(exc)
    finally:
        connection.close()


# --------------------------------------------------------------------------- text

def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render_text(plan: RunPlan) -> str:
    """Return the plan as text for stdout (stable: tests compare it line by line)."""
    import shlex

    lines = [f"plan for {plan.config_file}",
             f"  screen session {plan.screen!r} on every host "
             f"({'replaces the previous one' if plan.kill_previous else 'added to the previous one'}),"
             f" state in {plan.state_dir}",
             f"  files checked on the hosts: {'yes' if plan.connected else 'no (--no-connect)'}",
             ""]
    for host in plan.hosts:
        if host.local:
            lines.append(f"{host.host}  (this machine, no SSH)")
        else:
            route = host.route
            assert route is not None
            via = ""
            if host.jumps:
                via = "  via " + " -> ".join(f"{j.name} ({j.target}, key {j.host_key})"
                                             for j in host.jumps)
            elif host.proxy_command:
                via = f"  via ProxyCommand {host.proxy_command}"
            lines.append(f"{host.host}  {route.target}  host key {route.host_key}{via}")
        if host.problem:
            lines.append(f"  ! {host.problem}")
        if host.files:
            lines.append(f"  files: {len(host.files)}, would copy {host.copy_count} "
                         f"({_size(host.copy_bytes)})")
            for item in host.files:
                verb = "copy" if item.copies else ("skip" if item.reason == UNCHANGED else "?")
                lines.append(f"    {verb:4} {item.dest}  ({_size(item.size)}, {item.mode})  "
                             f"{item.reason}")
        for window in host.windows:
            marks = "".join([" [wait]" if window.wait else "", " [mirror]" if window.mirror else ""])
            lines.append(f"  window {window.name}  index {window.start_index}{marks}: "
                         f"{shlex.join(window.argv)}  (in {window.cwd})")
        lines.append("")
    lines.append("start order:")
    for index, names in plan.order:
        lines.append(f"  index {index}: {', '.join(names)}")
    lines.append("")
    lines.append("dry run: nothing was started or changed")
    return "\n".join(lines) + "\n"
