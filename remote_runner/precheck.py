"""The change check of a run, asked on the session lock's channel before the copy step.

A rerun of an unchanged experiment should cost each host one round trip for the
files and one per start wave. The lock is taken first (nothing may change on a
host another run holds), and its channel already carries the prepare script
(state and base directories); the manifest question (:mod:`remote_runner.manifest`)
rides on the same channel, after the prepare script, so that asking "which files
differ?" costs no exec of its own.

It can be asked that early only when every destination tree is known before the
host has said anything: each component with files on the host has an absolute
``base_dir``. A relative one (resolved in the login directory) or none (a fresh
temporary directory, where everything is copied anyway) leaves the check to the
copy step, as does ``--always-copy`` (nothing to check). After the prepare script,
the host's resolved base directories must equal the ones asked about (a symlink
in the path changes them); otherwise the early answer is dropped and the copy
step asks again with the resolved paths, so an early answer never decides about
a file under another name.

Where none of the files is there yet (a first copy), the host's shell says so
without the program (:func:`absent_answer`, :func:`quickanswer.shell_absent`).

The request goes on stdin (a big tree's list does not fit a command line), and
the host program reads exactly its length, leaving the rest of the channel to
the lock. An answer that does not parse, or a host without python3, also leaves
the check to the copy step, which then takes its usual fallbacks.

**Files sent ahead.** The everyday rerun is "I edited one file". The check
cannot say which file differs before the host answers, but this machine can
guess: a file whose stat no longer matches what the local hash cache
remembers (:mod:`remote_runner.hashcache`) changed here since it was last
hashed. When every such file of a host is small (:data:`AHEAD_FILES` files,
:data:`AHEAD_FILE` bytes each, :data:`AHEAD_BYTES` in all), their bytes follow
the request on the same channel; the host compares each with what it has (by
SHA-1, as for any file) and writes the ones that differ beside their
destination as temporary files, never over it. The host's first start
command renames them into place (:class:`remote_runner.runner.Runner`), only
once every host is locked, prepared and copied, so a run that fails before
its start leaves every destination as it was (and removes the temporaries).
A guess that is wrong costs those few bytes and nothing else: a file changed
only on the host, or new to it, is copied by the copy step as before.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from remote_runner import expectations, hashcache, manifest, quickanswer, sync
from remote_runner.upload import staged_token

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec
    from remote_runner.upload import Upload

#: At most this many files changed here go ahead with a host's check (else none do) ...
AHEAD_FILES = 16
#: ... each at most this big ...
AHEAD_FILE = 64 << 10
#: ... and this many bytes in all.
AHEAD_BYTES = 256 << 10

#: Per run, by source: (bytes, SHA-1) when it changed here since it was last hashed and
#: may go ahead, False when it changed but is too big, its SHA-1 when the hash cache knows
#: it (the copy step compares with that, see :func:`known_sums`), None when it cannot be read.
AheadMemo = Dict[str, Union[Tuple[bytes, str], bool, str, None]]


#: Per run, by the identity of a plan's files: (those files, the request, what it expects of
#: each, what lets the host's shell answer it) of the check built when none of them went
#: ahead, and what lets the shell say none is there. Hosts given the same files ask the same
#: question: it is built once (each build is a JSON of every file).
CheckMemo = Dict[int, Tuple[Tuple["Upload", ...], bytes, Optional[List[str]],
                            Optional[quickanswer.Quick], Optional[Tuple[str, str]]]]


def known_sums(memo: AheadMemo) -> Dict[str, str]:
    """Source -> SHA-1 of the sources *memo* found in the hash cache while planning.

    The copy step compares the hosts' answers with these instead of asking the
    cache again for every file (a stat and two locks each, per run): the run
    deploys what its sources were when it planned, as it does for their sizes.
    """
    return {src: guess for src, guess in memo.items() if isinstance(guess, str)}


@dataclass
class EarlyCheck:
    """One host's change check, asked with the lock: its plan, request and answer."""

    host: str
    plan: sync.Plan
    #: the base directory each component with files was asked about (its key -> path)
    bases: Dict[Tuple[str, str], str]
    request: bytes
    answer: Optional[manifest.Answer] = None
    #: length of the JSON at the start of *request* (the files sent ahead follow it)
    json_size: int = -1
    #: files sent ahead: index in the plan -> (temporary name the host stages it as, SHA-1)
    ahead: Dict[int, Tuple[str, str]] = field(default_factory=dict)
    #: the SHA-1 the request expects of each file (all the same here), when it says so
    expected: Optional[List[str]] = None
    #: what lets the host's shell answer (see :class:`quickanswer.Quick`), with *expected*
    quick: Optional[quickanswer.Quick] = None
    #: (the request's SHA-1, shell text) answering it when none of the files is there
    #: (:func:`absent_answer`), when the shell can
    absent: Optional[Tuple[str, str]] = None

    @property
    def script(self) -> str:
        """The shell text the lock's channel runs after the prepare script (reads the request)."""
        return manifest.run_script(self.json_size if self.json_size >= 0 else len(self.request),
                                   self.quick, len(self.request), self.absent[1] if self.absent else "")

    def staged(self) -> Dict[int, str]:
        """Index -> SHA-1 of each file the host staged, by its answer."""
        if self.answer is None:
            return {}
        return {i: self.ahead[i][1] for i in self.answer.staged if i in self.ahead}

    def temporaries(self) -> Dict[str, str]:
        """Destination -> temporary name of every file sent ahead (staged or not)."""
        return {self.plan.files[i].dest: temp for i, (temp, _) in self.ahead.items()}

    def take(self, output: str) -> None:
        """Read the answer in what the lock's channel printed (None when there is none)."""
        quick, files = self.quick, self.plan.files
        state = quickanswer.said_state(output) if quick is not None and quick.ahead else None
        absent = quickanswer.said_absent(output, self.absent[0]) if self.absent else None
        if absent is not None:
            self.answer = manifest.Answer([None] * len(files), has_tar=absent[0], free=absent[1],
                                          absent=True)
        elif (quick is not None and not quick.ahead and self.expected is not None
                and quickanswer.said_same(output, quick.request)):
            self.answer = manifest.Answer([manifest.Remote(u.size, u.mode, sha1) for u, sha1
                                           in zip(files, self.expected)],
                                          trusted=len(self.expected), quick=True)
        elif state is not None:
            self.answer = self._as_named(*state)
        else:
            self.answer = manifest.read_answer(self.host, output, len(files))
        if self.answer is not None and quick is not None and not quick.ahead:
            self.answer.asked = (quick.request, quick.expect)

    def _as_named(self, name: str, written: List[int]) -> Optional[manifest.Answer]:
        """The answer of a host whose shell found every file not sent ahead as in the answer
        *name* and wrote the ones sent ahead listed in *written* (see :func:`quickanswer.shell_first`);
        None when this machine does not have that answer (the copy step asks again)."""
        assert self.quick is not None
        kept = expectations.recall(name, len(self.plan.files))
        ahead = {i for i, _, _, _ in self.quick.ahead}
        if kept is None or not ahead.issuperset(written):
            return None
        # (a file sent ahead was not compared: what the host had of it does not count)
        files = [None if i in ahead else manifest.Remote(*entry) for i, entry in enumerate(kept)]
        return manifest.Answer(files, trusted=len(files) - len(ahead), staged=sorted(set(written)),
                               quick=True, named=name)

    def refresh(self, placed: Sequence[str]) -> Tuple[str, str]:
        """Shell text (before, after) the start's renames of the files sent ahead that are
        *placed* (destinations), keeping the host's kept stat up to date when its shell
        wrote them (see :func:`quickanswer.placing_refresh`): the next unchanged run is then
        answered by the shell too. Empty when the program answered."""
        quick, answer = self.quick, self.answer
        if quick is None or answer is None or answer.named is None:
            return "", ""
        wrote = set(answer.staged)
        where = {self.plan.files[i].dest: i for i in self.ahead if i in wrote}
        moved = [(where[d], self.ahead[where[d]][0], d) for d in sorted(placed) if d in where]
        files = list(self.plan.files)
        request, _ = _check_request(self.plan, files, False, [], 0, quick.expect)
        return quickanswer.placing_refresh(quick, hashlib.sha1(request).hexdigest(), moved)

    def usable(self, resolved: Dict[Tuple[str, str], str]) -> bool:
        """True when there is an answer and the host resolved every base dir as asked."""
        return self.answer is not None and all(resolved.get(key) == base
                                               for key, base in self.bases.items())


