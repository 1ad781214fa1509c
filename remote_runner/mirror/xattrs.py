"""Extended attributes, where the local file system has them (mixed into the file service).

Why apart: ``ls -l`` asks every file for two attributes (its SELinux label
and its ACL) that files seldom have, so a "none" answer carries the names
nearby that have none at all (see :meth:`ExtendedAttributes.op_getxattr`);
that rule and the four calls are all this part of the service is about. It
uses the service's ``_path`` (the exports' check), ``_held`` (a name the
host unlinked while open) and ``_served_entries`` (a directory's served names).
"""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, List, Tuple

from remote_runner.mirror import protocol as P
from remote_runner.mirror.replies import OpError, Reply


class ExtendedAttributes:
    """(Mixed into LocalFileService) getxattr, listxattr, setxattr and removexattr on this machine's files."""

    def _xpath(self, a: Dict[str, Any], write: bool = False) -> Tuple[bytes, bool]:
        path = self._path(a, write=write)
        held = self._held(a)
        return (held, True) if held is not None else (path, False)

    #: The most entries of a directory one "no such attribute" answer looks at.
    BARE_ENTRIES = 2048

    def op_getxattr(self, a: Dict[str, Any], _: bytes) -> Reply:
        """An attribute's value; when there is none, which names nearby have none at all.

        ``ls -l`` asks each file for two attributes (its SELinux label and its
        ACL) that files seldom have: two round trips per file, 12 s for 250
        files at 10 ms. So "none" comes with the names in the file's directory
        (the served ones) that have no extended attribute at all, each with its
        ctime read before looking (setting an attribute changes it): the host
        answers "none" for them itself while their ctime is that one.
        """
        path, follow = self._xpath(a)
        try:
            return Reply(payload=os.getxattr(path, str(a["name"]), follow_symlinks=follow))
        except OSError as exc:
            if exc.errno != errno.ENODATA or follow:
                raise
        return Reply({"none": 1, "bare": self._bare_names(a)})

    def _bare_names(self, a: Dict[str, Any]) -> List[List[Any]]:
        """[wire name, ctime ns] of the served names beside ``a["path"]`` with no extended attribute."""
        raw = P.name_from_wire(a["path"])
        directory = os.path.dirname(raw) or b"/"
        out: List[List[Any]] = []
        try:
            where = self._path({"path": P.name_to_wire(directory)})
            for n, entry in enumerate(self._served_entries(directory, where)):
                if n >= self.BARE_ENTRIES:
                    break
                try:
                    ctime = entry.stat(follow_symlinks=False).st_ctime_ns
                    if not os.listxattr(entry.path, follow_symlinks=False):
                        out.append([P.name_to_wire(entry.name), ctime])
                except OSError:
                    continue
        except (OpError, OSError):
            return []
        return out

    def op_listxattr(self, a: Dict[str, Any], _: bytes) -> Reply:
        path, follow = self._xpath(a)
        names = os.listxattr(path, follow_symlinks=follow)
        return Reply(payload=b"\0".join(os.fsencode(n) for n in names))

    def op_setxattr(self, a: Dict[str, Any], value: bytes) -> Reply:
        path, follow = self._xpath(a, write=True)
        os.setxattr(path, str(a["name"]), value, int(a.get("flags") or 0), follow_symlinks=follow)
        return Reply()

    def op_removexattr(self, a: Dict[str, Any], _: bytes) -> Reply:
        path, follow = self._xpath(a, write=True)
        os.removexattr(path, str(a["name"]), follow_symlinks=follow)
        return Reply()
