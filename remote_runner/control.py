"""Commands on a recorded run: status, logs, stop, restart, fetch, attach.

Each function takes a :class:`~remote_runner.runrecord.RunRecord` and works on
the hosts it names, with the SSH settings it recorded (``-F``, user), never
evaluating the config again. Hosts are reached with one connection each, in
parallel; what to do on a host is in :mod:`remote_runner.hostops`, so ``run``
and these commands read and signal the very same files. Nothing here prints:
the CLI (``remote_runner.cli.lifecycle``) turns the results into output.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from remote_runner import hostops
from remote_runner.errors import RunnerError
from remote_runner.failpolicy import DEFAULT_FORKS
from remote_runner.loginshell import for_login_shell
from remote_runner.runrecord import ComponentRecord, RunRecord, utc_now
from remote_runner.screen import Stopped, Window
from remote_runner.shell import LocalShell, RemoteShell, Shell

LOG = logging.getLogger(__name__)


def ssh_options_for(record: RunRecord, ssh_config: Optional[str] = None,
                    password: Optional[str] = None, accept_new_host_keys: bool = False):
    """Return the SSH options the run used (``-F`` may be overridden)."""
    from remote_runner.ssh import SSHOptions
    return SSHOptions(ssh_config_file=ssh_config or record.ssh.get("config_file"),
                      user=record.ssh.get("user"), password=password,
                      accept_new_host_keys=accept_new_host_keys)


class Hosts:
    """Connections (or a local shell) to the hosts of a record, opened once, in parallel."""

    def __init__(self, record: RunRecord, ssh_options, hosts: Iterable[str]) -> None:
        self.record = record
        self.connections: Dict[str, object] = {}
        self.shells: Dict[str, Shell] = {}
        wanted = sorted(set(hosts))
        remote = [h for h in wanted if h != "localhost"]
        if remote:
            from remote_runner.ssh import connect_all
            self.connections = connect_all(remote, ssh_options)
        for host in wanted:
            self.shells[host] = (LocalShell() if host == "localhost"
                                 else RemoteShell(self.connections[host], host))

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()  # type: ignore[attr-defined]
        self.connections = {}

    def each(self, func: Callable[[str], object], hosts: Iterable[str]) -> Dict[str, object]:
        """Run *func(host)* for every host in parallel; raise the first error after all end."""
        hosts = sorted(set(hosts))
        results: Dict[str, object] = {}
        errors: List[BaseException] = []
        if not hosts:
            return results
        with ThreadPoolExecutor(max_workers=min(10, len(hosts))) as pool:
            futures = {h: pool.submit(func, h) for h in hosts}
            for host, future in futures.items():
                try:
                    results[host] = future.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)
        if errors:
            raise errors[0]
        return results


def window(record: RunRecord, comp: ComponentRecord) -> Window:
    """Return the window files of *comp* in its run's directory on its host."""
    return Window(comp.name, comp.stem, record.hosts[comp.host].run_dir)


def by_host(comps: Iterable[ComponentRecord]) -> Dict[str, List[ComponentRecord]]:
    grouped: Dict[str, List[ComponentRecord]] = {}
    for comp in comps:
        grouped.setdefault(comp.host, []).append(comp)
    return grouped


# --------------------------------------------------------------------------- status

@dataclass
class StatusRow:
    """One component's state now."""

    host: str
    name: str
    state: str
    pid: Optional[int]
    since: Optional[float]  # seconds the component has been running (None when not running)
    ended: Optional[int]  # host clock time it ended (epoch seconds)
    last_line: str

    @property
    def healthy(self) -> bool:
        return self.state in ("running", "exited 0")

    def to_json(self) -> Dict[str, object]:
        return {"host": self.host, "name": self.name, "state": self.state, "pid": self.pid,
                "uptime": self.since, "ended": self.ended, "last_line": self.last_line}


def status(record: RunRecord, ssh_options, names: Optional[List[str]] = None,
           hosts_filter: Optional[List[str]] = None, hosts: Optional[Hosts] = None
           ) -> List[StatusRow]:
    """Return one :class:`StatusRow` per selected component, in record order."""
    comps = record.select(names, hosts_filter)
    grouped = by_host(comps)
    own = hosts is None
    hosts = hosts or Hosts(record, ssh_options, grouped)
    try:
        states = hosts.each(lambda h: hostops.inspect(
            hosts.shells[h], [window(record, c) for c in grouped[h]]), grouped)
    finally:
        if own:
            hosts.close()
    rows = []
    for comp in comps:
        st = states[comp.host].get(comp.stem)  # type: ignore[union-attr]
        if comp.pid is None and (st is None or (st.pid is None and st.status is None)):
            rows.append(StatusRow(comp.host, comp.name, "not started", None, None, None, ""))
            continue
        if st is None:
            rows.append(StatusRow(comp.host, comp.name, "missing", None, None, None, ""))
            continue
        uptime = (st.now - st.started) if (st.state == "running" and st.now and st.started) \
            else None
        rows.append(StatusRow(comp.host, comp.name, st.state, st.pid, uptime,
                              st.ended if st.status is not None else None, st.last_line))
    return rows


