"""Commands that mean the same to every login shell: sh, bash, zsh, csh, tcsh, fish.

Why: an SSH exec request is not run by ``/bin/sh``. sshd hands the command
string to the user's *login shell* (``$SHELL -c COMMAND``), and research
clusters still give users tcsh or csh, some fish. Those parse our scripts
differently: csh and tcsh refuse a newline inside quotes ("Unmatched '") and
expand ``!`` even inside single quotes ("Event not found"); fish reads ``\\``
inside single quotes as an escape; ``$VAR``, ``2>&1``, ``$(...)`` and globs
outside quotes differ everywhere. A run on such a host failed before it
started, with nothing but "no answer" to show for it.

So every command we send passes :func:`for_login_shell` first. A command
every one of those shells reads the same way (:func:`portable`: plain words,
single-quoted text without newline, ``!`` or backslash, the ``'"'"'`` that
``shlex.quote`` writes) goes as it is: what a user sees in ``ps`` on the host
is the command itself. Any other is sent as ``/bin/sh -c`` running a script
that travels base64-encoded as its arguments, whose alphabet (letters, digits,
``+/=``) no shell treats specially; ``/bin/sh`` decodes it and runs it with
``eval``, in the same shell process, so its stdin, exit status and signals are
the command's own (its positional parameters are emptied first). It costs the
host one ``base64`` process; a missing ``base64`` fails the command (status
127), never runs nothing silently.

The login shell also reads its rc files first (``~/.cshrc`` always, ``~/.bashrc``
under sshd), and on clusters those print: a welcome banner, ``module load``
chatter. That text comes before the command's own output, on the same stdout,
and broke what reads it (the session lock's answer, the mirror's frames). So a
command first prints a mark of its own (:func:`with_mark`), and the channel's
reader drops everything up to it (:class:`OutputAfterMark`); so does its error
reader, for a command sent encoded (the scripts, whose errors are parsed).
"""

from __future__ import annotations

import base64
import secrets
import string
import threading
from typing import Callable, Optional, Tuple

#: What may stand outside quotes (and inside double quotes): no expansion, glob,
#: redirection, history or escape character in any of the shells above.
_PLAIN = frozenset(string.ascii_letters + string.digits + " _./:=,@%+-;")
#: What single quotes cannot hold for every shell: csh's newline and ``!``, fish's escapes.
_NOT_IN_SINGLE_QUOTES = frozenset("\n\r!\\")
#: Characters of base64 per word of the encoded form (a multiple of 4; csh refuses words
#: over 8 KiB with "Word too long").
WORD = 4096
#: Linux's limit on one argument (MAX_ARG_STRLEN, with its NUL): the command is one.
ARG_MAX = 128 << 10
#: What a word may not start with: zsh expands ``=cmd``, old fish ``%job``. (An ``=`` in
#: the first word is an assignment to sh and a command name to csh: not plain either.)
_NOT_FIRST = frozenset("=%")


def portable(command: str) -> bool:
    """Whether *command* means the same to sh, bash, zsh, ksh, csh, tcsh and fish."""
    quote = ""
    previous = " "
    first = True
    for char in command:
        if quote == "'":
            if char == "'":
                quote = ""
            elif char in _NOT_IN_SINGLE_QUOTES:
                return False
        elif quote == '"':
            if char == '"':
                quote = ""
            elif char != "'" and char not in _PLAIN:
                return False
        elif char in "'\"":
            quote = char
        elif char not in _PLAIN or (previous == " " and char in _NOT_FIRST):
            return False
        elif char == "=" and first:  # an assignment in sh, a command name in csh
            return False
        elif char == " " and previous != " ":
            first = False  # (the first word ended)
        previous = char
    return not quote


def for_login_shell(command: str) -> str:
    """*command* as it can be given to any login shell (see the module's docstring)."""
    if portable(command):
        return command
    encoded = base64.b64encode(command.encode("utf-8", "surrogateescape")).decode("ascii")
    # Separate words, none longer than csh's limit (8 KiB): /bin/sh joins them back. Each
    # starts at a 4-character boundary, so none starts with the padding '='.
    words = " ".join(encoded[at:at + WORD] for at in range(0, len(encoded), WORD))
    wrapped = ("exec /bin/sh -c 'rr_script=$(printf %s \"$@\" | base64 -d) && set -- && "
               "eval \"$rr_script\"' sh " + words).rstrip()
    # sshd gives the whole command to the login shell as one argument, which Linux caps
    # (MAX_ARG_STRLEN): one that fits only unencoded still works where the shell is sh.
    return command if len(wrapped) >= ARG_MAX and len(command) < ARG_MAX else wrapped


#: Bytes of output looked through for the mark before they are taken as the command's own.
MARK_SEARCH = 1 << 20


def with_mark(command: str) -> Tuple[str, bytes, Optional[bytes]]:
    """(*command* printing a mark of its own first, the mark's line on stdout, on stderr or None).

    The mark goes to stderr too when the command is sent encoded anyway (not
    :func:`portable`): only ``/bin/sh`` can be trusted with ``>&2``, csh reads it
    as "both streams to the file 2". A plain command's stderr keeps a banner.
    """
    mark = "rr-output-" + secrets.token_hex(8)
    line = (mark + "\n").encode("ascii")
    marked = f"echo {mark}; {command}"
    if portable(marked):
        return marked, line, None
    return f"echo {mark}; echo {mark} >&2; {command}", line, line


class OutputAfterMark:
    """A channel's ``recv`` that drops what the login shell printed before the command's mark.

    Whatever comes before the mark line is dropped (a banner); what follows is
    the command's. If the stream ends, or :data:`MARK_SEARCH` bytes go by,
    before the mark, everything read is handed on as it came (a command that
    never started: the login shell's own words are its error).
    """

    def __init__(self, recv: Callable[[int], bytes], mark: bytes) -> None:
        self._recv = recv
        self._mark = mark
        self._seen = b""      # read, the mark not found yet
        self._ready = b""     # the command's output, not handed on yet
        self._searching = True
        self._lock = threading.Lock()

    def __call__(self, size: int) -> bytes:
        with self._lock:
            while self._searching and not self._ready:
                chunk = self._recv(65536)  # (a timeout raised here keeps what was read)
                self._take(chunk)
                if not self._searching and not self._ready:
                    # the mark ended the chunk: wait for more; or the end, nothing said
                    return self._recv(size) if chunk else b""
            if self._ready:
                out, self._ready = self._ready[:size], self._ready[size:]
                return out
        return self._recv(size)

    def ready(self, buffered: Callable[[], bool]) -> bool:
        """Whether the command's own output can be read without waiting; *buffered* is
        the channel's own test (``recv_ready``), which a banner or the mark would pass."""
        with self._lock:
            while self._searching and not self._ready and buffered():
                self._take(self._recv(65536))  # (there: this does not wait)
            return bool(self._ready) or (not self._searching and buffered())

    def _take(self, chunk: bytes) -> None:
        """Look for the mark in what was read so far and *chunk* (b"": the end)."""
        seen = self._seen + chunk
        at = seen.find(self._mark)
        if at >= 0:
            self._ready, self._seen, self._searching = seen[at + len(self._mark):], b"", False
        elif not chunk or len(seen) > MARK_SEARCH:
            self._ready, self._seen, self._searching = seen, b"", False
        else:
            self._seen = seen