def plan_ahead(host: str, specs: Sequence["ComponentSpec"], always_copy: bool = False,
               rehash: bool = False, plans: Optional["sync.PlanMemo"] = None,
               memo: Optional[AheadMemo] = None,
               built: Optional[CheckMemo] = None) -> Optional[EarlyCheck]:
    """The check to ask with *host*'s lock, or None when it must wait for the copy step.

    *plans* gives the plans the run already built (see :class:`sync.PlanMemo`);
    *memo* is the run's guesses of the files changed here (given: some may go ahead);
    *built* the checks already built for the same files (see :data:`CheckMemo`).
    """
    if always_copy:
        return None
    entries, bases = [], {}
    for spec in specs:
        if not spec.files:
            continue
        if spec.is_local or not spec.base_dir or not spec.base_dir.startswith("/"):
            return None
        bases[spec.key] = base = posixpath.normpath(spec.base_dir)
        entries += [(f, base) for f in spec.files]
    if not entries:
        return None
    plan = (plans or sync.PlanMemo()).plan(host, entries)
    if not plan.files:
        return None
    items = list(plan.files)
    picked = _changed_here(items, memo) if memo is not None else []
    same = built.get(id(plan.files)) if built is not None and not picked else None
    if same is not None and same[0] is plan.files:
        _, request, sums, quick, absent = same
        return EarlyCheck(host, plan, bases, request, json_size=len(request), expected=sums,
                          quick=quick, absent=absent)
    ahead = [(i, sha1, staged_token()) for i, (_, sha1) in picked]
    blob = b"".join(data for _, (data, _) in picked)
    # Every file's SHA-1 is known here (from the cache, or read just now to go ahead): the
    # request says what it expects the host to have, so that the host may answer "as
    # expected" from its files' stat alone the next time it is asked the same.
    sums = [_sha1_of(memo.get(u.src)) for u in items] if memo is not None and not rehash else []
    known = bool(sums) and all(s is not None for s in sums)
    said = manifest.expectation_text(items, sums) if known else ""
    expect = manifest.expectation_digest(said) if known else None
    request, trees = _check_request(plan, items, rehash, ahead, len(blob), expect)
    temps = {i: (_temp_name(items[i].dest, token), sha1) for i, sha1, token in ahead}
    check = EarlyCheck(host, plan, bases, request + blob, json_size=len(request), ahead=temps,
                       absent=None if rehash else absent_answer(plan, request, len(request) + len(blob)))
    if expect is not None:
        check.expected = sums
        expectations.keep(expect, said)  # (a later run's host may name it, see quickanswer.shell_first)
        # the shell compares its files' stat line by line: one name over two lines cannot be
        # told from two files, so with files ahead (where lines are left out) it does not answer
        if not (ahead and any("\n" in u.dest for u in items)):
            check.quick = quickanswer.quick_for(request, items, trees, expect, [
                (i, len(data), items[i].mode, temps[i][0]) for i, (data, _) in picked])
    if built is not None and not picked:
        built[id(plan.files)] = (plan.files, request, check.expected, check.quick, check.absent)
    return check


