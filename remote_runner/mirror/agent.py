"""The remote half of the mirror: mount the local file system over FUSE and run a command in it.

This is the agent's entry point (``exec`` / ``daemon`` / ``attach``); its
parts are the package :mod:`remote_runner.mirror.host`, shipped to the host
inside a zipapp with ``protocol.py``, ``packing.py``, ``hardlinks.py`` and ``mfusepy.py``
(see :mod:`.bundle`), so all of it stays stdlib-only and Python 3.8
compatible, and mfusepy is imported only after the libfuse version is chosen.

One process does everything, so a lost link cleans up everything:

1. it reads one ``boot`` frame on stdin (the whole session);
2. enters a private mount namespace (root) or a user + mount namespace with
   the local uid mapped onto the connecting user (non-root), before any
   thread exists, since unshare(2) refuses a multi-threaded caller
   (:mod:`.host.namespaces`, :mod:`.host.session`);
3. mounts the FUSE mirror (every operation becomes a ``req`` frame answered
   by the local service; many in flight, matched by id: :mod:`.host.link`,
   :mod:`.host.operations`, :mod:`.host.caches`), binds the host's
   /dev, /proc, /sys and /run into it;
4. runs the command chrooted into the mirror (or, in files-only mode, on the
   host's own root with the local trees mounted at their own paths), as a
   process-group leader, while this process is a child subreaper: when the
   command ends or the link drops, every remaining descendant is killed
   (:mod:`.host.command`, :mod:`.host.jobs`).

``daemon`` mode keeps the mirror for many commands: it listens on a UNIX
socket in a private 0700 directory, and ``attach`` (run in a screen window)
hands its stdio over with SCM_RIGHTS and exits with the command's status.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import sys
from typing import List, Optional, Tuple

from . import packing, protocol as P
from .host.caches import FileCache, fetch_ahead
from .host.names import NameCache
from .host.command import command_user
from .host.jobs import attach, run_daemon, run_exec
from .host.lanes import LaneListener
from .host.link import DEFAULT_DEADLINE, DEFAULT_HEARTBEAT, EXIT_LINK, REQUEST_TIMEOUT, Link
from .host.namespaces import PR_SET_CHILD_SUBREAPER, prctl
from .host.state import hidden_name
from .host.profile import Profile

#: The parts' names that callers (tests, tools) reach through this module.
__all__ = ["NameCache", "FileCache", "Profile", "command_user", "fetch_ahead", "hidden_name", "main"]

LOG = logging.getLogger("remote_runner.mirror.agent")


def _claim_stdio() -> Tuple[int, int]:
    """Move the link off fds 0/1 so nothing else (libfuse, children) can write into it."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    for fd in (in_fd, out_fd):
        os.set_inheritable(fd, False)
    return in_fd, out_fd


def serve(mode: str) -> int:
    """Run the agent's framed session on stdin/stdout."""
    in_fd, out_fd = _claim_stdio()
    link = Link(in_fd, out_fd)
    hello = {"t": P.HELLO, "v": P.PROTOCOL_VERSION, "machine": platform.machine(),
             "lz4": packing.lz4_available(), "codecs": packing.available_codecs(),
             "uid": os.geteuid(), "python": sys.version.split()[0],
             "executable": sys.executable, "agent": os.path.abspath(sys.argv[0])}
    try:  # made now, while no thread exists yet (see host/lanes.py)
        link.lanes = LaneListener(link.deliver, accepted=lambda n: link.send({"t": P.LANE, "lane": n}),
                                  ended=link.lane_gone)
        hello["lanes"] = link.lanes.hello()
    except OSError as exc:
        LOG.debug("no lanes: %s", exc)
    link.send(hello)
    try:
        return _serve(link, mode)
    finally:
        if link.lanes is not None:
            link.lanes.close()


def _serve(link: Link, mode: str) -> int:
    try:
        header, _ = P.read_frame(link.reader)
    except P.ProtocolError as exc:
        LOG.error("no boot frame: %s", exc)
        return EXIT_LINK
    if header.get("t") != P.BOOT:
        return EXIT_LINK
    problem = P.check_version(header.get("v"))
    if problem is None and header.get("machine") != platform.machine():
        problem = "local machine is %s but this host is %s" % (header.get("machine"), platform.machine())
    if problem:
        link.send({"t": P.FAIL, "msg": problem})
        return EXIT_LINK
    codec = "lz4" if header.get("compress") is True else header.get("compress")
    link.writer.compress = codec if codec in packing.available_codecs() else None
    link.heartbeat = float(header.get("hb") or DEFAULT_HEARTBEAT)
    link.deadline = float(header.get("deadline") or DEFAULT_DEADLINE)
    link.request_timeout = float(header.get("rq") or REQUEST_TIMEOUT)
    wanted = header.get("lanes")
    link.lanes_wanted = wanted if isinstance(wanted, int) and not isinstance(wanted, bool) else 0
    if link.lanes is not None and link.lanes_wanted <= 0:
        link.lanes.close()
    logging.getLogger().setLevel(logging.DEBUG if header.get("debug") else logging.WARNING)
    logging.getLogger("fuse").setLevel(logging.DEBUG if header.get("debug_fuse") else logging.WARNING)
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, f: link.mark_lost("agent got signal %d" % s))
    if mode == "daemon":
        return run_daemon(link, header)
    return run_exec(link, header)


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``exec`` / ``daemon`` / ``attach``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="agent: %(levelname)s: %(message)s")
    remove = None
    if argv[:1] == ["--remove"] and len(argv) > 1:
        # the private directory the bootstrap put this agent in (a home it could not write)
        remove, argv = argv[1], argv[2:]
    if not argv:
        sys.stderr.write("usage: agent [--remove DIR] (exec | daemon | attach --socket S --job J)\n")
        return 2
    if argv[0] in ("exec", "daemon"):
        code = serve(argv[0])
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        sys.stderr.flush()
        os._exit(code)
    if argv[0] == "attach":
        opts = dict(zip(argv[1::2], argv[2::2]))
        if "--socket" not in opts or "--job" not in opts:
            sys.stderr.write("usage: agent attach --socket S --job J\n")
            return 2
        return attach(opts["--socket"], opts["--job"])
    sys.stderr.write("unknown agent mode %r\n" % argv[0])
    return 2


if __name__ == "__main__":
    sys.exit(main())
