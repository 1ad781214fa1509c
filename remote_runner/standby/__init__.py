"""A standby process with the runner already loaded, so a rerun starts at once.

Why: a rerun with nothing to copy is a fixed cost, and most of it was this
machine's Python before the first packet: ~25 ms for the interpreter and
90-120 ms importing the runner (paramiko and its crypto ~40 ms, our own modules
~40 ms) out of a ~0.35-0.45 s run against four hosts at 0 ms. Users rerun dozens
of times a day; every ``status``, ``logs`` and ``stop`` paid it too.

How (the idea of Mercurial's command server and Android's zygote): the first
command that finds no standby runs as usual and, once done, starts one in the
background. The standby imports the runner, listens on a Unix socket in a
directory only this user can enter, and for every command forks a child that
takes over the caller's standard input, output and error (passed over the
socket), working directory (also passed as a descriptor), environment, umask
and arguments, runs the command exactly as the caller would have, and sends
back its exit status. The caller meanwhile forwards the signals it gets (Ctrl-C
is SIGINT to the caller) to the child, and ends as the child ended. The
standby exits after ``$REMOTE_RUNNER_STANDBY`` seconds without a command
(default 600).

What must hold, and how:

* Same code, same interpreter, same process: the socket's name is a digest of
  everything an import depends on (the interpreter, ``sys.path``, the package's
  files and the directories packages are installed in, the locale and Python
  variables) and of what a child inherits from the standby rather than from its
  caller (user, groups, root, namespaces, resource limits, priority, CPU
  affinity, control group). Change any of them and the next command
  finds no standby under that name, runs in-process and starts a fresh one; the
  old one idles out.
* Only this user: the directory is created 0700 and refused unless it is a real
  directory owned by this user with no group or other access; the standby
  checks each caller's uid (``SO_PEERCRED``) and serves its own uid only.
* Nothing runs twice, nothing half: until the child has said its pid and the
  caller has said "go", nothing has run, and any failure up to there runs the
  command in-process instead. A caller that disappears after that (killed)
  takes the run down with it (SIGTERM, which the command unwinds as it does
  Ctrl-C: :func:`remote_runner.cli.end_on_sigterm`), as an in-process run would end.
* What needs this terminal runs in-process: ``--ask-pass`` (a prompt on
  ``/dev/tty``), ``attach``, ``lab``, and ``exec`` when its input is a terminal
  (an interactive program: raw mode, window size, job control stay here).

``REMOTE_RUNNER_STANDBY=0`` turns it off; a number sets the idle time in
seconds. ``REMOTE_RUNNER_STANDBY_DIR`` names the directory (default
``$XDG_RUNTIME_DIR/remote-runner``, else ``/tmp/remote-runner-UID``).

The modules: :mod:`.names` (the directory, and the digest a socket is named
after), :mod:`.wire` (the messages), :mod:`.caller` (a command handing itself
over), :mod:`.server` (the standby); the process entry points are here.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from .caller import ENTRIES, run_in_standby, start_standby, wanted
from .names import DEFAULT_IDLE, DIR_ENV, ENV, directory, fingerprint, idle_seconds

__all__ = ["DEFAULT_IDLE", "DIR_ENV", "ENV", "classic", "directory", "fingerprint", "idle_seconds",
           "launch", "run_in_standby", "start_standby", "tool", "wanted"]


def launch(entry: str) -> NoReturn:
    """Be the command *entry* of this process: run in a standby when one takes it, else here (and
    start a standby for the next one). Imports nothing heavy before it knows which."""
    status = run_in_standby(entry, sys.argv)
    if status is not None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status & 0xFF)
    import importlib
    from remote_runner.cli import finish
    module, function = ENTRIES[entry]
    args = sys.argv[1:]
    status = getattr(importlib.import_module(module), function)(args)
    if wanted(entry, args):
        start_standby()
    finish(status)


def tool() -> NoReturn:
    """The ``remote-runner`` console script."""
    launch("tool")


def classic() -> NoReturn:
    """``remote_runner.py``."""
    launch("classic")
