"""The local side of a mirror session: ship the agent, serve files, carry stdio and signals.

One SSH session channel carries everything, framed by :mod:`protocol`: the
agent's file-system requests (answered here by a thread pool, many in
flight), the command's stdin/stdout/stderr, signals, window size, heartbeats
and the exit status. No port is opened anywhere and no token is needed: the
channel is the authenticated SSH session itself.

:func:`run_command` is ``remote-runner exec``; :class:`MirrorServer` is what
the runner uses for ``component.mirror = True``. Their parts: the link itself
(:mod:`.locallink`), the streams it runs over (:mod:`.streams`), what the
command takes along (:mod:`.environment`) and this machine's terminal
(:mod:`.terminal`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from remote_runner.errors import EXIT_LINK, MirrorError
from remote_runner.mirror import protocol as P
from remote_runner.mirror import tmpdir as host_tmpdir
from remote_runner.mirror.bundle import build_bundle
from remote_runner.mirror.environment import (connection_secrets, current_umask, files_only_exports,
                                              filtered_environment)
from remote_runner.mirror.exports import Exports, inside
from remote_runner.mirror.locallink import LocalLink, MirrorOptions
from remote_runner.mirror.profile import OfferedDirs, ProfileSet, command_names, executable_of
from remote_runner.mirror.service import LocalFileService
from remote_runner.mirror.streams import ChannelStream, PipeStream
from remote_runner.mirror.terminal import (OutputWriter, enter_raw_mode, forward_signals, pump_stdin,
                                           restore_signals, winsize)
from remote_runner.mirror.watcher import ChangeWatcher

#: Names callers (the CLI, the runner, tests) reach through this module.
__all__ = ["ExecResult", "MirrorOptions", "MirrorServer", "PipeStream", "files_only_exports",
           "filtered_environment", "open_agent", "run_command"]

LOG = logging.getLogger(__name__)

START_TIMEOUT = 60.0


def open_agent(conn: Any, mode: str, options: MirrorOptions, roots: Optional[List[bytes]] = None,
               stream: Any = None, exports: Optional[Exports] = None,
               service: Optional[LocalFileService] = None) -> LocalLink:
    """Start the agent on *conn* (a :class:`remote_runner.ssh.Connection`) or on *stream*.

    *exports* is what the host may see (default: everything but the denylist);
    *service*, one made for them ahead (see :func:`plan_command`).
    """
    bundle = build_bundle()
    host = getattr(conn, "alias", None) or "local"
    open_lane = None
    if stream is None:
        open_lane = lambda command: ChannelStream(conn.exec_channel(command))  # noqa: E731
        try:
            channel = conn.exec_channel(bundle.launch_command(mode))
        except Exception as exc:
            if isinstance(exc, MirrorError):
                raise
            raise MirrorError(f"host {host}: cannot start the mirror agent: {exc}") from exc
        stream = ChannelStream(channel)
    if service is None:
        service = LocalFileService(roots=roots, exports=exports)
    link = LocalLink(stream, service, options, host=host, open_lane=open_lane)
    try:
        link.handshake(bundle)
    except BaseException:
        link.close()
        raise
    return link


# ---------------------------------------------------------------------------
# remote-runner exec
# ---------------------------------------------------------------------------
@dataclass
class ExecResult:
    """What ``exec`` ended with."""

    status: int
    link_lost: bool = False
    message: str = ""
    #: Counters of the run: this machine's (requests served per operation, bytes each way)
    #: and, under ``host``, what the agent reported (requests it asked, answered itself).
    stats: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecPlan:
    """What ``exec`` works out on this machine alone: what is served, the agent, the profiles.

    Made by :func:`plan_command` before (or while) the connection is opened:
    for a program with many libraries, finding them is tens of milliseconds
    that the SSH handshake's round trips can hide; so is reading the profiles.
    """

    options: MirrorOptions
    exports: Exports
    roots: Optional[List[bytes]]
    fields: Dict[str, Any]
    profile: Optional[ProfileSet]
    #: ``ProfileSet.seeds()``: what the local side adds to the host's ``validate``.
    seeds: Optional[Tuple[Tuple[List[str], List[str]], Tuple[List[str], List[str]]]] = None
    #: The file service, made ahead to work out the ``validate`` answers meanwhile.
    service: Optional[LocalFileService] = None


def plan_command(conn: Any, argv: Sequence[str], cwd: Optional[str] = None,
                 options: Optional[MirrorOptions] = None) -> ExecPlan:
    """Work out what running *argv* through *conn* needs here (no traffic: *conn* may be connecting)."""
    options = options or MirrorOptions()
    cwd = cwd or os.getcwd()
    roots = None
    fields: Dict[str, Any] = {}
    deny = connection_secrets(conn)
    if options.files_only:
        roots = options.exports if options.exports is not None else files_only_exports(argv, cwd)
        fields["files_only"] = True
        fields["exports"] = [P.name_to_wire(r) for r in roots]
        exports = Exports.only(roots, options.read_only, deny)
    else:
        exports = Exports.for_commands([(argv, cwd)], options.export, options.read_only, deny,
                                       private_tmp=options.private_tmp)
    if options.private_tmp:
        fields["private_tmp"] = private_tmp_field(exports)
    fields.update({
        "argv": [P.name_to_wire(os.fsencode(a)) for a in argv],
        "cwd": P.name_to_wire(os.fsencode(cwd)),
        "env": filtered_environment(options.forward_env),
        "umask": current_umask(),
    })
    profile = None
    if options.file_cache:
        profile = ProfileSet.for_command(fields["argv"], options.files_only, cwd)
    build_bundle()  # built once per process: now, not after the connection is up
    seeds = profile.seeds() if profile is not None else None
    program = None
    if seeds is not None and not options.files_only:
        # The command's own start (its cwd, its PATH search, its program's libraries) is
        # worked out first, even for a command never run before.
        wire_path = fields["env"].get("PATH")
        search = os.fsdecode(P.name_from_wire(wire_path)) if wire_path else None
        start = command_names(argv[0] if argv else "", search, cwd)
        (names, files), (own_names, own_files) = seeds
        seeds = ((list(dict.fromkeys(start + names)), files), (list(dict.fromkeys(start + own_names)), own_files))
        found = executable_of(fields["argv"], cwd, search)
        program = P.name_to_wire(found) if found is not None else None
    offered = OfferedDirs.for_profile(profile.own).load() if profile is not None else []
    return ExecPlan(options, exports, roots, fields, profile, seeds,
                    _prepared_service(roots, exports, seeds, offered, program))


def private_tmp_field(exports: Exports) -> Dict[str, Any]:
    """The boot's ``private_tmp``: each scratch tree the host replaces, the served paths kept in it.

    ``tmpdir`` is ``$TMPDIR`` when it lies in one of them: the host makes it
    there, empty, so programs that use it find it.
    """
    trees = exports.private_scratch()
    field: Dict[str, Any] = {"trees": {P.name_to_wire(tree): [P.name_to_wire(p) for p in keep]
                                       for tree, keep in trees.items()}}
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir and os.path.isabs(tmpdir):
        path = os.path.normpath(os.fsencode(tmpdir))
        if any(inside(path, tree) for tree in trees):
            field["tmpdir"] = P.name_to_wire(path)
    return field


def _prepared_service(roots: Optional[List[bytes]], exports: Exports, seeds: Any,
                      offered: Sequence[str] = (), program: Optional[str] = None) -> LocalFileService:
    """The file service, already watching and answering what the profiles say ``validate`` will ask.

    The SSH handshake and the agent's start are a few round trips of waiting
    here; listing the profile's directories and finding its files' copy keys
    (~130 ms for a Python start's 47 directories and 229 files) goes meanwhile,
    in a thread, instead of after the host asked (see :meth:`SendAhead.prepare`).
    """
    service = LocalFileService(roots=roots, exports=exports)
    service.watcher = ChangeWatcher.create(None)  # reports go to the link once there is one
    if seeds is not None and service.watcher is not None:
        (names, files), (own_names, own_files) = seeds
        mine = set(own_files)
        service.preparing = threading.Thread(
            target=service.prepare, args=(own_files, list(offered), list(dict.fromkeys(own_names + names)),
                                          [f for f in files if f not in mine], program),
            daemon=True, name="mirror-prepare")
        service.preparing.start()
    return service


def run_command(conn: Any, argv: Sequence[str], *, cwd: Optional[str] = None,
                options: Optional[MirrorOptions] = None, stream: Any = None,
                stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2,
                plan: Optional[ExecPlan] = None) -> ExecResult:
    """Run *argv* on the host inside the mirror; return its status (254 when the link failed).

    *plan*: made by :func:`plan_command` for the same command (else made here).
    """
    plan = plan or plan_command(conn, argv, cwd, options)
    options, fields, profile = plan.options, dict(plan.fields), plan.profile
    tty = os.isatty(stdin_fd) and os.isatty(stdout_fd)
    link = open_agent(conn, "exec", options, roots=plan.roots, stream=stream, exports=plan.exports,
                      service=plan.service)
    done = threading.Event()
    result: Dict[str, Any] = {}
    output = OutputWriter()

    def on_exit(header: Dict[str, Any], _: bytes) -> None:
        if isinstance(header.get("stats"), dict):  # the host's own counters, for reports only
            result["host"] = header["stats"]
        if isinstance(header.get("used"), list):  # files fetched ahead that the command opened
            result["used"] = header["used"]
        result["status"] = int(header.get("status", 255))
        done.set()

    def on_fail(header: Dict[str, Any], _: bytes) -> None:
        result["fail"] = str(header.get("msg") or "the mirror agent failed")
        done.set()

    link.handlers[P.STDOUT] = lambda h, p: output.put(stdout_fd, p)
    link.handlers[P.STDERR] = lambda h, p: output.put(stderr_fd, p)
    link.handlers[P.EXIT] = on_exit
    link.handlers[P.FAIL] = on_fail
    link.handlers[P.READY] = lambda h, p: LOG.debug("command started as pid %s", h.get("pid"))
    rows, cols = winsize(stdout_fd) if tty else (24, 80)
    fields.update({"tty": tty, "rows": rows, "cols": cols})
    if plan.seeds is not None:
        link.service.seed, link.service.own_seed = plan.seeds
    mount_point = _host_tmpdir(options, plan.exports, fields)
    try:
        link.boot(fields)
        link.start()
        restore = enter_raw_mode(stdin_fd) if tty else None
        old_handlers = forward_signals(link, stdout_fd if tty else None)
        threading.Thread(target=pump_stdin, args=(link, stdin_fd), daemon=True, name="mirror-stdin").start()
        try:
            while not done.wait(0.2):
                if link.lost.is_set():
                    # Frames already read may still hold the exit status.
                    done.wait(0.5)
                    break
        finally:
            restore_signals(old_handlers)
            if restore is not None:
                restore()
        output.finish()
    finally:
        try:
            link.close()
        finally:
            host_tmpdir.remove_mount_point(mount_point)
    if profile is not None and "status" in result:
        _save_profile(profile, link.service, result.get("used") or [])
    stats = dict(link.stats(), host=result.get("host") or {})
    if "status" in result:
        return ExecResult(status=result["status"], stats=stats)
    if "fail" in result:
        return ExecResult(status=EXIT_LINK, message=f"host {link.host}: {result['fail']}")
    return ExecResult(status=EXIT_LINK, link_lost=True,
                      message=f"host {link.host}: the link to the mirror agent was lost "
                              f"({link.lost_reason}); the remote command was stopped")


def _host_tmpdir(options: MirrorOptions, exports: Exports, boot: Dict[str, Any]) -> Optional[bytes]:
    """Ask the host for a ``$TMPDIR`` of its own (see :mod:`.tmpdir`); return the directory made here."""
    if options.private_tmp or not options.host_tmpdir:
        return None
    mount_point = host_tmpdir.make_mount_point(exports)
    if mount_point is not None:
        boot["host_tmpdir"] = P.name_to_wire(mount_point)
    return mount_point


def _save_profile(profile: ProfileSet, service: LocalFileService, used: Sequence[Any] = ()) -> None:
    """Keep what the session looked up and sent whole, for the next start on any host.

    *used*: what the host says the command opened of the files fetched ahead;
    only those this session listed as siblings count (a host cannot put a name
    in this machine's profiles that this machine did not offer it).
    """
    made = service.made_dirs
    names = [n for n in service.looked_up if not P.made_in_session(n, made)]
    files = {f: None for f in service.sent_whole if not P.made_in_session(f, made)}
    for name in used:
        if isinstance(name, str) and name in service.listed_siblings:
            files[name] = None
    # Files the host already had (served from its copies without asking) were
    # not sent this time: keep those of the last profiles that were looked up again.
    looked_up = set(names)
    kept = [f for f in profile.load()[1] if f in looked_up and f not in files]
    try:
        profile.save(names, list(files) + kept)
        OfferedDirs.for_profile(profile.own).save(service.offered_dirs)
    except OSError as exc:
        LOG.debug("mirror: profiles %s not saved: %s", profile.paths, exc)


# ---------------------------------------------------------------------------
# The runner's mirror: one daemon agent per host, many screen windows.
# ---------------------------------------------------------------------------
class MirrorServer:
    """Serve the local file system to one host for as long as the runner keeps it.

    ``MirrorServer(conn).start()`` ships and starts the agent as a daemon on
    the host (private 0700 socket directory, no TCP); :meth:`window_argv`
    registers a command and returns the argv a screen window must run (it
    exits with the command's status, 254 if the mirror went away);
    :meth:`close` ends the mirror and every command still running in it.
    """

    def __init__(self, conn: Any, options: Optional[MirrorOptions] = None, *, stream: Any = None,
                 commands: Sequence[Tuple[Sequence[str], str]] = ()) -> None:
        self.conn = conn
        self.options = options or MirrorOptions()
        #: (argv, local cwd) of the commands it will run: what it serves follows from them.
        self.commands = list(commands) or [((), os.getcwd())]
        self._stream = stream
        self.link: Optional[LocalLink] = None
        self.socket_path = ""
        self.agent_path = ""
        self.python = "python3"
        #: The agent's pid on the host (for diagnostics).
        self.agent_pid = 0
        self._ready = threading.Event()
        self._fail = ""
        #: The empty directory here the host mounts the command's ``$TMPDIR`` over (tmpdir.py).
        self._mount_point: Optional[bytes] = None

    def start(self, timeout: float = START_TIMEOUT) -> "MirrorServer":
        """Start the agent and wait until its mirror is mounted."""
        exports = Exports.for_commands(self.commands, self.options.export, self.options.read_only,
                                       connection_secrets(self.conn), private_tmp=self.options.private_tmp)
        link = open_agent(self.conn, "daemon", self.options, stream=self._stream, exports=exports)
        self.link = link
        self.agent_path = str(link.hello.get("agent") or "")
        self.python = str(link.hello.get("executable") or "python3")

        def on_ready(header: Dict[str, Any], _: bytes) -> None:
            self.socket_path = str(header.get("socket") or "")
            self.agent_pid = int(header.get("pid") or 0)
            self._ready.set()

        def on_fail(header: Dict[str, Any], _: bytes) -> None:
            self._fail = str(header.get("msg") or "the mirror agent failed")
            self._ready.set()

        link.handlers[P.READY] = on_ready
        link.handlers[P.FAIL] = on_fail
        boot: Dict[str, Any] = {"argv": [], "cwd": P.name_to_wire(os.fsencode(os.getcwd()))}
        if self.options.private_tmp:
            boot["private_tmp"] = private_tmp_field(exports)
        self._mount_point = _host_tmpdir(self.options, exports, boot)
        try:
            link.boot(boot)
            link.start()
            end = time.monotonic() + timeout
            while not self._ready.wait(0.2):
                if link.lost.is_set() or time.monotonic() > end:
                    break
        except BaseException:
            self.close()
            raise
        if self._fail or not self.socket_path:
            reason = self._fail or link.lost_reason or "timed out"
            self.close()
            raise MirrorError(f"host {link.host}: the mirror did not start: {reason}")
        return self

    @property
    def alive(self) -> bool:
        """Return whether the link to the agent is up."""
        return self.link is not None and not self.link.lost.is_set()

    def window_argv(self, spec_argv: Sequence[str], cwd: Optional[str] = None,
                    env: Optional[Mapping[str, str]] = None) -> List[str]:
        """Register a command to run in the mirror; return the argv the screen window runs."""
        if self.link is None or not self.alive:
            raise MirrorError("the mirror is not running (call start() first, or the link was lost)")
        job = uuid.uuid4().hex
        self.link.send({
            "t": P.JOB, "job": job,
            "argv": [P.name_to_wire(os.fsencode(a)) for a in spec_argv],
            "cwd": P.name_to_wire(os.fsencode(cwd or os.getcwd())),
            "env": filtered_environment(self.options.forward_env, extra=env),
            "umask": current_umask(),
        })
        return build_bundle().run_argv(self.python, self.agent_path, "attach", "--socket",
                                       self.socket_path, "--job", job)

    def close(self) -> None:
        """End the mirror on the host (commands still in it are killed)."""
        try:
            if self.link is not None:
                self.link.close()
        finally:
            host_tmpdir.remove_mount_point(self._mount_point)
            self._mount_point = None

    def __enter__(self) -> "MirrorServer":
        return self.start() if self.link is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