def absent_answer(plan: "sync.Plan", request: bytes, total: int) -> Optional[Tuple[str, str]]:
    """(SHA-1 of *request*, the shell text answering it when none of *plan*'s files is there:
    :func:`quickanswer.shell_absent`, *total* bytes to drop), where the shell can give that
    answer: the request makes only the files' own directories, and sets no mode."""
    text = _absent_text(plan)
    if not text:
        return None
    digest = hashlib.sha1(request).hexdigest()
    return digest, quickanswer.absent_for(digest, total, text)


#: The last plan's files and their :func:`quickanswer.shell_absent` text: hosts given the
#: same files (one tuple, see :class:`sync.PlanMemo`) but each a request of its own (files
#: sent ahead) share it. The files are kept with it, so their id is never another's.
_last_absent: List[Any] = [None, ""]


def _absent_text(plan: "sync.Plan") -> str:
    """:func:`quickanswer.shell_absent` of *plan*'s files ("" where it has none), built once
    for the hosts given the same files."""
    files, text = _last_absent
    if files is plan.files:
        return text
    groups: Dict[str, List[str]] = {d: [] for d, mode in plan.dirs if mode is None}
    text = ""
    if len(groups) == len(plan.dirs):
        for item in plan.files:
            directory, name = posixpath.split(item.dest)
            if directory not in groups:
                break
            groups[directory].append(name)
        else:
            text = quickanswer.shell_absent(list(groups.items()))
    _last_absent[:] = [plan.files, text]
    return text


