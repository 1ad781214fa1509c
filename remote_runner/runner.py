"""Run an experiment: connect, prepare, copy, start in order, wait, optionally terminate.

The sequence per run (each step finishes on every host before the next begins,
and inside a step hosts are handled in parallel, at most ``forks`` at once):

1. **Check locally** everything that can be checked without a host (session
   name, sources, destination conflicts), so bad input changes nothing anywhere.
2. **Connect** to every remote host (``localhost`` components need no SSH).
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
scripts serve both.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from remote_runner import events as ev
from remote_runner import hostops, landing, precheck
from remote_runner import screen as scr
from remote_runner import sync
from remote_runner import upload
from remote_runner.errors import (ComponentFailed, ConfigError, ConnectionLost, CopyError,
                                   PartialRun, PrerequisitesUnreachable, StartError,
                                   control_characters)
from remote_runner.runmodel import (  # noqa: F401 - re-exported: the runner's API
    ComponentResult, MirrorFactory, MirrorSession, Placement, RunOptions, RunReport,
    component_argv, default_mirror_factory, path_lookup,
)
from remote_runner.runrecord import (ComponentRecord, HostRecord, RunRecord, component_record,
                                     host_record, new_run_id, utc_now)
from remote_runner.shell import LocalShell, RemoteShell, ScriptResult, Shell  # noqa: F401 (API)
from remote_runner.shell import shell_path as _shell_path

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec, Experiment
    from remote_runner.ssh import Connection, SSHOptions

LOG = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "~/.remote-runner/{screen}"
#: Longest a single wait-poll command runs on a host before reporting back.
POLL_SLICE = 15.0


# --------------------------------------------------------------------------- the run

class Runner:
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
        self.locks: Dict[str, hostops.SessionLock] = {}
        #: per host: the change check asked with its lock (kept only when its answer is usable)
        self.early: Dict[str, precheck.EarlyCheck] = {}
        #: per host: the shell text writing its launchers (run by its first start command)
        self._setup: Dict[str, str] = {}
        self._record_lock = threading.Lock()

    # -- public -------------------------------------------------------------

    def run(self) -> RunReport:
        """Carry out the whole run; raise a RunnerError subclass on the first failing step."""
        self.preflight()
        hosts = len(self._by_host())
        try:
            with ev.phase(self.events, "connect", hosts) as info:
                self.connect()
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

    def close(self) -> None:
        """Release the session locks, the mirror and every connection."""
        for lock in self.locks.values():
            lock.release()
        self.locks = {}
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
        self.count_traffic()
        for connection in self.connections.values():
            connection.close()
        self.connections = {}

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
        """Check everything that needs no host, so that bad input changes nothing."""
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
            for item in spec.files:
                if not os.path.exists(item.src):
                    raise CopyError("local source does not exist", path=item.src,
                                    component=spec.name)
        self._group_hosts()
        for host, specs in self._by_host().items():
            entries = [(f, spec.base_dir or f"/<temporary base_dir of {spec.name}>")
                       for spec in specs for f in spec.files]
            sync.make_plan(host, entries)  # raises on unreadable or conflicting sources

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
            for connection in self.connections.values():
                connection.close()
            self.connections = {}
            raise PrerequisitesUnreachable({h: str(e) for h, e in failed.items()}, reasons)

    def lock(self) -> None:
        """Take the per-(host, session) lock on every host before any host is changed."""
        info = (f"pid {os.getpid()} on {self.record.runner.get('host')}, run {self.run_id}, "
                f"since {self.record.created}")

        for host, specs in self._by_host().items():
            if host != "localhost":
                check = precheck.plan_ahead(host, specs, self.options.always_copy,
                                            self.options.rehash)
                if check is not None:
                    self.early[host] = check

        def take(host: str) -> None:
            connection = None if host == "localhost" else self.connections[host]
            check = self.early.get(host)
            self.locks[host] = hostops.acquire_lock(
                host, self._state_dir(), info, connection, then=self._prepare_script(host),
                fed=check.script if check else "", feed=check.request if check else b"")
        self._parallel(take, list(self._by_host()), "taking the session lock")

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

    def prepare(self) -> None:
        """Check for screen and create state and base directories on each host (nothing is stopped).

        The commands ran on the lock's channel as soon as each lock was held
        (:meth:`lock`): this reads what they said.
        """
        for host in self._by_host():
            lock = self.locks[host]
            if lock.then_status is None:
                raise ConnectionLost(host, "the SSH connection was lost while preparing it "
                                     f"(no answer after taking the session lock: "
                                     f"{lock.then_output.strip()[-200:] or 'nothing'})",
                                     "check the host and the network, then run again")
            self._prepared(host, ScriptResult(
                -1 if lock.then_status is None else lock.then_status, lock.then_output,
                lock.then_output))
            check = self.early.pop(host, None)
            if check is not None:
                check.take(lock.then_output)
                if check.usable({p.spec.key: p.base_dir for p in self.placements[host]}):
                    self.early[host] = check

    def copy(self) -> None:
        """Copy every remote component's files (nothing for localhost)."""
        jobs = []
        for host, places in self.placements.items():
            entries = [(f, p.base_dir) for p in places for f in p.spec.files]
            if host == "localhost" or not entries:
                continue
            connection = self.connections[host]
            check = self.early.get(host)
            plan = check.plan if check else sync.make_plan(host, entries)
            jobs.append((self.shells[host], connection.sftp, plan))
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
                                                  if c.answer is not None})
        for host in sorted(self.report.sync):
            done = self.report.sync[host]
            self._say(ev.KIND_COPY_DONE, host, done.summary().split(": ", 1)[-1],
                      copied=len(done.copied), unchanged=len(done.skipped), bytes=done.bytes)

    def write_launchers(self) -> None:
        """Build every component's launcher; they are written by each host's first start command."""
        mirrored = [p.spec for places in self.placements.values() for p in places if p.spec.mirror]
        if mirrored:
            by_name = {name: self.connections[group] for name, group in self.host_of.items()
                       if group in self.connections}
            self.mirror = self.mirror_factory({**by_name, **self.connections}, mirrored)
        self._setup = {host: self._launcher_setup(host) for host in self.placements}

    def start_all(self) -> None:
        """Start components by start_index, one confirmed wave at a time: one command per host.

        A host's first command also writes the launchers of all its waves and
        replaces the previous session (or adopts it with ``--no-kill``) — only
        now, once every host is prepared and every copy is complete, so a run
        that cannot start leaves the last good experiment running. Hosts with
        nothing in the first wave do that in parallel with it.
        """
        waves: Dict[Any, List[Placement]] = {}
        for places in self.placements.values():
            for place in places:
                waves.setdefault(place.spec.start_index, []).append(place)
        pending = set(self.placements)  # hosts whose session is not replaced yet
        for index in sorted(waves):
            by_host: Dict[str, List[Placement]] = {host: [] for host in pending}
            for place in waves[index]:
                by_host.setdefault(self._group_of(place.spec), []).append(place)
            self._say(ev.KIND_NOTE, None, f"starting index {index}: " + ", ".join(
                f"{p.spec.host}:{p.spec.name}" for p in waves[index]))
            first = set(pending)
            pending = set()
            self._parallel(lambda host: self._start_on_host(host, by_host[host], host in first),
                           list(by_host), f"starting index {index}", by_host)

    def wait_all(self) -> None:
        """Block until every wait (and mirrored) component has exited, or the wait timeout."""
        waited = self._waited()
        if not waited:
            return
        deadline = (None if self.options.wait_timeout is None
                    else time.monotonic() + self.options.wait_timeout)
        for host, places in waited.items():
            for place in places:
                self._say(ev.KIND_COMPONENT_WAITING, host, component=place.spec.name,
                          level=logging.DEBUG, log_file=place.window.log_file)
        self._say(ev.KIND_NOTE, None, "waiting for " + ", ".join(
            f"{p.spec.host}:{p.spec.name}" for ps in waited.values() for p in ps))
        from remote_runner.tails import LogTailer
        tailer = LogTailer(self.shells, waited, self.events, self.options.tail_logs)
        try:
            self._parallel(lambda host: self._wait_on_host(host, waited[host], deadline),
                           list(waited), "waiting", waited)
        finally:
            tailer.stop()

    def terminate(self) -> None:
        """Stop every non-wait component, and waited ones still running (timeout, Ctrl-C).

        Each is stopped by signalling its window's process group.
        """
        targets = {host: [p for p in places
                          if (not p.spec.wait and not p.spec.mirror)
                          or (self.report.components[p.spec.key].status is None
                              and self.report.components[p.spec.key].pid is not None)]
                   for host, places in self.placements.items()}
        targets = {h: ps for h, ps in targets.items() if ps}
        if not any(p.spec.wait for ps in self.placements.values() for p in ps):
            LOG.warning("--terminate: no component has wait=True, so nothing marks the end of "
                        "the run; leaving components running")
            return
        if targets:
            self._parallel(lambda host: self._terminate_on_host(host, targets[host]),
                           list(targets), "stopping", targets)

    # -- per host -----------------------------------------------------------

    def _prepare_script(self, host: str) -> str:
        """Return the script resolving the state dir and base dirs on *host* (screen checked)."""
        specs = self._by_host()[host]
        state = self._state_dir()
        # cd -P leaves the physical path in $PWD: no fork per component, as $(pwd -P) was
        lines = [f"command -v screen >/dev/null 2>&1 || exit {_NO_SCREEN}",
                 f"d={_shell_path(state)}",
                 'mkdir -p "$d" && cd -P "$d" && echo "STATE $PWD" || exit 3',
                 hostops.prepare_run_script('"$d"', self.run_id)]
        seen = set()
        for i, spec in enumerate(specs):
            if spec.base_dir is None and not spec.is_local:
                lines.append(f'b=$(mktemp -d) && echo "BASE {i} $b" || exit 4')
                continue
            q = shlex.quote(spec.base_dir or self.invocation_dir)
            made = "" if q in seen else f"mkdir -p {q} && "
            seen.add(q)
            lines.append(f'{made}cd -P {q} && echo "BASE {i} $PWD" || exit 4')
        return "\n".join(lines) + "\n"

    def _prepared(self, host: str, result: ScriptResult) -> None:
        """Take in what *host*'s prepare script said: state dir, base dirs, its screen."""
        shell = self.shells[host]
        specs = self._by_host()[host]
        state = self._state_dir()
        found = _parse_prepare(result.stdout)
        if result.exit_status == _NO_SCREEN:
            raise StartError(f"host {host}: GNU screen is not installed (or not on PATH); install "
                             "it there (Debian: apt-get install screen); nothing was changed")
        if "STATE" not in found or result.exit_status != 0:
            what = "base directories" if result.exit_status == 4 else f"state directory {state}"
            raise StartError(f"host {host}: could not create {what}: "
                             f"{result.stderr.strip() or result.stdout.strip()}")
        state_dir = found["STATE"]
        run_dir = hostops.run_dir(state_dir, self.run_id)
        self.report.state_dirs[host] = state_dir
        self.record.hosts[host] = self._host_record(host, state_dir, run_dir)
        self.screens[host] = scr.Screen(shell, self.options.screen, state_dir,
                                        zombie=self.options.zombie,
                                        start_timeout=self.options.start_timeout, log_dir=run_dir)
        places = []
        for i, spec in enumerate(specs):
            base = found[f"BASE {i}"]
            temp_base = spec.base_dir is None and not spec.is_local
            if spec.base_dir is None:
                self._say(ev.KIND_NOTE, host, f"base dir of {spec.name} is {base}",
                          level=logging.DEBUG)
            window = scr.Window(spec.name, scr.file_stem(spec.name), run_dir)
            places.append(Placement(spec, base, window, temp_base))
            self.report.components[spec.key] = ComponentResult(host, spec.name, base)
        self.placements[host] = places

    def _launcher_setup(self, host: str) -> str:
        """Return the shell text writing *host*'s launchers (builtins only, no fork per window)."""
        parts, stale = [], []
        for place in self.placements[host]:
            lookup = None
            if place.spec.mirror and self.mirror is not None:
                argv = self.mirror.argv(place.spec, place.base_dir)
            else:
                argv = component_argv(place.spec)
                lookup = path_lookup(place.spec)
            w = place.window
            stale += [w.status_file, w.pid_file, w.log_file, w.win_file]
            text = scr.launcher_text(w, argv, place.base_dir, place.spec.name,
                                     env=place.spec.env, lookup=lookup)
            parts.append(scr.printf_write(w.launcher, text, on_error=scr.SETUP_FAILED))
        # the run's directory is new; a reused --run-id may have left state files
        return f"rm -f {' '.join(shlex.quote(f) for f in stale)}\n" + "".join(parts)

    def _start_on_host(self, host: str, places: List[Placement], first: bool) -> None:
        """Open the windows of *places* on *host*, confirm them healthy, record their pids.

        One command: on the host's *first* one, the launchers are written and
        the previous session replaced before the windows open.
        """
        session = self.screens[host]
        checks = [hostops.HealthCheck(p.window, p.base_dir, p.spec.ready, p.spec.ready_timeout,
                                      p.spec.wait or p.spec.mirror) for p in places]
        replace = None
        if first:
            replace = "kill" if self.options.kill_first else "adopt"
        wave = session.start_wave([p.window for p in places],
                                  setup=self._setup.get(host, "") if first else "",
                                  replace=replace,
                                  health=hostops.health_script(checks, self.options.settle)
                                  if checks else "",
                                  grace=self.options.terminate_grace,
                                  extra_time=hostops.health_time(checks, self.options.settle))
        for old in wave.quit:
            self._say(ev.KIND_NOTE, host, f"quit previous screen session {old}")
        if wave.adopted:
            self._say(ev.KIND_NOTE, host,
                      f"adding windows to existing screen session {session.session_id}")
        self.report.session[host] = session.session_id or ""
        self.record.hosts[host].session = session.session_id or ""
        if not places:
            return
        for place in places:
            result = self.report.components[place.spec.key]
            result.pid = wave.pids[place.window.stem]
            self._component_record(host, place).started = utc_now()
        self._judge(host, places, hostops.parse_health(wave.stdout, checks))
        for place in places:
            result = self.report.components[place.spec.key]
            self._say(ev.KIND_COMPONENT_STARTED, host,
                      f"started {place.spec.name} (pid {result.pid}) in screen session "
                      f"{session.session_id}", component=place.spec.name, pid=result.pid,
                      start_index=place.spec.start_index, session=session.session_id)

    def _judge(self, host: str, places: List[Placement], health: Dict[str, hostops.Health]) -> None:
        """Record the health verdicts of *places*; raise ComponentUnhealthy for the first failure."""
        records = [self._component_record(host, p) for p in places]
        failures = hostops.judge(host, records, health)
        by_name = {p.spec.name: p for p in places}
        for failure in failures:
            result = self.report.components[by_name[failure.component].spec.key]
            result.status = self.record.component(host, failure.component).exit_status
            result.failure = failure.reason
        if failures:
            for extra in failures[1:]:
                LOG.error("%s", extra)
            raise failures[0]

    def _wait_on_host(self, host: str, places: List[Placement], deadline: Optional[float]) -> None:
        """Poll *host* until every component in *places* has a status (or the deadline)."""
        pending = {p.window.stem: p for p in places}
        while pending:
            slice_ = POLL_SLICE
            if deadline is not None:
                slice_ = min(slice_, max(0.0, deadline - time.monotonic()))
            states = self._poll_status(host, list(pending.values()), slice_)
            for stem, (state, value) in states.items():
                place = pending.get(stem)
                if place is None or state == "RUNNING":
                    continue
                self._record_end(host, place, state, value)
                del pending[stem]
            if pending and deadline is not None and time.monotonic() >= deadline:
                for place in pending.values():
                    result = self.report.components[place.spec.key]
                    result.failure = (f"still running after --wait-timeout "
                                      f"{self.options.wait_timeout:g} s")
                    self._say(ev.KIND_COMPONENT_ENDED, host,
                              f"{place.spec.name} {result.failure}", level=logging.ERROR,
                              component=place.spec.name, status=None, failure=result.failure,
                              waited=True)
                return

    def _record_end(self, host: str, place: Placement, state: str, value: str) -> None:
        """Store and log how one waited component ended."""
        result = self.report.components[place.spec.key]
        rec = self._component_record(host, place)
        rec.ended = utc_now()
        if state == "DONE":
            result.status = int(value) if value.lstrip("-").isdigit() else None
            rec.exit_status = result.status
            rec.state = ("exited ?" if result.status is None
                         else hostops.describe_status(result.status))
        else:
            rec.state = "missing"
        if state == "DONE":
            if result.status == 0:
                self._say(ev.KIND_COMPONENT_ENDED, host, f"{place.spec.name} exited with status 0",
                          component=place.spec.name, status=0, failure=None,
                          waited=place.spec.wait)
                return
            failure = f"exited with status {value}" + (
                " (command not found)" if result.status == 127 else "")
        else:
            failure = "its window ended without recording an exit status"
        if place.spec.wait:
            result.failure = failure
        self._say(ev.KIND_COMPONENT_ENDED, host, f"{place.spec.name} {failure}",
                  level=logging.ERROR if place.spec.wait else logging.WARNING,
                  component=place.spec.name, status=result.status, failure=failure,
                  waited=place.spec.wait)

    def _poll_status(self, host: str, places: List[Placement], seconds: float
                     ) -> Dict[str, Tuple[str, str]]:
        """Run one bounded poll on *host*; return stem -> (DONE|GONE|RUNNING, value)."""
        return scr.poll_windows(self.shells[host], [p.window for p in places], seconds)

    def _terminate_on_host(self, host: str, places: List[Placement]) -> None:
        """Stop the windows of *places* by process group (TERM, then KILL after the grace)."""
        killed = scr.stop_windows(self.shells[host], [p.window for p in places],
                                  self.options.terminate_grace)
        for place in places:
            self.report.components[place.spec.key].terminated = True
            rec = self._component_record(host, place)
            if rec.ended is None:
                rec.state, rec.ended = "stopped", utc_now()
            self._say(ev.KIND_COMPONENT_TERMINATED, host, f"terminated {place.spec.name}",
                      component=place.spec.name)
        if killed:
            self._say(ev.KIND_NOTE, host, f"{', '.join(killed)} ignored SIGTERM and got SIGKILL",
                      level=logging.WARNING)

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

    def _waited(self) -> Dict[str, List[Placement]]:
        """Return, per host, the components a run waits for (wait=True or mirrored)."""
        waited = {host: [p for p in places if p.spec.wait or p.spec.mirror]
                  for host, places in self.placements.items()}
        return {h: ps for h, ps in waited.items() if ps}

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


#: Exit status of the prepare script on a host without GNU screen.
_NO_SCREEN = 5


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


def _parse_prepare(stdout: str) -> Dict[str, str]:
    """Parse ``STATE path`` / ``BASE i path`` lines of the prepare script."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("STATE "):
            found["STATE"] = line[6:]
        elif line.startswith("BASE "):
            _, index, path = line.split(" ", 2)
            found[f"BASE {index}"] = path
    return found


def run(experiment: "Experiment", options: RunOptions, ssh_options: Optional["SSHOptions"] = None,
        **kwargs: Any) -> RunReport:
    """Run *experiment*; see :class:`Runner`."""
    return Runner(experiment, options, ssh_options, **kwargs).run()
