"""Before anything starts on a host: its session lock, directories, change check and launchers.

A run changes nothing on a host until every host is ready to start, so the
first thing each host gets is one exec that takes the per-(host, session) lock
(a second run with the same ``--screen`` is refused while this one runs) and,
on that same channel once the lock is held, the *prepare* script: GNU screen
is there, the state directory and this run's directory exist, each
component's base_dir is made (``mktemp -d`` when the config gave none; a
``localhost`` component without one runs, as in SPAR, in the directory
remote_runner was started from) and resolved to its physical path. The
manifest's change check rides on the same channel after it
(:mod:`remote_runner.precheck`). The launchers are built here too, as text
that the host's first start command writes (:mod:`remote_runner.wave`).

:class:`HostSetup` is that part of the :class:`~remote_runner.runner.Runner`.
"""

from __future__ import annotations

import logging
import os
import shlex
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from remote_runner import events as ev
from remote_runner import hostops, precheck, sessionlock, sync
from remote_runner import screen as scr
from remote_runner.errors import ConnectionLost, StartError
from remote_runner.runmodel import ComponentResult, Placement, component_argv, path_lookup
from remote_runner.shell import ScriptResult
from remote_runner.shell import shell_path as _shell_path

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec
    from remote_runner.mirror.session import MirrorSession
    from remote_runner.runmodel import RunOptions, RunReport
    from remote_runner.runrecord import HostRecord, RunRecord
    from remote_runner.shell import Shell
    from remote_runner.ssh import Connection

#: Exit status of the prepare script on a host without GNU screen.
_NO_SCREEN = 5


class HostSetup:
    """Locking and preparing hosts, and building launchers (mixed into the runner)."""

    options: "RunOptions"
    report: "RunReport"
    record: "RunRecord"
    run_id: str
    invocation_dir: str
    connections: Dict[str, "Connection"]
    shells: Dict[str, "Shell"]
    screens: Dict[str, scr.Screen]
    placements: Dict[str, List[Placement]]
    locks: Dict[str, sessionlock.SessionLock]
    early: Dict[str, precheck.EarlyCheck]
    plans: sync.PlanMemo
    ahead_memo: precheck.AheadMemo
    sent_ahead: Dict[str, Dict[str, str]]
    mirror: Optional["MirrorSession"]

    if TYPE_CHECKING:  # pragma: no cover - the runner provides these
        def _say(self, kind: str, host: Optional[str], message: str = "",
                 level: int = logging.INFO, component: Optional[str] = None,
                 **data: Any) -> None: ...

        def _parallel(self, func: Any, hosts: Any, doing: str = "",
                      places: Any = None) -> None: ...

        def _by_host(self) -> Dict[str, List["ComponentSpec"]]: ...

        def _state_dir(self) -> str: ...

        def _host_record(self, host: str, state_dir: str, run_dir: str) -> "HostRecord": ...

    def plan_checks(self) -> None:
        """Build each remote host's change check (its request, the files sent ahead): local work,
        done while the hosts connect (:meth:`Runner.connect_while`), before :meth:`lock`."""
        built: precheck.CheckMemo = {}
        for host, specs in self._by_host().items():
            if host != "localhost":
                check = precheck.plan_ahead(host, specs, self.options.always_copy,
                                            self.options.rehash, self.plans, self.ahead_memo,
                                            built)
                if check is not None:
                    self.early[host] = check

    def lock(self) -> None:
        """Take the per-(host, session) lock on every host before any host is changed."""
        info = (f"pid {os.getpid()} on {self.record.runner.get('host')}, run {self.run_id}, "
                f"since {self.record.created}")
        reached = self._by_host()
        for host in list(self.early):
            if host not in reached:
                del self.early[host]  # skipped: unreachable within --max-fail
            elif self.early[host].ahead:
                self.sent_ahead[host] = self.early[host].temporaries()

        def take(host: str) -> None:
            connection = None if host == "localhost" else self.connections[host]
            check = self.early.get(host)
            self.locks[host] = sessionlock.acquire_lock(
                host, self._state_dir(), info, connection, then=self._prepare_script(host),
                fed=check.script if check else "", feed=check.request if check else b"")
        self._parallel(take, list(self._by_host()), "taking the session lock")

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

    def on_lock(self, host: str) -> "Shell":
        """*host*'s shell for the steps whose failure ends the run (copy, start waves): their
        scripts run on the session lock's shell, one round trip each, while it is free."""
        lock = self.locks.get(host)
        shell = self.shells[host]
        return sessionlock.LockShell(lock, shell) if lock is not None else shell

    def _prepare_script(self, host: str) -> str:
        """Return the script resolving the state dir and base dirs on *host* (screen checked)."""
        specs = self._by_host()[host]
        state = self._state_dir()
        # cd -P leaves the physical path in $PWD: no fork per component, as $(pwd -P) was
        lines = [f"command -v screen >/dev/null 2>&1 || exit {_NO_SCREEN}",
                 f"d={_shell_path(state)}",
                 _made_dir('"$d"') + ' && cd -P "$d" && echo "STATE $PWD" || exit 3',
                 hostops.prepare_run_script('"$d"', self.run_id)]
        seen = set()
        for i, spec in enumerate(specs):
            if spec.base_dir is None and not spec.is_local:
                lines.append(f'b=$(mktemp -d) && echo "BASE {i} $b" || exit 4')
                continue
            q = shlex.quote(spec.base_dir or self.invocation_dir)
            made = "" if q in seen else _made_dir(q) + " && "
            seen.add(q)
            lines.append(f'{made}cd -P {q} && echo "BASE {i} $PWD" || exit 4')
        return "\n".join(lines) + "\n"

    def _prepared(self, host: str, result: ScriptResult) -> None:
        """Take in what *host*'s prepare script said: state dir, base dirs, its screen."""
        specs = self._by_host()[host]
        state = self._state_dir()
        found = _parse_prepare(result.stdout)
        if result.exit_status == _NO_SCREEN:
            raise StartError(f"host {host}: GNU screen is not installed (or not on PATH); install "
                             "it there (Debian: apt-get install screen); nothing was changed")
        if "STATE" not in found or result.exit_status != 0:
            what = f"state directory {state}"
            if result.exit_status == 4:  # the first base dir it did not report is the one
                failed = next((spec for i, spec in enumerate(specs) if f"BASE {i}" not in found), None)
                what = (f"base directory {failed.base_dir or '(temporary)'} of {failed.name}"
                        if failed is not None else "base directories")
            said = [line for line in (result.stderr.strip() or result.stdout.strip()).splitlines()
                    if not line.startswith(("STATE ", "BASE "))]  # (what it did report)
            raise StartError(f"host {host}: could not create {what}: {' '.join(said) or 'no message'}")
        state_dir = found["STATE"]
        run_dir = hostops.run_dir(state_dir, self.run_id)
        self.report.state_dirs[host] = state_dir
        self.record.hosts[host] = self._host_record(host, state_dir, run_dir)
        self.screens[host] = scr.Screen(self.on_lock(host), self.options.screen, state_dir,
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
        # the run's directory is new; a reused --run-id may have left state files (tested
        # first with builtins: an rm costs the host a fork and an exec, mostly for nothing)
        words = " ".join(shlex.quote(f) for f in stale)
        return (f"for f in {words}; do if [ -e \"$f\" ] || [ -L \"$f\" ]; then rm -f {words}; break; "
                "fi; done\n" + "".join(parts))


def _made_dir(word: str) -> str:
    """Shell text making directory *word* (a quoted shell word) unless it is there: no fork when it is."""
    return f"{{ [ -d {word} ] || mkdir -p {word}; }}"


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