def _check_request(plan: "sync.Plan", items: Sequence["Upload"], rehash: bool,
                   ahead: Sequence[Tuple[int, str, str]], ahead_bytes: int,
                   expect: Optional[str]) -> Tuple[bytes, List[str]]:
    """(the check's request, its trees): one place, so that a run can tell the request the
    next run asks while nothing changes here (see :meth:`EarlyCheck.refresh`)."""
    trees, index = plan.tree_index(items)
    return manifest.request(items, trees, index, dirs=plan.dirs, rehash=rehash, prepare=True,
                            ahead=ahead, ahead_bytes=ahead_bytes, expect=expect), trees


def _changed_here(items: Sequence["Upload"], memo: AheadMemo
                  ) -> List[Tuple[int, Tuple[bytes, str]]]:
    """(index, (bytes, SHA-1)) of the files of *items* to send ahead: all that changed here, or none."""
    picked, total = [], 0
    for i, item in enumerate(items):
        if item.src not in memo:
            memo[item.src] = _read_if_changed(item)
        guess = memo[item.src]
        if guess is False:  # changed here, but too big to go ahead: the copy step is needed
            return []
        if isinstance(guess, tuple):
            picked.append((i, guess))
            total += len(guess[0])
            if len(picked) > AHEAD_FILES or total > AHEAD_BYTES:
                return []
    return picked


def _read_if_changed(item: "Upload") -> Union[Tuple[bytes, str], bool, str, None]:
    """(bytes, SHA-1) of *item*'s source when its stat is new to the hash cache; False when
    it is new but too big to go ahead; the SHA-1 when the cache knows it; None when it
    cannot be read."""
    known = hashcache.LOCAL.known(item.src, item.seen)
    if known is not None:
        return known
    if item.size > AHEAD_FILE:
        return False
    try:
        with open(item.src, "rb") as handle:
            data = handle.read(AHEAD_FILE + 1)
    except OSError:
        return None  # the copy step reports it
    if len(data) != item.size:
        return None  # changing right now: left to the copy step
    return data, hashlib.sha1(data).hexdigest()


def _sha1_of(guess: Union[Tuple[bytes, str], bool, str, None]) -> Optional[str]:
    """The SHA-1 an :data:`AheadMemo` value holds, if it holds one."""
    if isinstance(guess, str):
        return guess
    return guess[1] if isinstance(guess, tuple) else None


def _temp_name(dest: str, token: str) -> str:
    """The temporary file the host stages *dest* as (the host program's own rule)."""
    return posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.rr-{token}.tmp")
