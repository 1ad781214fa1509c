"""Run an experiment: connect, prepare, copy, start in order, wait, optionally terminate.

The sequence per run (each step finishes on every host before the next begins,
and inside a step hosts are handled in parallel, at most ``forks`` at once):

1. **Check locally** everything that can be checked without a host (session
   name, sources, destination conflicts), so bad input changes nothing anywhere.
2. **Connect** to every remote host (``localhost`` components need no SSH),
   while this machine plans each host's change check (see :mod:`precheck`).
3. **Prepare** each host with one command: check that screen is there, create
   the state ("done") directory, make each component's base_dir (``mktemp -d``
   when the config gave none; a ``localhost`` component without one runs, as
   in SPAR, in the directory remote_runner was started from, so its relative
   paths mean what they did).
4. **Copy** files (:mod:`remote_runner.sync`): free space first, then every copy.
5. **Start** by ``start_index``, one command per host per index (a *wave*):
   it opens every window of the wave with one screen client, waits for each
   launcher's ``<stem>.pid`` and runs the health check (alive after
   ``--settle``, or ``ready``); the next index begins only when every window
   of this one is confirmed on every host. A host's first command also
   writes the launchers of all its waves (:mod:`remote_runner.screen`) and
   **replaces** the previous session of the same name (or adopts it with
   ``--no-kill``) — only now, once every host is prepared and every copy is
   complete, so a run that cannot start leaves the last good one running.
   Hosts with nothing in the first index do this alongside it.
6. **Wait** for ``wait`` components by polling their ``<stem>.status`` files,
   one bounded command per host per round, so a dead link raises instead of
   hanging; a launcher that vanished without a status is a failure too.
7. **Terminate** (``-t``, off by default): signal the process group of every
   other component's window, then SIGKILL what is left after a grace period.

Hosts run commands through a :class:`~remote_runner.shell.Shell`: ``sh -s``
over an SSH exec channel, or a local ``sh`` for ``localhost``, so the same
scripts serve both. The :class:`Runner` is this sequence; steps 3 and the
launchers live in :mod:`remote_runner.hostsetup`, step 5 in
:mod:`remote_runner.starting`, steps 6 and 7 in :mod:`remote_runner.runend`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from remote_runner import events as ev
from remote_runner import hashcache, landing, precheck, sessionlock
from remote_runner import screen as scr
from remote_runner import sync
from remote_runner import upload
from remote_runner.errors import (ComponentFailed, ConfigError, ConnectionLost, CopyError,
                                   PartialRun, PrerequisitesUnreachable, RunnerError,
                                   control_characters)
from remote_runner.runmodel import (  # noqa: F401 - re-exported: the runner's API
    ComponentResult, MirrorFactory, MirrorSession, Placement, RunOptions, RunReport,
    component_argv, default_mirror_factory, path_lookup,
)
from remote_runner.hostsetup import HostSetup
from remote_runner.runend import RunEnd
from remote_runner.starting import Starting
from remote_runner.runrecord import (ComponentRecord, HostRecord, RunRecord, component_record,
                                     host_record, new_run_id, utc_now)
from remote_runner.shell import LocalShell, RemoteShell, ScriptResult, Shell  # noqa: F401 (API)

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec, Experiment
    from remote_runner.ssh import Connection, SSHOptions

LOG = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "~/.remote-runner/{screen}"


# --------------------------------------------------------------------------- the run

class _Dial:
    """A runner's :meth:`Runner.connect` on a thread of its own (see :meth:`Runner.connect_while`)."""

    def __init__(self, runner: "Runner") -> None:
        self.runner = runner
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._abandoned = self._done = False
        self.thread = threading.Thread(target=self._run, name="connect", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.connect()
        except BaseException as exc:  # noqa: BLE001 - raised again by join()
            self.error = exc
        with self._lock:
            self._done = True
            if self._abandoned:
                self.runner.close_connections()

    def join(self) -> None:
        """Wait for every host's outcome; raise what connecting raised."""
        try:
            self.thread.join()
        except BaseException:  # Ctrl-C while waiting
            self.abandon()
            raise
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """The run ends before its hosts are needed: close every connection, now or when it is made."""
        with self._lock:
            self._abandoned = True
            if self._done:
                self.runner.close_connections()


class Runner(HostSetup, Starting, RunEnd):
    """One run of one experiment."""

    def __init__(self, experiment: "Experiment", options: RunOptions,
                 ssh_options: Optional["SSHOptions"] = None,
                 connect: Optional[Callable[[List[str]], Dict[str, "Connection"]]] = None,
                 mirror_factory: MirrorFactory = default_mirror_factory,
                 progress: Optional[sync.Progress] = None,
                 reporter: Optional[ev.Reporter] = None,
                 record: Optional[RunRecord] = None) -> None:
        self.experiment = experiment
        self.events: ev.Reporter = reporter or ev.LogReporter()
        self.options = options
        self.ssh_options = ssh_options
        self._connect = connect
        self.mirror_factory = mirror_factory
        self.progress = progress
        self.connections: Dict[str, "Connection"] = {}
        self.shells: Dict[str, Shell] = {}
        self.screens: Dict[str, scr.Screen] = {}
        self.placements: Dict[str, List[Placement]] = {}
        self.report = RunReport()
        self.mirror: Optional[MirrorSession] = None
        #: Set on Ctrl-C: copies stop at their next chunk.
        self.cancel = threading.Event()
        #: where ``localhost`` components without a base_dir run (SPAR: the invocation dir)
        self.invocation_dir = os.getcwd()
        #: each remote host name -> the name of its group (names landing on one login)
        self.host_of: Dict[str, str] = {}
        self.run_id = options.run_id or (record.run_id if record else new_run_id())
        #: Saved (to this machine's run records) only when the caller gave one.
        self.record = record or RunRecord(self.run_id, screen=options.screen)
        self._save_records = record is not None
        self.locks: Dict[str, sessionlock.SessionLock] = {}
        #: per host: the change check asked with its lock (kept only when its answer is usable)
        self.early: Dict[str, precheck.EarlyCheck] = {}
        #: every host's plan of files, built once per distinct list of files
        self.plans = sync.PlanMemo()
        #: per host: the shell text writing its launchers (run by its first start command)
        self._setup: Dict[str, str] = {}
        #: the run's guesses of the files changed here (see :mod:`precheck`)
        self.ahead_memo: precheck.AheadMemo = {}
        self._hash_saver: Optional[threading.Thread] = None
        #: per host: destination -> temporary name of each file sent ahead with its check,
        #: until the host's first start command has put them in place (or removed them)
        self.sent_ahead: Dict[str, Dict[str, str]] = {}
        self._record_lock = threading.Lock()

    # -- public -------------------------------------------------------------

    def run(self) -> RunReport:
        """Carry out the whole run; raise a RunnerError subclass on the first failing step."""
        self.preflight()
        hosts = len(self._by_host())
        try:
            with ev.phase(self.events, "connect", hosts) as info:
                self.connect_while(self.plan_checks)
                info["message"] = f"connected to {len(self.connections)} host(s)"
                if self.report.skipped:
                    info["message"] += f", skipping {len(self.report.skipped)} unreachable"
            count = sum(len(specs) for specs in self._by_host().values())
            with ev.phase(self.events, "prepare", hosts):
                self.lock()
                self.prepare()
            with ev.phase(self.events, "copy", self._hosts_with_files()) as info:
                self.copy()
                info["message"] = _copy_summary(self.report.sync)
            with ev.phase(self.events, "start", count) as info:
                self.write_launchers()
                self.save_record()
                self.start_all()
                if self._waited():  # else the record is written once more at the end, at once
                    self.save_record()
                info["message"] = f"started {count} component(s)"
            try:
                with ev.phase(self.events, "wait", len(self._waited())):
                    self.wait_all()
            finally:
                if self.options.terminate:
                    with ev.phase(self.events, "terminate", count):
                        self.terminate()
            if self.report.failures:
                raise ComponentFailed(self.report.failures)
            if self.report.skipped:
                raise PartialRun(self.report.skipped, self.options.max_fail)
            return self.report
        finally:
            self.record.finished = utc_now()
            self.save_record()
            self.close()

    def _save_hashes_meanwhile(self) -> None:
        """Save the local hash cache on a thread while the start goes on (see :meth:`close`).

        A save rereads the cache file, looks at every entry's file and writes it all
        again (~15 ms for a few thousand entries): not a reason to start later.
        """
        self._hash_saver = threading.Thread(target=hashcache.LOCAL.save, name="hash-cache",
                                            daemon=True)
        self._hash_saver.start()

    def close(self) -> None:
        """Release the session locks, the mirror and every connection."""
        if self._hash_saver is not None:
            self._hash_saver.join()
        hashcache.LOCAL.save()  # what the copy step's saver did not have (nothing: no work)
        self._drop_sent_ahead()
        for lock in self.locks.values():
            lock.release()
        self.locks = {}
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
        self.count_traffic()
        self.close_connections()

    def close_connections(self) -> None:
        """Close every host's connection and forget it, with the shells that used it."""
        for connection in self.connections.values():
            connection.close()
        self.connections = {}
        self.shells = {}

    def count_traffic(self) -> None:
        """Put each host's exec and SFTP counts in the report and say them (``-v``)."""
        from remote_runner.traffic import describe
        for host in sorted(self.connections):
            counter = getattr(self.connections[host], "traffic", None)
            if counter is None:
                continue
            counts = self.report.traffic[host] = counter.snapshot()
            self._say(ev.KIND_NOTE, host, describe(counts), level=logging.DEBUG, **counts)

    # -- steps ---------------------------------------------------------------

    def preflight(self) -> None:
        """Check everything that needs no host, so that bad input changes nothing and
        contacts no host."""
        scr.validate_session_name(self.options.screen)
        done_dir = self.options.remote_done_dir
        if done_dir is not None:
            if not done_dir.strip():
                raise ConfigError("--remote-done-dir must not be empty", field="--remote-done-dir")
            bad = sorted(set(done_dir) & scr.UNSAFE_DIR_CHARS) or control_characters(done_dir)
            if bad:
                raise ConfigError(f"--remote-done-dir {done_dir!r} must not contain {bad}",
                                  field="--remote-done-dir")
        for spec in self.experiment.components:
            if not spec.is_local:
                _check_host_syntax(spec)
        self._group_hosts()
        # Every source was found when the config was read; the plans look at each once more
        # (one stat a file, shared by the hosts given the same files), and name the component
        # of one gone since, or unreadable.
        for host, specs in self._by_host().items():
            entries: List[Tuple[Any, str]] = []
            for spec in specs:
                base = (posixpath.normpath(spec.base_dir) if spec.base_dir
                        else f"/<temporary base_dir of {spec.name}>")
                entries += [(f, base) for f in spec.files]
            try:
                self.plans.plan(host, entries)  # raises on unreadable or conflicting sources
            except CopyError as exc:
                raise _source_problem(exc, host, specs) from exc

    def _group_hosts(self) -> None:
        """Fold host names that reach the same login into one host (see :mod:`landing`)."""
        remote = [spec.host for spec in self.experiment.components if not spec.is_local]
        if self.ssh_options is None and self._connect is not None:
            self.host_of = {host: host for host in remote}  # injected connections: names as given
            self.report.host_of = dict(self.host_of)
            return
        from remote_runner.ssh import SSHOptions
        ssh_options = self.ssh_options or SSHOptions()
        self.host_of = landing.group_hosts(remote, ssh_options, ssh_options.connect_timeout)
        landing.check_names(self.experiment.components, self.host_of)
        self.report.host_of = dict(self.host_of)

    def connect_while(self, work: Callable[[], None]) -> None:
        """:meth:`connect` while this thread does *work* (the change checks' planning: a hash-cache
        lookup per source, the files sent ahead, each host's request): the handshakes wait for
        the network, the planning for this machine, so neither waits for the other.

        Only work that no input can make fail goes here: bad input is refused before any host
        is contacted (:meth:`preflight`). Should *work* raise all the same (Ctrl-C), its error
        is raised at once, and connections that come up later are closed as they come.
        """
        if not any(h != "localhost" for h in self._by_host()):
            work()
            self.connect()
            return
        dial = _Dial(self)
        try:
            work()
        except BaseException:
            dial.abandon()
            raise
        dial.join()

    def connect(self) -> None:
        """Open a connection to every remote host and a shell for every host."""
        remote = [h for h in self._by_host() if h != "localhost"]
        if remote:
            if self._connect is not None:
                self.connections = self._connect(remote)
                for host in self.connections:
                    self._say(ev.KIND_HOST_CONNECTED, host, level=logging.DEBUG)
            else:
                from remote_runner.ssh import SSHOptions, connect_some
                limit = self.options.max_fail
                allowed = limit.allowed(len(remote)) if limit is not None else 0
                self.connections, failed = connect_some(
                    remote, self.ssh_options or SSHOptions(), allowed, on_result=self._connected)
                by_host = self._by_host()
                self._refuse_without_prerequisites(failed)
                for host, exc in failed.items():
                    self.report.skipped[host] = str(exc)
                    names = ", ".join(s.name for s in by_host[host])
                    self._say(ev.KIND_NOTE, host, f"unreachable, skipping its components "
                                                  f"({names}) within --max-fail {limit}",
                              level=logging.WARNING)
        for host in self._by_host():
            self.shells[host] = (LocalShell() if host == "localhost"
                                 else RemoteShell(self.connections[host], host))

    def _refuse_without_prerequisites(self, failed: Dict[str, BaseException]) -> None:
        """Close everything and raise when the run means nothing without the *failed* hosts."""
        from remote_runner.failpolicy import lost_prerequisites
        reasons = lost_prerequisites(self.experiment.components, self.host_of, set(failed))
        if reasons:
            self.close_connections()
            raise PrerequisitesUnreachable({h: str(e) for h, e in failed.items()}, reasons)

    def save_record(self) -> None:
        """Write this run's record on this machine (when the caller asked for one)."""
        if not self._save_records:
            return
        for host, places in self.placements.items():
            for place in places:
                self._component_record(host, place)
        try:
            self.record.save()
        except OSError as exc:
            LOG.warning("could not write the run record %s: %s", self.record.path, exc)

    def copy(self) -> None:
        """Copy every remote component's files (nothing for localhost)."""
        jobs = []
        for host, places in self.placements.items():
            entries = [(f, p.base_dir) for p in places for f in p.spec.files]
            if host == "localhost" or not entries:
                continue
            connection = self.connections[host]
            check = self.early.get(host)
            plan = check.plan if check else self.plans.plan(host, entries)
            jobs.append((self.on_lock(host), connection.sftp, plan))
        openers = {host: _lane_opener(self.connections[host]) for host in self.connections}

        def progress(host: str, delta: int) -> None:
            self.events.emit(ev.Event(ev.KIND_COPY_PROGRESS, host=host, data={"bytes": delta}))
            if self.progress is not None:
                self.progress(host, delta)

        def planned(host: str, files: int, size: int) -> None:
            self.events.emit(ev.Event(ev.KIND_COPY_PLANNED, host=host,
                                      data={"files": files, "bytes": size}))

        self.report.sync = sync.sync_all(jobs, self.options.forks, self.options.always_copy,
                                         progress, openers, self.cancel, on_plan=planned,
                                         rehash=self.options.rehash,
                                         answers={h: c.answer for h, c in self.early.items()
                                                  if c.answer is not None},
                                         staged={h: c.staged() for h, c in self.early.items()},
                                         sums=None if self.options.rehash
                                         else precheck.known_sums(self.ahead_memo),
                                         save_hashes=False)
        self._save_hashes_meanwhile()
        for host in sorted(self.report.sync):
            done = self.report.sync[host]
            self._say(ev.KIND_COPY_DONE, host, done.summary().split(": ", 1)[-1],
                      copied=len(done.copied), unchanged=len(done.skipped), bytes=done.bytes)

    # -- helpers ------------------------------------------------------------

    def _say(self, kind: str, host: Optional[str], message: str = "", level: int = logging.INFO,
             component: Optional[str] = None, **data: Any) -> None:
        """Tell the reporter what happened (the only way the runner reports progress)."""
        self.events.emit(ev.Event(kind, message, host=host, component=component, level=level,
                                  data=data))

    def _connected(self, host: str, error: Optional[BaseException]) -> None:
        """Report one host's connection outcome as soon as it is known."""
        if error is None:
            self._say(ev.KIND_HOST_CONNECTED, host, "connected")
        else:
            self._say(ev.KIND_HOST_FAILED, host, level=logging.DEBUG, error=str(error))

    def _hosts_with_files(self) -> int:
        """Count the remote hosts that receive files."""
        return sum(1 for host, specs in self._by_host().items()
                   if host != "localhost" and any(s.files for s in specs))

    def _state_dir(self) -> str:
        return self.options.remote_done_dir or DEFAULT_STATE_DIR.format(screen=self.options.screen)

    def _host_record(self, host: str, state_dir: str, run_dir: str) -> HostRecord:
        return host_record(host, self.connections.get(host), state_dir, run_dir)

    def _component_record(self, host: str, place: Placement) -> ComponentRecord:
        """Return (creating on first use) the run record entry of *place*."""
        with self._record_lock:
            rec = component_record(self.record, host, place.spec, place.window.stem,
                                   place.base_dir, place.temp_base)
        result = self.report.components.get(place.spec.key)
        if result is not None and result.pid is not None:
            rec.pid = result.pid
        return rec

    def _by_host(self) -> Dict[str, List["ComponentSpec"]]:
        """Group the components by host (names that reach the same login are one host)."""
        grouped: Dict[str, List["ComponentSpec"]] = {}
        for spec in self.experiment.components:
            group = self._group_of(spec)
            if group not in self.report.skipped:
                grouped.setdefault(group, []).append(spec)
        return grouped

    def _group_of(self, spec: "ComponentSpec") -> str:
        return self.host_of.get(spec.host, spec.host)

    def _parallel(self, func: Callable[[str], Any], hosts: Sequence[str], doing: str = "",
                  places: Optional[Dict[str, List[Placement]]] = None) -> None:
        """Run *func* for every host (bounded by forks); raise the first error after all finish.

        A lost connection is reported as what the run was *doing* on that host
        and for which of its components (*places*), not as the helper command
        that noticed it.
        """
        if not hosts:
            return
        errors: List[BaseException] = []
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.options.forks, len(hosts))))
        futures = [pool.submit(ev.for_host(h, func), h) for h in hosts]
        # On Ctrl-C this returns at once; closing the connections (run's finally)
        # then ends whatever the workers are still waiting for on the network.
        upload.wait_or_cancel(pool, futures, self.cancel)
        for host, future in zip(hosts, futures):
            try:
                future.result()
            except ConnectionLost as exc:
                names = [p.spec.name for p in (places or self.placements).get(host, [])]
                whom = (f" (component{'s' if len(names) > 1 else ''} "
                        f"{', '.join(map(repr, names))})") if names else ""
                errors.append(ConnectionLost(host, f"the SSH connection was lost while "
                                                   f"{doing or 'working on it'}{whom}", exc.hint))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        if errors:
            for extra in errors[1:]:
                LOG.error("%s", extra)
            raise errors[0]