# --------------------------------------------------------------------------- stop

def stop(record: RunRecord, ssh_options, names: Optional[List[str]] = None,
         hosts_filter: Optional[List[str]] = None, grace: float = 10.0,
         hosts: Optional[Hosts] = None) -> Dict[str, Stopped]:
    """Stop the selected components; quit sessions left empty.

    Returns host -> what was found there: the windows that were running (and
    got SIGTERM) and those that needed SIGKILL, by stem.
    """
    comps = record.select(names, hosts_filter)
    grouped = by_host(comps)
    own = hosts is None
    hosts = hosts or Hosts(record, ssh_options, grouped)

    def on_host(host: str) -> Stopped:
        session = record.hosts[host].session
        return hostops.stop_windows(hosts.shells[host], [window(record, c) for c in grouped[host]],
                                    grace, [session] if session else [])
    try:
        found: Dict[str, Stopped] = hosts.each(on_host, grouped)  # type: ignore[assignment]
    finally:
        if own:
            hosts.close()
    now = utc_now()
    for comp in comps:
        outcome = found.get(comp.host)
        if outcome is not None and comp.stem in outcome.signalled:
            comp.state, comp.ended = "stopped", now
        elif comp.ended is None and outcome is not None:  # it had ended by itself, before now
            comp.state, comp.ended = "not running", now
    record.save()
    return found


# --------------------------------------------------------------------------- logs

def logs(record: RunRecord, ssh_options, names: Optional[List[str]], lines: int, follow: bool,
         emit: Callable[[str, str], None], stop_event: Optional[threading.Event] = None) -> None:
    """Give every log line of the selected components to *emit(label, line)*.

    Without *follow*: the last *lines* of each log, host by host. With it: one
    ``tail -F`` per host (one SSH connection each), lines passed on in the order
    they arrive, until *stop_event* is set or every stream ends.
    """
    comps = record.select(names)
    grouped = by_host(comps)
    with Hosts(record, ssh_options, grouped) as hosts:
        if not follow:
            got = hosts.each(lambda h: hostops.read_logs(
                hosts.shells[h], [window(record, c) for c in grouped[h]], lines), grouped)
            for host in sorted(grouped):
                names_of = {c.stem: c.name for c in grouped[host]}
                for stem, line in got[host]:  # type: ignore[union-attr]
                    emit(f"{host}/{names_of[stem]}", line)
            return
        _follow(record, hosts, grouped, lines, emit, stop_event or threading.Event())


def _follow(record: RunRecord, hosts: Hosts, grouped: Dict[str, List[ComponentRecord]],
            lines: int, emit: Callable[[str, str], None], stop_event: threading.Event) -> None:
    """Stream ``tail -F`` from every host into one queue and emit in arrival order."""
    out: "queue.Queue[Optional[Tuple[str, str]]]" = queue.Queue()
    streams = []
    for host, comps in grouped.items():
        windows = [window(record, c) for c in comps]
        names_of = {c.stem: c.name for c in comps}
        command = hostops.tail_command(windows, lines, True)
        if host == "localhost":
            import subprocess
            proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL)
            read, close = (lambda p=proc: os.read(p.stdout.fileno(), 65536)), proc.kill
        else:
            channel = hosts.connections[host].exec_channel(  # type: ignore[attr-defined]
                "sh -c " + shlex.quote(command))
            read, close = channel.recv, channel.close
        streams.append(close)

        def pump(host=host, read=read, windows=windows, names_of=names_of) -> None:
            splitter = hostops.LogSplitter(windows)
            try:
                while True:
                    data = read(65536)
                    if not data:
                        break
                    for stem, line in splitter.feed(data):
                        out.put((f"{host}/{names_of[stem]}", line))
            except (OSError, EOFError):
                pass
            finally:
                out.put(None)
        threading.Thread(target=pump, daemon=True).start()
    alive = len(streams)
    try:
        while alive and not stop_event.is_set():
            try:
                item = out.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                alive -= 1
                continue
            emit(*item)
    finally:
        for close in streams:
            try:
                close()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------- attach

