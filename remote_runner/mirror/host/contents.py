"""The FUSE operations on a file's contents: open, read, write, close, and their kin.

Why apart from the name operations (:mod:`.operations`): here the rule is
"do not wait for this machine unless the program asks for it". A read is
answered from the host's file cache or from what the program wrote itself;
writes, a read-only close and a release go without waiting (see
:mod:`.writes` and :mod:`.posted`), and an error comes back at ``close``
(``flush``) or ``fsync`` at the latest, as on NFS. The handle tables and the
request path are :class:`~.state.MountState`'s.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any, Dict, Optional

from .. import protocol as P
from .caches import LOCAL_FH_BASE
from .state import MountState, caller, hidden_name
from .written import grown_file


class ContentOperations:
    """File contents: each handle's reads, writes, close and sync."""

    m: MountState

    def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
        m = self.m
        if fh:
            m.flushed.pop(fh, None)
        args: Dict[str, Any] = {"size": length}
        if fh and fh < LOCAL_FH_BASE:
            args["fh"] = fh
            m.drain(fh)
        args["path"] = m.wire(path) if path is not None or not fh else "/"
        m.call("truncate", args)
        m.links.changed(path)
        return 0

    def open(self, path: str, flags: int) -> int:
        m = self.m
        if flags & (os.O_ACCMODE | os.O_TRUNC | os.O_CREAT) == os.O_RDONLY and m.written_files:
            fh = m.post_reading(m.wire(path), flags)
            if fh is not None:  # not waited for (see MountState.post_reading)
                return fh
        if m.files is not None and flags & (os.O_ACCMODE | os.O_TRUNC | os.O_CREAT) == os.O_RDONLY:
            return m.open_whole(m.wire(path), flags)
        name = m.wire(path)
        fh = m.post_emptying(name, flags)
        if fh is not None:  # not waited for (see MountState.post_emptying)
            return fh
        header = m.call("open", {"path": name, "flags": flags})[0]
        fh = m.fresh.opened(int(header["fh"]), header)
        m.settle_kernel()
        st = header.get("st")
        if flags & os.O_TRUNC and isinstance(st, dict) and st.get("st_size") == 0:
            # emptied: like a file just made (its size and times follow its writes)
            if stat.S_ISREG(st.get("st_mode", 0)):
                # and, truncated, it lost any capability (the kernel drops it on truncate):
                # the first write's check for one is answered here, as for a new file
                m.no_caps[path] = (0.0, st.get("st_ctime"))
            since = m.cache.begin()
            if m.cache.put(name, st, watched=m.cache.kept(name), since=since):
                m.created[fh] = st.get("st_ino")
                m.track_written(name, fh)
        if flags & os.O_DSYNC:
            m.sync_handles[fh] = None
        return fh

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        m = self.m
        fh = None if hidden_name(path) else m.post_create(m.wire(path), mode, flags, caller())
        if fh is not None:  # not waited for (see MountState.post_create)
            m.no_caps[path] = (0.0, (m.cache.get(m.wire(path)) or {}).get("st_ctime"))
            m.remember_new_file(m.wire(path))
            return fh
        m.check_changes("create", {"path": m.wire(path)})
        header = m.call("create", {"path": m.wire(path), "mode": mode, "flags": flags, "ctx": caller()})[0]
        fh = int(header["fh"])
        if isinstance(header.get("st"), dict):
            m.created[fh] = header["st"].get("st_ino")
            if header["st"].get("st_size") == 0:
                m.track_written(m.wire(path), fh)
                # a new (or emptied) file has no capability until one is set, which changes its ctime
                m.no_caps[path] = (0.0, header["st"].get("st_ctime"))
                m.remember_new_file(m.wire(path))
        if flags & os.O_DSYNC:
            m.sync_handles[fh] = None
        return fh

    def read_buf(self, *args: Any) -> int:  # registers the callback; MirrorFUSE.read_buf answers it
        raise NotImplementedError

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        m = self.m
        if fh >= LOCAL_FH_BASE:
            m.link.answer_here("read")
            return os.pread(m.local_fd(fh), size, offset)
        if m.written_files and path is not None:
            known = m.written_files.read(m.wire(path), offset, size, m.cache.changed_since)
            if known is not None:
                m.link.answer_here("read")
                return known
        m.drain(fh)  # reading back what was just written
        if fh in m.fresh:
            return m.read_fresh(path, fh, size, offset)
        return m.read_through(path, fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        m = self.m
        data = bytes(data)
        m.flushed.pop(fh, None)
        if path is not None:
            name = m.wire(path)
            m.written_files.wrote(name, fh, offset, data)
            since = m.cache.begin()
            known = m.cache.get(name) if fh in m.created else None
            guess = grown_file(known, offset, len(data), time.time_ns())
            if guess is None or guess.get("st_ino") != m.created.get(fh) or not m.cache.put(
                    name, guess, watched=m.cache.kept(name), since=since):
                m.cache.changed(name)
            else:
                m.guesses.supersede(name)  # a chmod's reply, taken before this write, is older
                if known is not None and m.no_caps.get(path, (0.0, None))[1] == known.get("st_ctime"):
                    m.no_caps[path] = (m.no_caps[path][0], guess["st_ctime"])  # still none: writes only drop them
            with m.writing_lock:
                if m.written.get(fh) != name:
                    m.writing.get(m.written.get(fh, ""), {}).pop(fh, None)
                    m.writing.setdefault(name, {})[fh] = None
                    m.written[fh] = name
        if fh in m.sync_handles:
            done = int(m.call("write", {"fh": fh, "off": offset}, data)[0]["n"])
        else:
            # Sent without waiting (see writes.py): an error comes back at close or fsync.
            done = m.writes.write(fh, offset, data)
            m.link.count_posted("write")
        m.links.changed(path)
        return done

    def flush(self, path: str, fh: int) -> int:
        m = self.m
        if fh >= LOCAL_FH_BASE or fh in m.reading:
            # A read-only handle has nothing to write back and no error to report.
            m.link.answer_here("flush")
            return 0
        if m.writes.pending(fh):
            # close: the flush goes after the handle's writes; one wait for all of them.
            # Its reply brings the file's attributes, which replace what was guessed.
            since = m.cache.begin()
            name = m.wire(path) if path is not None else None
            args: Dict[str, Any] = {"fh": fh, "st": 1}
            m.after_changes(args)  # its attributes then follow a chmod sent before it, too
            # Numbered only then: a change sent meanwhile and ordered after this handle's
            # requests (after_fh, see MountState.after_names) cannot be one this waits for.
            args["seq"] = m.writes.next_seq(fh)
            slot = m.link.submit("flush", args)
            header: Dict[str, Any] = {}
            try:
                m.writes.settle(fh)
                header = m.link.wait(slot)[0]
            except OSError as exc:
                if name is not None:
                    m.written_files.drop(name)  # what failed to be written is not there
                raise m.fault(exc.errno or errno.EIO)
            finally:
                if name is not None:
                    st = header.get("st")
                    # (kept until told only if the host also holds the name's directory so)
                    if isinstance(st, dict) and m.cache.put(
                            name, st, watched=bool(header.get("w")) and m.cache.kept(name), since=since):
                        m.flushed[fh] = None
                        m.guesses.supersede(name)
                    else:
                        m.cache.changed(name)
                    if fh in m.created and m.drops is not None:
                        m.drops.drop([name], wait=False)  # the kernel's copy of a guess, too
            return 0
        # Nothing sent and not waited for: the local close would report nothing
        # (the local file system keeps no error for a handle without writes).
        m.link.answer_here("flush")
        return 0

    def release(self, path: str, fh: int) -> int:
        m = self.m
        m.fresh.released(fh)
        if fh >= LOCAL_FH_BASE:
            m.files.release(fh)
            m.link.answer_here("release")
            return 0
        if fh in m.reading:
            # Closing a read-only handle changes nothing the program could see:
            # the local side closes it while the program goes on (after its open).
            m.reading.pop(fh, None)
            m.link.answer_here("release")
            if P.posted_handle(fh):  # opened without waiting (MountState.post_reading)
                m.link.post("release", {"fh": fh, "seq": m.writes.next_seq(fh)})
                m.writes.forget(fh)
            else:
                m.link.post("release", {"fh": fh})
            return 0
        # A handle written through: nothing left to report (close did), so not
        # waited for either; numbered, so it comes after the handle's writes.
        m.sync_handles.pop(fh, None)
        m.created.pop(fh, None)
        clean = fh in m.flushed  # unwritten since its close brought the attributes: they stand
        m.flushed.pop(fh, None)
        m.link.post("release", {"fh": fh, "seq": m.writes.next_seq(fh)})
        m.writes.forget(fh)
        m.forget_handle(fh)
        m.stop_writing(fh)
        if path is not None and not clean:
            m.cache.changed(m.wire(path))
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        m = self.m
        if fh >= LOCAL_FH_BASE:
            return 0
        try:
            m.writes.settle(fh)
        except OSError as exc:
            raise m.fault(exc.errno or errno.EIO)
        m.call("fsync", {"fh": fh, "data": bool(datasync)})
        return 0

    def fallocate(self, path: Optional[str], mode: int, offset: int, size: int, fh: int) -> int:
        m = self.m
        if fh >= LOCAL_FH_BASE:
            raise m.fault(errno.EBADF)
        m.drain(fh)
        m.flushed.pop(fh, None)
        if path is not None:
            m.written_files.drop(m.wire(path))
        m.call("fallocate", {"fh": fh, "mode": mode, "off": offset, "len": size})
        m.links.changed(path)
        return 0