def _check_host_syntax(spec: "ComponentSpec") -> None:
    """Refuse a host that cannot be parsed (bad port, bracket) at the config line that set it."""
    from remote_runner.ssh import parse_host
    try:
        parse_host(spec.host)
    except ConfigError as exc:
        where = spec.origin_of("host")
        raise ConfigError(exc.message, file=where.file, line=where.line, component=spec.name,
                          field="host") from None


def _spec_of(path: Optional[str], specs: Sequence["ComponentSpec"]) -> Optional["ComponentSpec"]:
    """The first of *specs* whose files hold *path* (a file, or under a directory given)."""
    for spec in specs:
        for item in spec.files:
            if path is not None and (path == item.src or path.startswith(item.src.rstrip("/") + "/")):
                return spec
    return None


def _source_problem(exc: CopyError, host: str, specs: Sequence["ComponentSpec"]) -> RunnerError:
    """A local source found unusable while planning (before any host is touched), at the
    ``files`` of the component that names it: a source missing or unreadable (in a directory
    given) is a copy error, exit 4, as one named directly is; two different sources for one
    destination (the later component's files, the other named) a config mistake, exit 2."""
    sources = getattr(exc, "sources", None)
    spec = _spec_of(sources[1] if sources else exc.path, specs)
    other = _spec_of(sources[0], specs) if sources else None
    message = exc.message + ("" if exc.path is None or sources else f": {exc.path}")
    if sources and other is not None and spec is not None and other.name != spec.name:
        message += (f" (the first from component {other.name!r} at "
                    f"{other.origin_of('files')}, both on host {host})")
    if spec is None:
        return exc
    where = spec.origin_of("files")
    if not sources:
        from remote_runner.config import SourceError
        return SourceError(message, path=exc.path, file=where.file, line=where.line,
                           component=spec.name)
    return ConfigError(message, file=where.file, line=where.line, component=spec.name,
                       field="files")


def _copy_summary(reports: Dict[str, "sync.HostSync"]) -> str:
    """One line for the whole copy phase."""
    copied = sum(len(r.copied) for r in reports.values())
    unchanged = sum(len(r.skipped) for r in reports.values())
    size = sum(r.bytes for r in reports.values())
    return f"copied {copied} file(s) ({size} bytes), {unchanged} unchanged"


def _lane_opener(connection: "Connection") -> Callable[[], Any]:
    """Return a function opening one more SFTP channel on *connection* (for parallel uploads)."""
    def open_lane() -> Any:
        if hasattr(connection, "open_sftp"):
            return connection.open_sftp()
        import paramiko
        return paramiko.SFTPClient.from_transport(connection.transport)
    return open_lane


def run(experiment: "Experiment", options: RunOptions, ssh_options: Optional["SSHOptions"] = None,
        **kwargs: Any) -> RunReport:
    """Run *experiment*; see :class:`Runner`."""
    return Runner(experiment, options, ssh_options, **kwargs).run()
