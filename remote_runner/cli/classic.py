"""SPAR's command line: ``remote_runner.py -c CONFIG [options]`` (also ``remote-runner run``).

Flags (SPAR's names, short forms and defaults, plus a few additions):

-c/--config FILE        the experiment config (Python, or YAML for .yaml/.yml), required
-m/--muddler FILE       a muddler: ``muddle(config)`` or ``muddle(config, options)``
-a/--arg-parser FILE    defines ``parse_args(extra_args, ssh_user)``; without --extra-args it
                        runs on empty extra args (a WARNING says so)
--extra-args "ARGS"     one string for the arg parser; may begin with '-' in either form,
                        ``--extra-args "-p X"`` or ``--extra-args=-p``
--hosts-from SOURCE     named host groups for the config, repeatable: ``slurm``
                        ($SLURM_JOB_NODELIST), ``slurm:FILE`` (``scontrol show hostnames``
                        output), ``ansible:INVENTORY`` (INI, YAML or ``ansible-inventory
                        --list`` JSON, no Ansible needed) or a FILE of host sets; Python
                        configs see ``hosts["group"]``/``hosts["all"]``, YAML ``on: group``
-u/--user USER          SSH user (wins over ssh_config's ``User``, as ``ssh -l`` does; ``user@host`` wins over it)
-p/--pass PASSWORD      SSH password / key passphrase (SPAR compatibility: visible in ``ps``;
                        prefer $REMOTE_RUNNER_PASSWORD or --ask-pass). However it is given,
                        configs see it as ``options.ssh_pass``; every line printed or logged
                        shows it as ``***``.
--ask-pass              prompt for the password
-F FILE                 ssh_config to read instead of ~/.ssh/config and /etc/ssh/ssh_config
--accept-new-host-keys  trust and record keys of hosts not yet in known_hosts (changed keys
                        are always refused)
--connect-timeout SEC   per-host connection timeout (default 10)
-f/--forks N            hosts handled at once (default 64)
--retries N             try an unreachable host N more times with backoff (default 2)
--max-fail K|P%         up to K hosts (or P% of them) may stay unreachable: reported, their
                        components skipped, the rest runs, exit 8 (default: all or nothing)
-l/--log-level LEVEL    DEBUG, INFO (default), WARNING or ERROR (SPAR's flag)
-v/-vv, -q/-qq          DEBUG lines naming their host (-vv: and paramiko's); warnings only
                        (-qq: errors only). On a terminal a live view per phase, else
                        ``HH:MM:SS LEVEL: host: message`` lines on stderr; then a recap on
                        stdout (``--json``: the run's result as JSON instead)
--screen NAME           screen session name on every host (default ``runner``)
--no-kill               keep the previous session and add this run's windows to it
--grace SEC             how long a stopped component gets between SIGTERM and SIGKILL, when
                        the previous session is replaced and with -t (default 10)
--no-zombie             let windows close when their program exits
--always-copy           upload every file even when the host already has it
--rehash                trust no remembered SHA-1 (the hosts' manifests, the local hash
                        cache): hash every file on both sides and rewrite them
--remote-done-dir DIR   where launchers, ``<name>.pid``/``.status``/``.log`` go on each host
                        (default ``~/.remote-runner/<screen>``; ``~`` is the remote home)
--wait-timeout SEC      give up waiting for wait=True components after SEC (exit 5)
-t/--terminate          after the waited components end, stop all other components
--no-terminate          do not (the default)
--dry-run               print the plan on stdout: each host's route and host key, each file
                        and why it would be copied (asking the hosts, read-only), each window
                        by start index; nothing is started or changed
--no-connect            with --dry-run: do not ask the hosts (files are "not checked")
--json                  the plan (--dry-run) or the run's result as JSON on stdout
--no-progress           never draw a progress display (neither does -l WARNING/ERROR,
                        TERM=dumb or NO_COLOR)
--python2, --python3    read the config, muddler and arg parser as Python 2 (translated in
                        memory) or as Python 3; default: Python 2 only for a file that does
                        not compile as Python 3 or uses names only Python 2 has
--version, -h/--help

``-t`` differs from SPAR: SPAR's flag was inverted (termination by ``killall`` was the
default and ``-t`` turned it *off*, contrary to its help text). Here ``-t`` turns
termination *on* and the default is off. Termination signals each window's process
group (SIGTERM, then SIGKILL after a grace period); nothing is killed by name. With no
wait=True component there is no "end" to wait for, so ``-t`` only logs a warning.

Exit codes: 0 ok; 1 internal error; 2 usage or config error (with file:line);
3 connection, host-key or authentication error; 4 copy error (a missing or unreadable
source, found before any host is touched; an upload failure); 5 a waited component failed or timed out; 6 start error (screen
session or window); 8 partial run (unreachable hosts skipped within --max-fail);
130 interrupted (Ctrl-C); 141 stdout's reader went away (| head); 143 terminated
(SIGTERM), unwound as an interrupt is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, List, Optional, Sequence

from remote_runner import __version__
from remote_runner.cli import EXIT_CODES_HELP, run_guarded, setup_logging
from remote_runner.cli.flags import seconds, seconds_or_zero
from remote_runner.errors import ConfigError
from remote_runner.failpolicy import DEFAULT_FORKS

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import Experiment
    from remote_runner.runner import RunOptions
    from remote_runner.runrecord import RunRecord
    from remote_runner.ssh import SSHOptions

LOG = logging.getLogger(__name__)

DESCRIPTION = ("Copy files to hosts and start components in GNU screen sessions, in "
               "start_index order (SPAR remote_runner compatible).")


class ClassicParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``--extra-args VALUE`` may start with '-'."""

    def parse_known_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                         namespace: Optional[argparse.Namespace] = None):
        """Parse *args* after joining ``--extra-args VALUE`` into one token."""
        return super().parse_known_args(join_extra_args(
            list(sys.argv[1:] if args is None else args)), namespace)

    def error(self, message: str):  # type: ignore[override]
        """Print the usage and one ``ERROR:`` line, like every other error, and exit 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"ERROR: {message}\n")


def join_extra_args(argv: List[str]) -> List[str]:
    """Turn ``--extra-args VALUE`` into ``--extra-args=VALUE`` so VALUE may begin with '-'."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return out + argv[i:]
        if token == "--extra-args" and i + 1 < len(argv):
            out.append("--extra-args=" + argv[i + 1])
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the classic flags (SPAR's dest names, so configs can read ``options.ssh_user``)."""
    add = parser.add_argument
    add("-c", "--config", dest="config_file", required=True, metavar="FILE",
        help="experiment config file (Python, or YAML: .yaml/.yml)")
    add("-m", "--muddler", dest="muddler", metavar="FILE", help="muddler file")
    add("-a", "--arg-parser", dest="arg_parser", metavar="FILE",
        help="arg parser file defining parse_args(extra_args, ssh_user); without --extra-args "
             "it runs on empty extra args (with a warning)")
    add("--extra-args", dest="extra_args", metavar="ARGS",
        help="one string of extra options for the arg parser (may start with '-')")
    add("--hosts-from", dest="hosts_from", action="append", default=[], metavar="SOURCE",
        help="host groups for the config (hosts[\"name\"]; YAML: on: name), repeatable: "
             "slurm ($SLURM_JOB_NODELIST), slurm:FILE (scontrol show hostnames output), "
             "ansible:INVENTORY (INI, YAML or ansible-inventory --list JSON), or FILE "
             "(host sets, one a line; group named after the file)")
    add("-u", "--user", dest="ssh_user", metavar="USER",
        help="SSH user: wins over ssh_config's User (a config's user@host wins over it)")
    add("-p", "--pass", dest="ssh_pass", metavar="PASSWORD",
        help="SSH password/passphrase (visible to other users; prefer "
             "$REMOTE_RUNNER_PASSWORD or --ask-pass)")
    add("--ask-pass", action="store_true", help="prompt for the SSH password")
    add("-F", dest="ssh_config", metavar="FILE", help="ssh_config file to use")
    add("--accept-new-host-keys", action="store_true",
        help="accept and record unknown host keys (changed keys are still refused)")
    add("--connect-timeout", type=seconds, default=10.0, metavar="SECONDS",
        help="connection timeout per host (default 10)")
    add("-f", "--forks", type=int, default=DEFAULT_FORKS, metavar="N",
        help=f"hosts handled at once (default {DEFAULT_FORKS})")
    add("--retries", type=int, default=2, metavar="N",
        help="try an unreachable host N more times, with backoff (default 2; 0: once)")
    add("--max-fail", dest="max_fail", metavar="K|P%",
        help="let up to K hosts (or P%% of them) stay unreachable: they are reported and "
             "their components skipped, the rest runs, exit 8 (default 0: all or nothing); "
             "never when they hold a whole start_index wave that later ones need, or every "
             "wait component: then nothing starts (exit 3)")
    add("-l", "--log-level", dest="log_level", default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO; SPAR's flag: -v/-q are the short forms)")
    add("-v", "--verbose", action="count", default=0,
        help="DEBUG lines, each naming its host; -vv adds paramiko's own protocol lines")
    add("-q", "--quiet", action="count", default=0,
        help="warnings and errors only (-qq: errors only); the recap is still printed")
    add("--screen", default="runner", metavar="NAME", help="screen session name (default runner)")
    add("--no-kill", dest="kill_first", action="store_false",
        help="keep the previous screen session and add windows to it")
    add("--grace", type=seconds, default=10.0, metavar="SECONDS",
        help="seconds between SIGTERM and SIGKILL when stopping components: the previous "
             "session's (unless --no-kill) and, with -t, the others (default 10)")
    add("--no-zombie", dest="no_zombie", action="store_true",
        help="close windows when their program exits")
    add("--always-copy", dest="always_copy", action="store_true",
        help="copy every file, even unchanged ones")
    add("--rehash", action="store_true",
        help="trust no remembered SHA-1: hash every file on this machine and on the hosts "
             "(ignoring the hosts' manifests and the local hash cache) and rewrite them")
    add("--remote-done-dir", dest="remote_done_dir", metavar="DIR",
        help="directory on each host for launchers, pid/status/log files "
             "(default ~/.remote-runner/<screen>)")
    add("--wait-timeout", type=seconds, metavar="SECONDS",
        help="fail (exit 5) if wait components run longer than this")
    add("-t", "--terminate", dest="terminate", action=argparse.BooleanOptionalAction, default=False,
        help="after the wait components end, stop the others by process group "
             "(SPAR's -t meant the opposite; default: off)")
    add("--dry-run", action="store_true",
        help="print the plan on stdout (routes, host keys, each file and why it would be "
             "copied, windows by index); asks the hosts, read-only; changes nothing")
    add("--no-connect", action="store_true",
        help="with --dry-run: a purely local plan (files are 'not checked')")
    add("--json", action="store_true",
        help="print the plan (--dry-run) or the run's result as one JSON document on stdout")
    add("--no-progress", action="store_true",
        help="no live view: plain 'HH:MM:SS LEVEL: host: message' lines even on a terminal "
             "(also with -q, -l WARNING or ERROR, TERM=dumb or NO_COLOR)")
    dialect = parser.add_mutually_exclusive_group()
    dialect.add_argument("--python2", dest="python", action="store_const", const="2",
                         help="read config, muddler and arg parser as Python 2 (translated in "
                              "memory, with Python 2 meaning)")
    dialect.add_argument("--python3", dest="python", action="store_const", const="3",
                         help="read them as Python 3 (default: Python 2 only for a file that "
                              "does not compile as Python 3 or uses names only Python 2 has)")
    add("--settle", type=seconds_or_zero, default=1.0, metavar="SECONDS",
        help="a component without `ready` counts as started when it is still alive this long "
             "after its start (default 1; a component's own `settle` wins); the next "
             "start_index waits for it")
    add("--only", nargs="+", metavar="COMPONENT|HOST",
        help="run only these components (name or host/name) or every component of these hosts")
    add("--fetch", action="store_true",
        help="after the waited components end, fetch results and logs (see `remote-runner fetch`)")


def build_parser(prog: str = "remote_runner.py") -> argparse.ArgumentParser:
    """Return the standalone classic parser."""
    parser = ClassicParser(prog=prog, description=DESCRIPTION, epilog=EXIT_CODES_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"remote_runner {__version__}")
    add_arguments(parser)
    return parser


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``remote-runner run`` (the same flags as remote_runner.py)."""
    parser = sub.add_parser("run", help="run an experiment config (SPAR remote_runner.py)",
                            description=DESCRIPTION, epilog=EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.__class__ = ClassicParser  # so `run --extra-args -x` works like remote_runner.py
    parser.add_argument("--version", action="version", version=f"remote_runner {__version__}")
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Load the experiment, run it and log the summary; return the exit code."""
    from remote_runner import console
    from remote_runner.loader import load_experiment
    from remote_runner import secrets
    from remote_runner.runner import RunOptions
    from remote_runner.ssh import SSHOptions, resolve_password

    # Plain timestamped lines until the run decides on its view (config errors, the plan).
    console.setup(console.choose(args.verbose, args.quiet, args.log_level, no_progress=True))
    if args.forks < 1:
        raise ConfigError("--forks must be at least 1", field="--forks")
    if args.retries < 0:
        raise ConfigError("--retries must be 0 or more", field="--retries")
    from remote_runner.failpolicy import FailLimit
    max_fail = FailLimit.parse(args.max_fail) if args.max_fail is not None else None
    for flag, value in (("--wait-timeout", args.wait_timeout),
                        ("--connect-timeout", args.connect_timeout),
                        ("--grace", args.grace)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be a positive number of seconds", field=flag)
    password = resolve_password(args.ssh_pass, args.ask_pass)
    secrets.register(password)
    args.ssh_pass = password  # configs read options.ssh_pass, however it was given (SPAR)
    from remote_runner import inventory
    args.host_groups = inventory.load(args.hosts_from)
    experiment = load_experiment(args.config_file, args, args.muddler, args.arg_parser,
                                 args.extra_args)
    if getattr(args, "only", None):
        experiment = only(experiment, args.only)
    settle = getattr(args, "settle", 1.0)
    if settle is None or settle < 0:
        raise ConfigError("--settle must be 0 or more seconds", field="--settle")
    options = RunOptions(screen=args.screen, kill_first=args.kill_first,
                         zombie=not args.no_zombie, terminate=args.terminate,
                         always_copy=args.always_copy, rehash=getattr(args, "rehash", False),
                         remote_done_dir=args.remote_done_dir,
                         wait_timeout=args.wait_timeout, terminate_grace=args.grace,
                         forks=args.forks, max_fail=max_fail,
                         settle=settle)
    ssh_options = SSHOptions(retries=args.retries, ssh_config_file=args.ssh_config, user=args.ssh_user,
                             password=password, accept_new_host_keys=args.accept_new_host_keys,
                             connect_timeout=args.connect_timeout, forks=args.forks)
    if args.no_connect and not args.dry_run:
        raise ConfigError("--no-connect only makes sense with --dry-run", field="--no-connect")
    if args.dry_run:
        return dry_run(experiment, options, ssh_options, connect=not args.no_connect,
                       as_json=args.json)
    return run_and_recap(experiment, options, ssh_options, args)


def run_and_recap(experiment: "Experiment", options: "RunOptions", ssh_options: "SSHOptions",
                  args: argparse.Namespace) -> int:
    """Run with the live view or plain lines, then print the recap (or the JSON result)."""
    import contextlib
    import dataclasses

    from remote_runner import console as out
    from remote_runner import events as ev
    from remote_runner import recap
    from remote_runner.errors import RunnerError
    from remote_runner.runner import Runner

    settings = out.choose(args.verbose, args.quiet, args.log_level, args.no_progress)
    view = None
    recorder = recap.Recorder()
    if settings.live:
        from rich.console import Console

        from remote_runner.live import LiveView
        screen = Console(stderr=True)
        out.setup(settings, screen)
        view = LiveView(screen)
        reporter = ev.Fanout(recorder, view, ev.LogReporter(min_level=logging.WARNING))
        options = dataclasses.replace(options, tail_logs=2.0)
    else:
        out.setup(settings)
        many = len({s.host for s in experiment.components}) > recap.MANY_HOSTS
        quiet_hosts = logging.WARNING if many and not args.verbose else logging.NOTSET
        reporter = ev.Fanout(recorder, ev.LogReporter(host_min_level=quiet_hosts))
    record = new_record(args, experiment)
    options = dataclasses.replace(options, run_id=record.run_id)
    runner = Runner(experiment, options, ssh_options, reporter=reporter, record=record)
    error: Optional[RunnerError] = None
    try:
        with view if view is not None else contextlib.nullcontext():
            runner.run()
    except RunnerError as exc:
        error = exc
    summary = recorder.summary(experiment, options.screen, runner.report, error,
                               0 if error is None else error.exit_code,
                               run_id=record.run_id, ssh_config=args.ssh_config, ssh_user=args.ssh_user)
    if args.json:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    elif settings.live and sys.stdout.isatty():
        from rich.console import Console
        Console().print(recap.render_rich(summary))
    else:
        sys.stdout.write(recap.render_text(summary))
    sys.stdout.flush()
    if error is not None:
        raise error
    if getattr(args, "fetch", False):
        from remote_runner.cli.lifecycle import fetch_and_report
        fetch_and_report(record, ssh_options)
    return 0


def new_record(args: argparse.Namespace, experiment: "Experiment") -> "RunRecord":
    """Start the run record of this run (config, muddler, options, ssh settings)."""
    import os
    from remote_runner.runrecord import RunRecord, file_sha1, mask_options, new_run_id

    config = os.path.abspath(args.config_file)
    muddler = os.path.abspath(args.muddler) if args.muddler else None
    return RunRecord(
        new_run_id(), config={"path": config, "sha1": file_sha1(config)},
        muddler={"path": muddler, "sha1": file_sha1(muddler)} if muddler else None,
        options=mask_options(vars(args)), screen=args.screen,
        ssh={"config_file": os.path.abspath(args.ssh_config) if args.ssh_config else None,
             "user": args.ssh_user})


def only(experiment: "Experiment", wanted: List[str]) -> "Experiment":
    """Keep the components named in *wanted* (``name``, ``host/name`` or a host)."""
    import dataclasses
    keep = [c for c in experiment.components
            if c.name in wanted or f"{c.host}/{c.name}" in wanted or c.host in wanted]
    matched = {w for w in wanted for c in keep if w in (c.name, f"{c.host}/{c.name}", c.host)}
    unknown = [w for w in wanted if w not in matched]
    if unknown:
        names = ", ".join(f"{c.host}/{c.name}" for c in experiment.components)
        raise ConfigError(f"--only {' '.join(unknown)}: no such component or host in the config "
                          f"(components: {names})", field="--only")
    return dataclasses.replace(experiment, components=tuple(keep))


def dry_run(experiment: "Experiment", options: "RunOptions", ssh_options: "SSHOptions",
            connect: bool = True, as_json: bool = False) -> int:
    """Print the plan on stdout (text or JSON); exit 3 if a host could not be asked."""
    from remote_runner import plan as planning
    from remote_runner.errors import EXIT_CONNECT
    from remote_runner.runner import Runner

    Runner(experiment, options, ssh_options).preflight()
    the_plan = planning.build(experiment, options, ssh_options, connect=connect)
    if as_json:
        sys.stdout.write(json.dumps(the_plan.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(planning.render_text(the_plan))
    sys.stdout.flush()
    for host, problem in sorted(the_plan.problems.items()):
        LOG.error("%s: could not check files: %s", host, problem)
    return EXIT_CONNECT if the_plan.problems else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``remote_runner.py``."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level)
    return run_guarded(lambda: run_command(args))
