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

The request goes on stdin (a big tree's list does not fit a command line), and
the host program reads exactly its length, leaving the rest of the channel to
the lock. An answer that does not parse, or a host without python3, also leaves
the check to the copy step, which then takes its usual fallbacks.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

from remote_runner import manifest, sync

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec


@dataclass
class EarlyCheck:
    """One host's change check, asked with the lock: its plan, request and answer."""

    host: str
    plan: sync.Plan
    #: the base directory each component with files was asked about (its key -> path)
    bases: Dict[Tuple[str, str], str]
    request: bytes
    answer: Optional[manifest.Answer] = None

    @property
    def script(self) -> str:
        """The shell text the lock's channel runs after the prepare script (reads the request)."""
        return manifest.run_script(len(self.request))

    def take(self, output: str) -> None:
        """Read the answer in what the lock's channel printed (None when there is none)."""
        self.answer = manifest.read_answer(self.host, output, len(self.plan.files))

    def usable(self, resolved: Dict[Tuple[str, str], str]) -> bool:
        """True when there is an answer and the host resolved every base dir as asked."""
        return self.answer is not None and all(resolved.get(key) == base
                                               for key, base in self.bases.items())


def plan_ahead(host: str, specs: Sequence["ComponentSpec"], always_copy: bool = False,
               rehash: bool = False, plans: Optional["sync.PlanMemo"] = None
               ) -> Optional[EarlyCheck]:
    """The check to ask with *host*'s lock, or None when it must wait for the copy step.

    *plans* gives the plans the run already built (see :class:`sync.PlanMemo`).
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
    trees, index = plan.tree_index(items)
    request = manifest.request(items, trees, index, dirs=plan.dirs, rehash=rehash, prepare=True)
    return EarlyCheck(host, plan, bases, request)
