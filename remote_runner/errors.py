"""Typed errors and the exit-code contract.

Library code never calls ``sys.exit``: it raises one of these, and the command
line (:mod:`remote_runner.cli`) turns the error into a message and an exit code.
Each error keeps what it is about (file, line, component, field, host, path)
as attributes and builds its message from them, so a user always learns
*where* the problem is and, for host problems, what to do about it.

Exit codes (documented in the README and in ``--help``):

====  =====================================================================
0     success
1     internal or unexpected error
2     usage or configuration error (bad flag, config/muddler mistake)
3     connection, host-key or authentication error
4     copy error (missing source, transfer failure)
5     a waited component failed (non-zero exit, missing executable, timeout)
6     start error (screen session or window could not be started)
7     lab error (throwaway test hosts could not be built)
8     partial run: some hosts stayed unreachable and, within ``--max-fail``, their
      components were skipped; everything else ran as asked
130   interrupted (Ctrl-C)
254   ``remote-runner exec``: the tool or the link failed (not the command)
====  =====================================================================
"""

from __future__ import annotations

import re
from typing import Optional

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_CONNECT = 3
EXIT_COPY = 4
EXIT_COMPONENT = 5
EXIT_START = 6
EXIT_LAB = 7
EXIT_PARTIAL = 8
EXIT_INTERRUPTED = 130
#: Ended by SIGTERM (128 + 15), unwound as an interrupt is (see cli.end_on_sigterm).
EXIT_TERMINATED = 143
#: stdout's reader went away (``… | head``): 128 + SIGPIPE, quietly, as a pipe's writer ends.
EXIT_PIPE = 141
EXIT_LINK = 254


class RunnerError(Exception):
    """Root of every error remote_runner raises on purpose."""

    exit_code = EXIT_INTERNAL


class ConfigError(RunnerError, ValueError):
    """A mistake in a config, muddler or arg-parser file, or on the command line."""

    exit_code = EXIT_CONFIG

    def __init__(
        self,
        message: str,
        *,
        file: Optional[str] = None,
        line: Optional[int] = None,
        component: Optional[str] = None,
        field: Optional[str] = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.component = component
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        return located(self.message, self.file, self.line, self.component, self.field)


def shown(value: object) -> str:
    """*value* for a message: its repr, bounded in length and depth however big it is (a YAML
    alias bomb's list printed whole ran to 722 MB)."""
    import reprlib
    brief = reprlib.Repr()
    brief.maxstring, brief.maxother, brief.maxlevel = 160, 160, 2
    brief.maxlist = brief.maxtuple = brief.maxdict = brief.maxset = 6
    text = brief.repr(value)
    return text if len(text) <= 240 else text[:237] + "..."


def located(message: str, file: Optional[str] = None, line: Optional[int] = None,
            component: Optional[str] = None, field: Optional[str] = None) -> str:
    """Prefix *message* with ``file:line: component 'c', field 'f': `` (the parts known)."""
    where = ""
    if file:
        where = file + (f":{line}" if line else "") + ": "
    parts = []
    if component is not None:
        parts.append(f"component {component!r}")
    if field is not None:
        parts.append(f"field {field!r}")
    what = (", ".join(parts) + ": ") if parts else ""
    return f"{where}{what}{message}"


class HostError(RunnerError, ConnectionError):
    """Something went wrong with one host; the message says what to do."""

    exit_code = EXIT_CONNECT

    def __init__(self, host: str, message: str, hint: str = "") -> None:
        self.host = host
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"host {self.host}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class UnreachableError(HostError):
    """The host could not be reached (DNS, refused, timeout)."""


class HostKeyError(HostError):
    """The host key is unknown (and not accepted) or has changed."""


class AuthError(HostError):
    """No authentication method worked."""


#: C0 controls, DEL and C1 controls.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def control_characters(text: str) -> str:
    """Return the control characters in *text*, escaped for a message ('' if none)."""
    if _CONTROLS.search(text) is None:  # every path of every file is checked: the common case first
        return ""
    found = sorted(set(_CONTROLS.findall(text)))
    return ", ".join(repr(ch) for ch in found)


def brief_command(command: str, limit: int = 160) -> str:
    """*command* for a message: its first line, cut to *limit* characters.

    The commands we run on hosts can be long scripts (a ``chmod`` of a
    thousand files); the error must still fit on a screen and end with why.
    """
    lines = command.strip().splitlines() or [""]
    text = lines[0]
    if len(text) > limit:
        text = text[:limit]
    if text != command.strip():
        text += f" … ({len(lines)} lines, {len(command)} characters)"
    return text


class ConnectionLost(HostError):
    """The SSH connection to a host went away in the middle of something."""


class NoSFTP(HostError):
    """The host refused the SFTP subsystem on a connection that is still up (a hardened sshd
    without ``Subsystem sftp``): what needs SFTP can fall back to plain commands."""


def describe(exc: BaseException) -> str:
    """A few words for *exc* as a user reads them (never a bare class name like EOFError)."""
    if isinstance(exc, EOFError) or "connection dropped" in str(exc).lower() or \
            "socket is closed" in str(exc).lower():
        return "the SSH connection was lost"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class RemoteCommandError(HostError):
    """A helper command we ran on a host failed."""

    exit_code = EXIT_INTERNAL

    def __init__(self, host: str, command: str, exit_status: int, stderr: str = "") -> None:
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-10:])
        message = f"command `{brief_command(command)}` exited {exit_status}"
        if tail:
            message += f": {tail}"
        super().__init__(host, message)


