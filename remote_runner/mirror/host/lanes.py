"""Extra SSH channels that bring large replies to the agent: bulk data past one channel's window.

Why: an SSH channel carries at most its receive window per round trip, and
OpenSSH's sshd gives a session channel 2 MiB. At 20 ms RTT that caps the
link at ~100 MB/s (84 MB/s measured), so a first run that fetches a
program's 200 MB of libraries spends most of its time waiting for window
adjustments. Several channels each have a window of their own.

The agent's stdin is one channel; the others ("lanes") reach it through a
UNIX socket in a private 0700 directory, made before the hello (while the
agent is still single-threaded, as unshare(2) requires) and named in it,
together with a random token. The local side opens each lane as an exec
channel running a relay (:data:`~..protocol.LANE_RELAY`: stdin to the
socket, nothing else) and sends the token as the lane's first frame, so the
relay never sees it on its command line. A lane is accepted only with that
token, and said accepted on the main channel (a ``lane`` frame with its
number): the local side writes nothing to a lane before that. Afterwards a
lane may carry only replies (``rep`` frames) to requests this agent made,
matched by id like those on stdin. Anything else closes the lane, never the
session. Lanes are a speed-up, not a dependency: a reply the local side
could not write to a lane goes on the main channel, and when a lane ends
while the session goes on, the agent asks again for the reads still
unanswered (a read can be served twice; the first answer wins) and says
``gone``; the local side stops using the lane and says ``retired``, and the
agent asks again once more, for what was written to the lane after it died.

Replies may now arrive in another order than invalidations sent after them.
Every answer kept from a reply is already checked against the invalidations
that arrived since it was asked for (:meth:`.names.NameCache.begin`), and a
read that overlapped an invalidation of its file is made again
(:meth:`.state.MountState.read_through`), so a lane never makes stale data
look current.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from typing import Any, Callable, Dict, Optional

from .. import protocol as P

LOG = logging.getLogger("remote_runner.mirror.agent")

#: Lanes accepted at most (the local side asks for fewer).
MAX_LANES = 8
#: Seconds a connection may take to present its token.
TOKEN_TIMEOUT = 10.0


class LaneListener:
    """The private socket lanes connect to, and their reader threads."""

    def __init__(self, deliver: Callable[[Dict[str, Any], bytes], None],
                 accepted: Callable[[int], None], ended: Callable[[int], None]) -> None:
        self._deliver = deliver
        self._accepted = accepted
        self._ended = ended
        self.token = secrets.token_hex(16)
        self.directory = tempfile.mkdtemp(prefix="rr-lanes-")
        os.chmod(self.directory, 0o700)
        self.path = os.path.join(self.directory, "s")
        self._server: Optional[socket.socket] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(MAX_LANES)
        self._lock = threading.Lock()
        #: Lanes accepted, lanes refused, frames and bytes received on lanes.
        self.accepted = 0
        self.refused = 0
        self.frames = 0
        self.received = 0
        self._wanted = MAX_LANES

    def hello(self) -> Dict[str, str]:
        """What the hello tells the local side: where to connect and the token to present."""
        return {"socket": self.path, "token": self.token}

    def start(self, wanted: int) -> None:
        """Accept up to *wanted* lanes in a thread (0: close the socket now)."""
        self._wanted = max(0, min(int(wanted), MAX_LANES))
        if self._wanted == 0:
            self.close()
            return
        threading.Thread(target=self._accept_loop, daemon=True, name="lanes-accept").start()

    def close(self) -> None:
        """Stop listening and remove the socket's directory (lanes already open go on)."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
            except OSError:
                pass
            server.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"lanes": self.accepted, "lanes_refused": self.refused,
                    "lane_frames": self.frames, "lane_bytes": self.received}

    def _accept_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    server = self._server
                    done = self.accepted >= self._wanted
                if server is None or done:
                    return
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                threading.Thread(target=self._lane, args=(conn,), daemon=True, name="lane").start()
        finally:
            self.close()

    def _lane(self, conn: socket.socket) -> None:
        reader = _SocketReader(conn)
        accepted = False
        number = -1
        seen = 0
        try:
            conn.settimeout(TOKEN_TIMEOUT)
            header, _ = P.read_frame(reader)
            given = header.get("token") if header.get("t") == P.LANE else None
            number = header.get("lane")
            if not isinstance(given, str) or not hmac.compare_digest(given, self.token) \
                    or not isinstance(number, int) or isinstance(number, bool):
                with self._lock:
                    self.refused += 1
                LOG.warning("lanes: refused a connection without this session's token")
                return
            with self._lock:
                if self.accepted >= self._wanted:
                    return
                self.accepted += 1
                enough = self.accepted >= self._wanted
            accepted = True
            if enough:
                self.close()  # no listening socket longer than needed
            conn.settimeout(None)
            self._accepted(number)
            while True:
                header, payload = P.read_frame(reader)
                if header.get("t") != P.REP:
                    LOG.warning("lanes: a %r frame on a lane; closing it", header.get("t"))
                    return
                with self._lock:
                    self.frames += 1
                    self.received += reader.received - seen
                seen = reader.received
                self._deliver(header, payload)
        except (P.LinkClosed, P.ProtocolError, OSError, ValueError):
            pass
        finally:
            conn.close()
            if accepted:
                self._ended(number)  # what the lane did not bring is asked for again


class _SocketReader:
    """:func:`~..protocol.read_frame`'s stream over a socket (which may have a timeout)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.received = 0

    def read(self, size: int) -> bytes:
        data = self.conn.recv(min(size, 1 << 20))
        self.received += len(data)
        return data