def attach_argv(record: RunRecord, comp: ComponentRecord) -> List[str]:
    """Return the command that attaches a terminal to *comp*'s window.

    ``ssh -t`` with the run's ssh_config and user, running ``screen -r SESSION
    -p TITLE`` (the window is selected by its title, the component name); for
    ``localhost``, screen itself.
    """
    session = record.hosts[comp.host].session
    if not session:
        raise RunnerError(f"component {comp.label} has no screen session in run "
                          f"{record.run_id} (it was never started)")
    screen = ["screen", "-r", session, "-p", comp.name]
    if comp.host == "localhost":
        return screen
    argv = ["ssh", "-t"]
    if record.ssh.get("config_file"):
        argv += ["-F", str(record.ssh["config_file"])]
    if record.ssh.get("user") and "@" not in comp.host:
        argv += ["-l", str(record.ssh["user"])]
    return argv + [comp.host, for_login_shell(shlex.join(screen))]


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    """Poll *predicate* until true or *timeout* seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


# --------------------------------------------------------------------------- restart

def restart(record: RunRecord, ssh_options, names: List[str], grace: float = 10.0,
            settle: float = 1.0, start_timeout: float = 30.0, forks: int = DEFAULT_FORKS
            ) -> Dict[str, int]:
    """Stop, re-copy what changed, start again in the run's session; return label -> new pid.

    The other components are not touched. Health rules are those of ``run``:
    alive after *settle* seconds or ready, else :class:`ComponentUnhealthy`.
    """
    from remote_runner import screen as scr
    from remote_runner import sync
    from remote_runner.config import FileSpec
    from remote_runner.errors import StartError

    comps = record.select(names)
    for comp in comps:
        if comp.mirror:
            raise StartError(f"component {comp.label} runs in the mirror and cannot be restarted "
                             "on its own; start the run again")
    grouped = by_host(comps)
    new_pids: Dict[str, int] = {}
    with Hosts(record, ssh_options, grouped) as hosts:
        hosts.each(lambda h: hostops.stop_windows(
            hosts.shells[h], [window(record, c) for c in grouped[h]], grace), grouped)
        jobs = []
        for host, group in grouped.items():
            entries = [(FileSpec(src, dest, bool(is_dir)), c.base_dir)
                       for c in group for src, dest, is_dir in c.files]
            if host != "localhost" and entries:
                connection = hosts.connections[host]
                jobs.append((hosts.shells[host], connection.sftp,  # type: ignore[attr-defined]
                             sync.make_plan(host, entries)))
        if jobs:
            for host, done in sync.sync_all(jobs, forks).items():
                LOG.info("%s", done.summary())

        def on_host(host: str) -> None:
            h = record.hosts[host]
            session = scr.Screen(hosts.shells[host], record.screen, h.state_dir,
                                 start_timeout=start_timeout, log_dir=h.run_dir)
            session.session_id = h.session or None
            windows = [window(record, c) for c in grouped[host]]
            checks = [hostops.HealthCheck(w, c.base_dir, c.ready, c.ready_timeout, c.wait, c.settle)
                      for c, w in zip(grouped[host], windows)]
            wave = session.start_wave(
                windows, setup=_restart_setup(grouped[host], windows, h.run_dir), replace="adopt",
                before_open=_unlog_old_windows(h.session),
                health=_close_old_windows(windows, h.session) + hostops.health_script(checks, settle),
                extra_time=hostops.health_time(checks, settle))
            h.session = session.session_id or h.session
            now = utc_now()
            for comp in grouped[host]:
                comp.pid, comp.started, comp.ended = wave.pids[comp.stem], now, None
                comp.exit_status, comp.state = None, "starting"
                new_pids[comp.label] = comp.pid
            failures = hostops.judge(host, grouped[host], hostops.parse_health(wave.stdout, checks))
            if failures:
                raise failures[0]
        try:
            hosts.each(on_host, grouped)
        finally:
            record.save()
    return new_pids


def _restart_setup(comps: List[ComponentRecord], windows: List[Window], run_dir: str) -> str:
    """Return shell text rewriting the launchers of *comps* and putting their old logs aside.

    The previous log is kept (renamed with the time), and the number of each
    old window is remembered in ``$rr_old`` so it is closed once the new one
    runs (closing it first could end a session that has no other window).
    Runs from before logs were named per component linked ``<stem>.log`` to
    ``window-N.log``; both kinds are handled.
    """
    from remote_runner import screen as scr
    q = shlex.quote
    parts = ["rr_old=\n"]
    for comp, win in zip(comps, windows):
        argv, lookup = launch_argv(comp)
        parts.append(scr.heredoc_write(win.launcher, scr.launcher_text(
            win, argv, comp.base_dir, comp.name, env=sorted(comp.env.items()), lookup=lookup),
            on_error=scr.SETUP_FAILED))
        log, stamp = q(win.log_file), "$(date +%Y%m%d-%H%M%S)"
        parts.append(f"n=; {{ read -r n < {q(win.win_file)}; }} 2>/dev/null\n"
                     f"if t=$(readlink {log}); then n=${{t#window-}}; n=${{n%.log}}; "
                     f"mv -f {q(run_dir)}/\"$t\" {log}.{stamp}; rm -f {log}\n"
                     f"elif [ -e {log} ]; then mv -f {log} {log}.{stamp}; fi\n"
                     'case $n in ""|*[!0-9]*) ;; *) rr_old="$rr_old $n";; esac\n'
                     f"rm -f {q(win.pid_file)} {q(win.status_file)} {q(win.win_file)}\n")
    return "".join(parts)


def _unlog_old_windows(session: str) -> str:
    """Return shell text ending the logging of the windows in ``$rr_old`` (in *session*).

    Screen shares one open log between windows that name the same file, so a
    new window logging to ``<stem>.log`` would write into the old window's
    (renamed) log while that one still has it open.
    """
    return (f'if [ "$sid" = {shlex.quote(session)} ]; then for n in $rr_old; do '
            'screen -S "$sid" -p "$n" -X log off >/dev/null 2>&1; done; fi\n')


def _close_old_windows(windows: List[Window], session: str) -> str:
    """Return shell text closing the windows in ``$rr_old`` that no new window now uses.

    Only in *session*, the one they ran in (a new session holds only new windows).
    """
    news = " ".join(shlex.quote(w.win_file) for w in windows)
    return (f'if [ -n "$rr_old" ] && [ "$sid" = {shlex.quote(session)} ]; then\n'
            '  rr_new=" $(cat ' + news + ' 2>/dev/null | tr "\\n" " ")"\n'
            '  for n in $rr_old; do case "$rr_new" in *" $n "*) ;; *) '
            'screen -S "$sid" -p "$n" -X kill >/dev/null 2>&1;; esac; done\nfi\n')


def launch_argv(comp: ComponentRecord) -> Tuple[List[str], Optional[str]]:
    """Return (argv, PATH-lookup name) for *comp*, as ``run`` builds them."""
    exe = comp.executable
    if "/" not in exe:
        return ["./" + exe, *comp.args], exe
    return [exe, *comp.args], None


# --------------------------------------------------------------------------- fetch

def fetch(record: RunRecord, ssh_options, names: Optional[List[str]] = None,
          hosts_filter: Optional[List[str]] = None, progress=None,
          dest_root: Optional[str] = None) -> Dict[str, "object"]:
    """Copy the selected components' results and logs next to the run record.

    Returns host -> :class:`~remote_runner.results.FetchReport`. A localhost
    component's results are read in place through a local shell and copied too.
    """
    from remote_runner import results

    comps = record.select(names, hosts_filter)
    grouped = by_host(comps)
    root = dest_root or record.directory or os.path.dirname(record.path)
    with Hosts(record, ssh_options, grouped) as hosts:
        def on_host(host: str) -> object:
            items = [(c.name, c.base_dir, c.results, window(record, c).log_file)
                     for c in grouped[host]]
            opener: Callable[[], object] = results.LocalReader if host == "localhost" else \
                functools.partial(results.SFTPReader, hosts.connections[host])
            return results.fetch_host(hosts.shells[host], opener, host, items, root, progress)
        return hosts.each(on_host, grouped)


# --------------------------------------------------------------------------- clean

def clean(record: RunRecord, ssh_options, hosts: Optional[Hosts] = None) -> Dict[str, List[str]]:
    """Remove a finished run's temporary base_dirs and its directory on every host.

    Refuses (naming them) while any of its components is still running. The
    record and fetched results on this machine stay. Returns host -> removed paths.
    """
    from remote_runner.errors import StartError

    rows = status(record, ssh_options)
    running = [f"{r.host}/{r.name}" for r in rows if r.state == "running"]
    if running:
        raise StartError(f"run {record.run_id} still has running components: "
                         f"{', '.join(running)}; `remote-runner stop --run {record.run_id}` first")
    grouped = by_host(record.components)

    def on_host(host: str) -> List[str]:
        h = record.hosts[host]
        paths = [c.base_dir for c in grouped[host] if c.temp_base and c.base_dir.startswith("/")
                 and c.base_dir.rstrip("/") not in ("", "/tmp", "/var/tmp")]
        if h.run_dir and f"/runs/{record.run_id}" in h.run_dir:
            paths.append(h.run_dir)
        if not paths:
            return []
        words = " ".join(shlex.quote(p) for p in paths)
        owned.shells[host].script(f"rm -rf -- {words}\n", timeout=300)
        return paths

    owned = hosts or Hosts(record, ssh_options, grouped)
    try:
        removed = owned.each(on_host, grouped)
    finally:
        if hosts is None:
            owned.close()
    return {h: v for h, v in removed.items() if v}  # type: ignore[misc]