class CommandTimeout(HostError):
    """A helper command or a wait did not finish in time."""

    def __init__(self, host: str, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__(host, f"{what} did not finish within {seconds:g} s")


class OutputTooLarge(HostError):
    """A host answered a command with more than we ever read (:data:`MAX_OUTPUT` bytes)."""

    def __init__(self, host: str, what: str) -> None:
        self.what = what
        super().__init__(host, f"{what} printed more than {MAX_OUTPUT >> 20} MiB: not read further",
                         "check what the host runs in its place (a shell profile, a wrapper)")


#: The most a command's output (or a step's answer) may hold; a host sending more is not believed.
MAX_OUTPUT = 256 << 20


class CopyError(RunnerError):
    """A file could not be copied (or its local source is missing)."""

    exit_code = EXIT_COPY

    def __init__(self, message: str, *, host: Optional[str] = None, path: Optional[str] = None,
                 component: Optional[str] = None) -> None:
        self.message = message
        self.host = host
        self.path = path
        self.component = component
        super().__init__(str(self))

    def __str__(self) -> str:
        bits = []
        if self.host:
            bits.append(f"host {self.host}")
        if self.component:
            bits.append(f"component {self.component!r}")
        if self.path:
            bits.append(self.path)
        return (": ".join(bits) + ": " if bits else "") + self.message


class StartError(RunnerError):
    """A screen session or window could not be started."""

    exit_code = EXIT_START


class ComponentUnhealthy(StartError):
    """A component exited or missed its readiness deadline while the run was starting it.

    The run stops before the next ``start_index``; the message names the
    component, how it ended and the end of its log.
    """

    def __init__(self, host: str, component: str, reason: str, log_tail: str = "") -> None:
        self.host = host
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        text = f"host {host}: component {component!r} {reason}; later start indexes not started"
        if log_tail.strip():
            text += "\n  last lines of its log:\n    " + "\n    ".join(log_tail.splitlines())
        else:
            text += " (its log is empty)"
        super().__init__(text)


class SessionBusy(StartError):
    """Another run of the same screen session is active on a host."""


class ComponentFailed(RunnerError):
    """One or more waited components failed; ``failures`` maps name to reason."""

    exit_code = EXIT_COMPONENT

    def __init__(self, failures: dict) -> None:
        self.failures = dict(failures)
        lines = [f"{name}: {reason}" for name, reason in self.failures.items()]
        super().__init__("waited component(s) failed:\n  " + "\n  ".join(lines))


class PartialRun(RunnerError):
    """The run went ahead without some unreachable hosts (``--max-fail``); ``skipped`` says why."""

    exit_code = EXIT_PARTIAL

    def __init__(self, skipped: dict, limit: object = None) -> None:
        self.skipped = dict(skipped)
        within = f" (within --max-fail {limit})" if limit is not None else ""
        lines = [f"{host}: {reason}" for host, reason in self.skipped.items()]
        super().__init__(f"partial run: {len(lines)} unreachable host(s) skipped{within}:\n  "
                         + "\n  ".join(lines))


class PrerequisitesUnreachable(RunnerError):
    """Hosts within ``--max-fail`` stayed unreachable, but what is left cannot run without
    them (a whole start_index wave, or every waited component, is on them): nothing starts."""

    exit_code = EXIT_CONNECT

    def __init__(self, skipped: dict, reasons: list) -> None:
        self.skipped = dict(skipped)
        self.reasons = list(reasons)
        hosts = [f"{host}: {why}" for host, why in self.skipped.items()]
        super().__init__(
            f"could not connect to {len(hosts)} host(s), within --max-fail, but the rest of the "
            "run depends on them, so nothing was started:\n  " + "\n  ".join(self.reasons + hosts)
            + "\n  (--max-fail lets hosts that others can do without stay away; bring these up "
            "or move those components to hosts that answer)")


class LabError(RunnerError):
    """The throwaway test hosts could not be built or removed."""

    exit_code = EXIT_LAB


class MirrorError(RunnerError):
    """The mirror (FUSE + chroot on a remote host) could not run."""

    exit_code = EXIT_LINK
