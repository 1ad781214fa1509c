"""The local end of the link to the agent: upload and handshake, boot frame, requests served by a pool.

Why apart: one SSH channel carries everything; this is where frames are read,
file-system requests handed to :class:`~.service.LocalFileService` on worker
threads, heartbeats checked and the agent's stderr kept for a clear error.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from remote_runner import hashcache
from remote_runner.errors import MirrorError
from remote_runner.mirror import packing, protocol as P
from remote_runner.mirror.bundle import ALTERED_MARKER, NEED_MARKER, AgentBundle
from remote_runner.mirror.lanes import DEFAULT_LANES, Lanes
from remote_runner.mirror.environment import cache_origin
from remote_runner.mirror.service import LocalFileService
from remote_runner.mirror.watcher import ChangeWatcher, inval_frame
from remote_runner.mirror.streams import PeekReader

#: Shares the session's logger: its messages and debug switch are the session's.
LOG = logging.getLogger("remote_runner.mirror.session")

HEARTBEAT = 5.0
DEADLINE = 20.0
#: Seconds any one read or write of the handshake may wait (no heartbeat runs before the hello).
HANDSHAKE_TIMEOUT = 60.0
#: Replies that may take a lane when large: file data, whose every use on the host is
#: checked against the invalidations that arrived since it was asked for.
LANE_OPS = frozenset(("read", "open"))
#: Seconds close() waits for the reader thread to end (so it never prints at exit).
READER_JOIN = 2.0
#: Milliseconds the reader waits for input at a time (then checks whether the link is lost).
POLL_MS = 500


@dataclass
class MirrorOptions:
    """How a mirror session behaves (the ``exec`` flags)."""

    files_only: bool = False
    forward_env: Sequence[str] = ()
    debug_rpc: bool = False
    compress: bool = True
    #: Let the host fetch read-only files whole and keep copies (checked at every open).
    file_cache: bool = True
    heartbeat: float = HEARTBEAT
    deadline: float = DEADLINE
    #: A file operation unanswered this long fails with EIO on the host.
    request_timeout: float = 60.0
    workers: int = 8
    exports: Optional[List[bytes]] = None
    #: ``--export PATH[:ro]``: trees served besides the defaults (see exports.py).
    export: Sequence[str] = ()
    #: ``--read-only``: nothing served can be changed.
    read_only: bool = False
    #: ``--private-tmp``: the host gives the command its own /tmp and /var/tmp (host/scratch.py).
    private_tmp: bool = False
    #: The command's ``$TMPDIR`` is a directory of the host (``--local-tmpdir`` turns it off; tmpdir.py).
    host_tmpdir: bool = True
    #: Extra SSH channels for large replies (:mod:`.lanes`); 0: everything on the agent's channel.
    lanes: int = DEFAULT_LANES


class LocalLink:
    """The framed channel to the agent, seen from the local side."""

    def __init__(self, stream: Any, service: LocalFileService, options: MirrorOptions,
                 host: str = "host", open_lane: Optional[Callable[[str], Any]] = None) -> None:
        self.stream = stream
        #: Opens a stream running a shell command on the host (for lanes), if this link may.
        self.open_lane = open_lane
        self.lanes: Optional[Lanes] = None
        self.reader = PeekReader(stream)
        self.writer = P.FrameWriter(stream.write_all)
        self.service = service
        self.options = options
        self.host = host
        self.handlers: Dict[str, Callable[[Dict[str, Any], bytes], None]] = {}
        self.lost = threading.Event()
        self.lost_reason = ""
        self.last_rx = time.monotonic()
        self.hello: Dict[str, Any] = {}
        self.stderr_tail: List[str] = []
        self.pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="mirror-fs")
        #: Requests served here, per operation (see :meth:`stats`).
        self.served: Dict[str, int] = {}
        self._count_lock = threading.Lock()
        #: Watches what the host keeps answers from; None without inotify (the host keeps leases).
        self.watcher = service.watcher if service.watcher is not None else ChangeWatcher.create(None)
        #: Set once the boot frame is sent: the agent reads nothing else first.
        self.booted = threading.Event()
        self._poller: Any = None
        if self.watcher is not None:
            self.watcher.report_to(self._report)
        service.watcher = self.watcher

    # -- startup -------------------------------------------------------------
    def handshake(self, bundle: AgentBundle) -> Dict[str, Any]:
        """Upload the agent if the host asks for it, then read and check its hello.

        Before the hello no heartbeat watches the link: every read and write of the
        handshake waits at most :data:`HANDSHAKE_TIMEOUT` (a host that never answers,
        or stops reading the agent, ends the start with an error instead of a hang).
        """
        bound = getattr(self.stream, "set_timeout", None)
        if bound is not None:
            bound(HANDSHAKE_TIMEOUT)
        try:
            return self._handshake(bundle)
        finally:
            if bound is not None:
                bound(None)

    def _handshake(self, bundle: AgentBundle) -> Dict[str, Any]:
        threading.Thread(target=self._stderr_loop, daemon=True, name="mirror-stderr").start()
        first = self.reader.peek(len(NEED_MARKER))
        if first in (NEED_MARKER, ALTERED_MARKER):
            self.reader.read(len(NEED_MARKER))
            if first == ALTERED_MARKER:
                LOG.warning("%s: the cached mirror agent on the host was altered (its sha256 is "
                            "not %s...); replacing it", self.host, bundle.sha256[:12])
            LOG.info("%s: uploading the mirror agent (%d bytes, sha256 %s...)", self.host,
                     len(bundle.data), bundle.sha256[:12])
            try:
                self.stream.write_all(bundle.data)
            except OSError as exc:
                raise MirrorError(self._startup_failure(
                    f"the host did not take the mirror agent ({exc})")) from exc
        try:
            header, _ = P.read_frame(self.reader)
        except P.ProtocolError as exc:
            raise MirrorError(self._startup_failure("the mirror agent did not start (%s)" % exc))
        if header.get("t") != P.HELLO:
            raise MirrorError(f"host {self.host}: unexpected first frame {header.get('t')!r}")
        problem = P.check_version(header.get("v"))
        if problem:
            raise MirrorError(f"host {self.host}: mirror agent {problem}")
        if header.get("machine") != platform.machine():
            raise MirrorError(f"host {self.host}: the host is {header.get('machine')} but this machine is "
                              f"{platform.machine()}; the mirror runs local programs, so both must match")
        self.hello = header
        offered = header.get("codecs") or (["lz4"] if header.get("lz4") else [])
        self.writer.compress = packing.choose_codec(offered) if self.options.compress else None
        if self.open_lane is not None and self.options.lanes > 0 and header.get("lanes"):
            self.lanes = Lanes(self.open_lane, header["lanes"], str(header.get("executable") or "python3"),
                               self.writer, self.options.lanes, self.host)
            self.handlers[P.LANE] = self._lane_frame
        return header

    def _report(self, paths: List[bytes], trees: List[bytes], everything: bool) -> None:
        """Tell the host what changed here; before the boot frame there is nothing to tell.

        The watcher is made early (:func:`~.session.plan_command`) and sees
        local changes during the handshake, but the agent's first frame must
        be the boot, and it holds nothing of this machine before its
        ``validate``, whose answers are made after (or checked against) them.
        """
        if self.booted.is_set():
            self.send(inval_frame(paths, trees, everything))

    def _lane_frame(self, header: Dict[str, Any], payload: bytes) -> None:
        if self.lanes is not None:
            answer = self.lanes.on_frame(header, payload)
            if answer is not None:
                self.send(answer)

    def _startup_failure(self, what: str) -> str:
        time.sleep(0)  # let the stderr thread catch up without a fixed wait
        status = self.stream.exit_status(5.0)
        tail = " | ".join(self.stderr_tail[-5:])
        text = f"host {self.host}: {what}"
        if status == 127 or "python3" in tail and "not found" in tail:
            text += "; python3 (>= 3.8) is required on the host"
        if tail:
            text += f": {tail}"
        return text

    def boot(self, fields: Dict[str, Any]) -> None:
        """Send the single bootstrap frame."""
        header = {"t": P.BOOT, "v": P.PROTOCOL_VERSION, "machine": platform.machine(),
                  "compress": self.writer.compress, "hb": self.options.heartbeat,
                  "deadline": self.options.deadline, "rq": self.options.request_timeout, "debug": LOG.isEnabledFor(logging.DEBUG),
                  "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
        if self.options.file_cache:
            header["cache"] = cache_origin()
        header["watch"] = self.watcher is not None
        header["lanes"] = self.lanes.wanted if self.lanes is not None else 0
        header.update(fields)
        self.send(header)
        self.booted.set()

    def start(self) -> None:
        """Start the reader and heartbeat threads (the reader reports local changes, see
        :meth:`_wait_for_input`, or the watcher has a thread of its own)."""
        if self.watcher is not None:
            wait_fd = getattr(self.stream, "wait_fd", None)
            fd = wait_fd() if wait_fd is not None else None
            if fd is None:
                self.watcher.start()
            else:
                self._poller = select.poll()
                self._poller.register(fd, select.POLLIN)
                self._poller.register(self.watcher.fd, select.POLLIN)
                self.reader.before_read = self._wait_for_input  # (before its first read)
        self._reader_thread = threading.Thread(target=self._read_loop, daemon=True,
                                               name="mirror-read")
        self._reader_thread.start()
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="mirror-heartbeat").start()

    def _wait_for_input(self) -> None:
        """Until the agent's next bytes are here, report local changes as they happen.

        The reader waits here instead of in the channel, so it is also the thread
        that tells the host of changes made here while no request is being
        served; while one is, every change is reported before its reply
        (:meth:`_serve`), and the events of the host's own changes are set aside
        in the same thread (:meth:`~.watcher.ChangeWatcher.own`). A thread of the
        watcher's own (the way for a stream that cannot be polled) woke at each
        of those events, only to find them taken, and took the GIL away from the
        one serving: a scratch file's create, write, close and unlink (four
        events) were served half again as slowly.
        """
        watcher, poller, stream = self.watcher, self._poller, self.stream
        while not self.lost.is_set():
            try:
                ready = poller.poll(POLL_MS)
            except InterruptedError:
                continue
            input_ready = False
            for fd, events in ready:
                if fd == watcher.fd:
                    if events & (select.POLLNVAL | select.POLLERR):
                        poller.unregister(fd)  # (closed: the link is ending)
                        continue
                    if not watcher.report_queued():
                        poller.unregister(fd)
                else:
                    input_ready = True
            if input_ready:
                if stream.read_ready():
                    return
                time.sleep(0.001)  # (only the agent's stderr: its own thread takes that)
        # (lost: the read that follows fails or finds the end)

    # -- running -------------------------------------------------------------
    def send(self, header: Dict[str, Any], payload: bytes = b"", compressible: bool = False,
             defer: bool = False, wait: Optional[float] = None) -> None:
        """Send one frame (*defer*: it may go with the next one, see :meth:`_read_loop`;
        *wait*: see :meth:`FrameWriter.send`); a failure marks the link lost."""
        if self.lost.is_set():
            return
        try:
            self.writer.send(header, payload, compressible, defer, wait)
        except OSError as exc:
            self.mark_lost(f"write failed: {exc}")

    def _flush(self) -> None:
        try:
            self.writer.flush()
        except OSError as exc:
            self.mark_lost(f"write failed: {exc}")

    def mark_lost(self, reason: str) -> None:
        """Record that the link is gone and wake every waiter."""
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    def stats(self) -> Dict[str, Any]:
        """This end's counters: requests served per operation, bytes each way, frames packed."""
        with self._count_lock:
            served = dict(self.served)
        out = {"requests": sum(served.values()), "served": served,
               "bytes_received": self.reader.received, **self.writer.counters()}
        if self.lanes is not None:
            out.update(self.lanes.stats())
            out["bytes_sent"] += out["lane_bytes"]
            out["payload_sent"] += out["lane_payload"]
        return out

    def _serve(self, header: Dict[str, Any], payload: bytes, defer: bool = False) -> None:
        op = str(header.get("op"))
        with self._count_lock:
            self.served[op] = self.served.get(op, 0) + 1
        started = time.monotonic()
        reply, data, compressible = self.service.serve(header, payload)
        if self.options.debug_rpc:
            LOG.info("rpc %s %s -> %s %.2f ms", header.get("op"), header.get("a"),
                     reply.get("e", "ok"), (time.monotonic() - started) * 1000)
        self.flush_changes()  # a change made before this reply reaches the host before it
        try:
            if op in LANE_OPS and self.lanes is not None and not self.lost.is_set() \
                    and self.lanes.send(reply, data, compressible):
                return
            self.send(reply, data, compressible, defer)
        except Exception as exc:  # noqa: BLE001 - the host waits for this answer: it gets one
            LOG.warning("mirror: the reply to %s could not be sent: %r", op, exc)
            self.send({"t": P.REP, "id": header.get("id"), "e": errno.EIO})

    def flush_changes(self) -> None:
        """Send the invalidations of every local change made so far, ahead of what follows."""
        if self.watcher is not None:
            self.watcher.flush()

    def _read_loop(self) -> None:
        self.service.reader_ident = threading.get_ident()
        try:
            while True:
                header, payload = P.read_frame(self.reader)
                self.last_rx = time.monotonic()
                kind = header["t"]
                if kind == P.REQ:
                    if self.service.runs_now(header, len(payload)):
                        self._serve(header, payload, defer=True)
                    else:
                        self._flush()  # (the pool's answer may take a while)
                        self.pool.submit(self._serve, header, payload)
                elif kind == P.PING:
                    self.send({"t": P.PONG})
                elif kind != P.PONG:
                    handler = self.handlers.get(kind)
                    if handler is not None:
                        handler(header, payload)
                    else:
                        LOG.debug("mirror: ignoring frame %r", kind)
                if not self.reader.buffered():
                    # Replies to requests that came together go together (one write,
                    # one packet), once no more of them are here.
                    self._flush()
        except P.LinkClosed:
            self.mark_lost("the SSH channel closed")
        except (P.ProtocolError, OSError) as exc:
            self.mark_lost(f"link error: {exc}")
        except BaseException as exc:  # noqa: BLE001 - a thread must never print a traceback
            # e.g. a request arriving while close() shuts the pool down, or at exit
            if not self.lost.is_set():
                LOG.debug("mirror: reader stopped", exc_info=True)
            self.mark_lost(f"link error: {exc!r}")

    def _heartbeat_loop(self) -> None:
        """Ping the agent; past the deadline without a word from it, the link is lost and its
        stream closed, which also wakes a sender stuck on a host that stopped reading."""
        while not self.lost.wait(self.options.heartbeat):
            if time.monotonic() - self.last_rx > self.options.deadline:
                self.mark_lost(f"no answer from the agent for {self.options.deadline:g} s")
                self.stream.close()
                return
            self.send({"t": P.PING}, wait=0)  # a busy writer is traffic enough

    def _stderr_loop(self) -> None:
        pending = b""
        while True:
            try:
                chunk = self.stream.read_stderr(4096)
            except Exception:  # noqa: BLE001 - the stream was closed under us: nothing more
                chunk = b""
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._agent_line(line.decode("utf-8", "replace"))
        if pending:
            self._agent_line(pending.decode("utf-8", "replace"))

    def _agent_line(self, text: str) -> None:
        self.stderr_tail = (self.stderr_tail + [text])[-20:]
        if "WARNING" in text or "ERROR" in text:
            LOG.warning("%s: %s", self.host, text)
        else:
            LOG.debug("%s: %s", self.host, text)

    def close(self) -> None:
        """Say goodbye, close the stream and release local handles."""
        self.send({"t": P.BYE}, wait=2.0)  # (not behind a write stuck on a host that stopped reading)
        self.mark_lost("closed")
        if self.lanes is not None:
            self.lanes.close()
        self.stream.close()
        hashcache.LOCAL.save()  # the SHA-1s of files a host offered as its own (see host/basis.py)
        reader = getattr(self, "_reader_thread", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(READER_JOIN)  # it ends on the closed stream; nothing left to print
        self.pool.shutdown(wait=False)
        if self.watcher is not None:
            self.watcher.close()
        self.service.close()
