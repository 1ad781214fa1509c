"""What a host's shell answers about its files without starting python3.

Why: most reruns ask a host the question the run before asked, or that one
with an edited file or few, and starting python3 to read the manifest was
most of the host's work in such a run (see :mod:`remote_runner.manifest`).
The manifest's program, when its answer is the one a request expected, keeps
every file's lstat as GNU ``stat`` renders it; the shell then compares a
fresh ``stat`` of the files with that, byte for byte (:data:`SAME_MARK`), or
line by line leaving out the edited files (:data:`STATE_MARK`, which names
the answer the other files are still in: this machine keeps its answers, see
:mod:`remote_runner.expectations`). Anything changed since, even with its
mtime put back, changes a ctime and sends the question to the program, as
does a host without GNU ``stat``, ``xargs``, ``cmp``, ``awk`` or ``/proc``.

A first copy, where none of the files is there yet (a new host, a new
destination, a tree removed since), is the shell's too: its ``test`` builtin
finds none of the names (a missing directory: one test for all its files), and
it makes the directories and says so with the free space the copy needs
(:func:`shell_absent`), where the program took about 35 ms of a host's CPU (on
the lab, 1,000 files in 50 directories) to find the same.

Apart from the manifest because it is shell and awk text with its own rules
(the line formats, the kept header, the ``.pending`` record of files written
ahead), checked against each other by the tests.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from remote_runner.digests import is_sha1
from remote_runner.freespace import FREE_MARK, STAT_FREE, UID_LINE
from remote_runner.sessionlock import EARLY_MARK

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.upload import Upload

#: The shell's answer "every file is as expected", with the question's digest (see shell_first).
SAME_MARK = "RR-MANIFEST-SAME"
#: What the shell prints when every file not sent ahead is as in an earlier answer (named).
STATE_MARK = "RR-MANIFEST-STATE"
#: What the shell prints when none of the files asked about is there (see shell_absent).
ABSENT_MARK = "RR-MANIFEST-ABSENT"
#: The most text shell_absent gives, quoted as in the lock's command (it rides there with the
#: program, within Linux's 128 KiB for one argument; a bigger tree is the program's to answer).
ABSENT_TEXT = 32 << 10
#: At most this many files sent ahead are written by the shell (each costs it three
#: processes; more go to python3, which writes them all in one).
SHELL_AHEAD_FILES = 4
#: How the quick check renders each file (GNU stat, TZ=UTC0; the host program writes the same).
QUICK_STAT = "%n|%s|%f|%i|%d|%y|%z"


@dataclass(frozen=True)
class Quick:
    """What lets a host's shell answer a check that says what it expects, without python3.

    The host program, when its answer to such a request is the one expected,
    keeps the lstat of every file the answer is about, rendered as GNU ``stat
    -c`` :data:`QUICK_STAT` prints it, in ``quick-NODE-TREES.stat`` beside
    the manifests (the paths in ``.list``), headed by ``REQUEST FILES
    EXPECT``: the request's SHA-1, the SHA-1 of the ``.list`` and the answer's
    (see :func:`shell_first`).
    """

    #: the request's SHA-1
    request: str
    #: its trees' id (names the files kept)
    trees: str
    #: the SHA-1 of its destinations as the host lists them (:func:`list_id`)
    files: str
    #: the SHA-1 of the answer it expects (:func:`remote_runner.manifest.expectation`)
    expect: str
    #: the files sent ahead with it: (index, size, mode, temporary name), in the order of
    #: their bytes after the request
    ahead: Tuple[Tuple[int, int, int, str], ...] = ()


def _kept_files(quick: Quick) -> str:
    """Shell text setting ``$rr_n`` (the host's node name, empty without /proc) and ``$rr_f``
    (the kept stat's path without its suffix) for *quick*'s trees, as the program names them."""
    return ('rr_n=; { read -r rr_n < /proc/sys/kernel/hostname; } 2>/dev/null\n'
            'rr_f="${XDG_CACHE_HOME:-$HOME/.cache}/remote-runner/manifests/quick-$rr_n-'
            f'{quick.trees}"\n')


def shell_first(quick: Quick, size: int, total: Optional[int] = None) -> str:
    """Shell text answering the check of *quick* (its request *size* bytes, *total* with
    the files sent ahead) before the manifest's program, where it can; it exits when it does.

    The shell answers first where it can, from the files the program kept (see :class:`Quick`)
    and one ``stat`` of the files, rendered the same way, which holds each
    path, size, mode, inode, device, mtime and ctime to the nanosecond: so
    anything that changed a file since (even with its mtime put back) sends
    the question to the program, as does anything missing (no GNU stat,
    xargs, cmp or awk, no /proc).

    * Asked exactly the question it answered as expected (nothing sent
      ahead), the shell answers :data:`SAME_MARK` when the files' stat is
      byte for byte what was kept (on the lab, four hosts and 1,003 files:
      the lock's exec 64 -> 42 ms), says its answer is whole
      (:data:`~remote_runner.sessionlock.EARLY_MARK`: the run goes on without
      waiting for the request to arrive, a round trip after the command), and
      then reads and drops the *total* bytes sent.
    * With a few files sent ahead (at most :data:`SHELL_AHEAD_FILES`, the
      edited ones), when every *other* file of the same list is as kept, the
      shell names the answer kept, :data:`STATE_MARK` and its SHA-1, which
      this machine looks up in what it expected before (:mod:`remote_runner.expectations`),
      and writes each file sent ahead beside its destination as the program
      would (a new file, never through a link; the ones written are listed
      after the name). Those files' own stat does not matter: they are replaced.

    Stale temporary files beside the destinations are swept by the program's
    next run.
    """
    fast = _kept_files(quick)
    stat_all = f'TZ=UTC0 xargs -0 stat -c {shlex.quote(QUICK_STAT)} -- <"$rr_f.list"'
    if not quick.ahead:
        # A missing file's complaint goes down the pipe too: it cannot equal a kept line
        # (those start with the absolute path), so cmp stops at the first one and stat
        # with it, instead of stat complaining about every file of a tree removed since
        # (a first copy to where a tree was: 5,000 system calls a host per 1,000 files).
        fast += ('if [ -n "$rr_n" ] && [ -s "$rr_f.stat" ] && '
                 f'{{ echo "{quick.request} {quick.files} {quick.expect}"; {stat_all} 2>&1; }} | '
                 'cmp -s - "$rr_f.stat"; then\n'
                 f'  echo "{SAME_MARK} {quick.request}"; echo {EARLY_MARK}; '
                 f'head -c {int(total or size)} >/dev/null; exit 0\nfi\n')
    elif len(quick.ahead) <= SHELL_AHEAD_FILES:
        skip = " " + " ".join(str(i + 1) for i, _, _, _ in quick.ahead) + " "
        fast += ('if [ -n "$rr_n" ] && [ -s "$rr_f.stat" ] && '
                 f'rr_h=$({stat_all} 2>/dev/null | LC_ALL=C awk -v list={quick.files} -v skip="{skip}" '
                 f'{shlex.quote(_SAME_BUT_AHEAD)} "$rr_f.stat" -) && [ -n "$rr_h" ]; then\n'
                 f'  head -c {int(size)} >/dev/null || exit 0\n'
                 '  rr_w=; rr_p="$rr_f.pending.$$"; { echo "$rr_h" >"$rr_p"; } 2>/dev/null\n')
        for index, length, mode, temp in quick.ahead:
            t = shlex.quote(temp)
            fast += (f'  if head -c {int(length)} | {{ (set -C; exec cat >{t}) && chmod {mode:o} {t}; '
                     f'rr_x=$?; cat >/dev/null; exit $rr_x; }}; then rr_w="$rr_w {int(index)}"\n'
                     f'    {{ printf "%s " {int(index)}; TZ=UTC0 stat -c {shlex.quote(QUICK_STAT)} -- {t}; }} '
                     '>>"$rr_p" 2>/dev/null\n  fi\n')
        fast += ('  mv -f "$rr_p" "$rr_f.pending" 2>/dev/null\n'
                 f'  echo "{STATE_MARK} ${{rr_h##* }}$rr_w"; exit 0\nfi\n')
    return fast


def shell_absent(groups: Sequence[Tuple[str, Sequence[str]]]) -> str:
    """Shell text answering a check when none of its files is there; it exits when it does.

    *groups* are the check's files as (directory, the files' names in it),
    each directory once (the request makes no other, and sets no mode). The
    text reads ``$rr_ad`` (the request's SHA-1) and ``$rr_at`` (the bytes on
    stdin to read and drop: the request and any files sent ahead, none of which
    is staged: the copy sends them), set by :func:`absent_for` before it, so
    that the hosts given the same files share it. A file is there when the shell's ``test`` finds a name there,
    whatever it is (as the program's ``lstat``); a missing directory costs one
    test for all its files, and a rerun stops at its first file. When none is
    there the shell makes the directories (``mkdir -p``; a failure leaves the
    question to the program, which says why) and prints :data:`ABSENT_MARK`
    with the request's SHA-1, ``tar`` or ``-``, and the free space lines of
    :mod:`remote_runner.freespace` (read by :func:`said_absent`), then reads
    and drops the request, its answer said to be whole first
    (:data:`~remote_runner.sessionlock.EARLY_MARK`). Stale
    temporary files beside the destinations are swept by the program's next
    run. "" when the text, quoted and with :func:`absent_for`'s line, would be
    too long (:data:`ABSENT_TEXT`) or a directory's name is over two lines (its
    free space line could not be read back).
    """
    q = shlex.quote
    tests = [f"rr_x {q(d)} " + " ".join(q(n) for n in names) for d, names in groups]
    dirs = " ".join(q(d) for d, _ in groups)
    if not groups or len(dirs) + sum(map(len, tests)) > ABSENT_TEXT or any("\n" in d for d, _ in groups):
        return ""
    text = ('rr_x() {\n'
            '  rr_d=$1; shift\n'
            '  [ -e "$rr_d" ] || [ -L "$rr_d" ] || return 1\n'
            '  for rr_e do [ -e "$rr_d/$rr_e" ] || [ -L "$rr_d/$rr_e" ] && return 0; done\n'
            '  return 1\n'
            '}\n'
            "if " + " ||\n  ".join(tests) + "; then :\n"
            f"else\n  set -- {dirs}\n"
            '  if mkdir -p -- "$@" 2>/dev/null; then\n'
            '    rr_t=-; command -v tar >/dev/null 2>&1 && rr_t=tar\n'
            f'    echo "{ABSENT_MARK} $rr_ad $rr_t"\n'
            f'    {STAT_FREE} "$@" 2>/dev/null\n'
            f"    {UID_LINE}"
            f"    echo {EARLY_MARK}\n"
            '    head -c "$rr_at" >/dev/null\n'
            "    exit 0\n"
            "  fi\n"
            "fi\n")
    # (quoted again as part of the lock's command: names full of quotes grow most)
    return text if len(q(text)) + _ABSENT_FOR <= ABSENT_TEXT else ""


#: The most :func:`absent_for` adds (a SHA-1 and a byte count, with their names).
_ABSENT_FOR = 80


def absent_for(digest: str, total: int, text: str) -> str:
    """:func:`shell_absent`'s *text* for one request: its SHA-1 *digest*, *total* bytes to drop."""
    if not is_sha1(digest):  # (it goes into the shell text unquoted)
        raise ValueError(f"not a SHA-1: {digest!r}")
    return f"rr_ad={digest} rr_at={int(total)}\n{text}"


def said_absent(output: str, digest: str) -> Optional[Tuple[bool, List[str]]]:
    """(the host has tar, its free space lines) when a host's *output* is the shell's
    :data:`ABSENT_MARK` for the request *digest* (see :func:`shell_absent`); None otherwise."""
    lines = output.splitlines()
    said = [line.split() for line in lines if line.startswith(ABSENT_MARK + " ")]
    if len(said) != 1 or len(said[0]) != 3 or said[0][1] != digest or said[0][2] not in ("tar", "-"):
        return None
    return said[0][2] == "tar", [line for line in lines if line.startswith(FREE_MARK + " ")]


#: awk reading the kept stat file, then the files' stat now: prints the kept header (whose
#: last word names the answer) when the list is *list* and every line but the
#: *skip*-numbered ones (the files sent ahead, counted from 1) is the same; fails otherwise.
_SAME_BUT_AHEAD = r"""
NR == FNR {
  if (FNR == 1) { ok = (NF == 3 && $2 == list && length($3) == 40 && $3 !~ /[^0-9a-f]/); head = $0; next }
  kept[FNR - 1] = $0; n = FNR - 1; next
}
{ m++; if (index(skip, " " m " ") == 0 && ($0 "") != (kept[m] "")) bad = 1 }
END { if (ok && !bad && m == n && n > 0) print head; else exit 1 }
"""


def placing_refresh(quick: Quick, next_request: str, placed: Sequence[Tuple[int, str, str]]) -> Tuple[str, str]:
    """Shell text (before, after) the start renames files the shell wrote ahead into place,
    *placed* as (index, temporary, destination), so that the kept stat then stands for
    this run's answer (:attr:`Quick.expect`, asked next time as *next_request*).

    Before: the temporaries' stat, which must still be exactly what the shell that wrote
    them recorded beside the kept stat (``.pending``, with the kept header it had
    checked). After: each destination's stat, which must differ from its temporary's in
    its name and ctime only (a rename); then every other line stays as it was checked
    and the renamed files' lines are replaced, under the new header. Anything else (a
    file changed meanwhile, a stat missing, another run's kept stat) leaves the kept
    stat to the program's next run. Never fails the start.
    """
    if not placed:
        return "", ""
    fmt = shlex.quote(QUICK_STAT)
    temps = " ".join(shlex.quote(t) for _, t, _ in placed)
    dests = " ".join(shlex.quote(d) for _, _, d in placed)
    order = " " + " ".join(str(int(i)) for i, _, _ in placed) + " "
    head = f"{next_request} {quick.files} {quick.expect}"
    before = _kept_files(quick) + f'rr_b=$(TZ=UTC0 stat -c {fmt} -- {temps} 2>/dev/null)\n'
    after = (f'{{ [ -n "$rr_n" ] && [ -s "$rr_f.pending" ] && TZ=UTC0 stat -c {fmt} -- {dests} | '
             f'LC_ALL=C awk -v before="$rr_b" -v order="{order}" -v head="{head}" '
             f'{shlex.quote(_RENAMED)} "$rr_f.pending" "$rr_f.stat" - >"$rr_f.stat.$$" && '
             'mv -f "$rr_f.stat.$$" "$rr_f.stat"; } 2>/dev/null || rm -f "$rr_f.stat.$$" 2>/dev/null\n'
             'rm -f "$rr_f.pending" 2>/dev/null\n')
    return before, after


#: awk reading the shell's ``.pending`` (the header it checked, then "INDEX LINE" of each file
#: it wrote ahead), the kept stat, and the renamed destinations' stat now (in *order*); with
#: *before* the temporaries' stat taken just before the renames. Prints the kept stat with
#: those files' lines replaced under *head*, or fails (see :func:`placing_refresh`).
_RENAMED = r"""
FNR == 1 { f++ }
f == 1 { if (FNR == 1) checked = $0; else { i = $1; sub(/^[0-9]+ /, ""); wrote[i] = $0 } next }
f == 2 { if (FNR == 1) same = ($0 == checked); else kept[FNR - 1] = $0; n = FNR - 1; next }
{ now[++m] = $0 }
function tail(line) {  # size|mode|inode|device|mtime: what a rename keeps
  if (!match(line, /\|[^|]*\|[^|]*\|[^|]*\|[^|]*\|[^|]*\|[^|]*$/)) return ""
  line = substr(line, RSTART); sub(/\|[^|]*$/, "", line); return line
}
END {
  k = split(order, at, " "); split(before, was, "\n")
  if (!same || k == 0 || m != k || n == 0) exit 1
  for (j = 1; j <= k; j++) {
    i = at[j]
    if (!(i in wrote) || was[j] != wrote[i] || tail(now[j]) == "" || tail(now[j]) != tail(was[j]) \
        || i + 1 > n) exit 1
    kept[i + 1] = now[j]
  }
  print head; for (l = 1; l <= n; l++) print kept[l]
}
"""


def list_id(dests: Sequence[str]) -> str:
    """The SHA-1 of *dests* as the host program lists them (each path and a NUL)."""
    return hashlib.sha1(b"".join(d.encode("utf-8", "surrogateescape") + b"\0" for d in dests)).hexdigest()


def quick_ids(payload: bytes, trees: Sequence[str]) -> Tuple[str, str]:
    """(SHA-1 of a request, id of its trees): what names and checks its quick answer."""
    joined = "\0".join(trees).encode("utf-8", "surrogateescape")
    return hashlib.sha1(payload).hexdigest(), hashlib.sha1(joined).hexdigest()


def quick_for(payload: bytes, items: Sequence["Upload"], trees: Sequence[str], expect: str,
              ahead: Sequence[Tuple[int, int, int, str]] = ()) -> Quick:
    """The :class:`Quick` of request *payload* about *items* (in *trees*), which expects *expect*."""
    digest, trees_id = quick_ids(payload, trees)
    return Quick(digest, trees_id, list_id([u.dest for u in items]), expect, tuple(ahead))


def said_same(output: str, digest: str) -> bool:
    """Whether a host's *output* is the shell's :data:`SAME_MARK` for the request *digest*
    (the SHA-1 of the request; see :func:`shell_first`)."""
    return f"{SAME_MARK} {digest}" in output.splitlines()


def said_state(output: str) -> Optional[Tuple[str, List[int]]]:
    """(the answer named, the indices of the files written) when a host's *output* is the
    shell's :data:`STATE_MARK` (see :func:`shell_first`); None otherwise."""
    lines = [line for line in output.splitlines() if line.startswith(STATE_MARK + " ")]
    if len(lines) != 1:
        return None
    words = lines[0].split()[1:]
    if not words or not is_sha1(words[0]) or not all(w.isascii() and w.isdigit() for w in words[1:]):
        return None
    return words[0], [int(w) for w in words[1:]]
