"""The local end of the lanes: extra SSH channels that carry large replies to the agent.

Why: one SSH channel moves at most sshd's 2 MiB window per round trip, so at
20 ms RTT a first run's libraries (200+ MB for ``ffmpeg``) crawl at ~84 MB/s
while the connection could carry three times that (measured: 1 channel
84 MB/s, 3 channels 226 MB/s, 4 channels 251 MB/s at 10 ms each way). The
agent side and the rules a lane obeys are in :mod:`.host.lanes`.

Lanes are opened only once a reply is large enough to use one, so a warm run
that fetches nothing starts no relay on the host. Each lane is a
:class:`~.protocol.FrameWriter` over its own channel, used only once the
agent said (on the main channel) that it accepted the lane: before that, a
relay that could not connect would swallow what was written to it. A reply
goes to the least busy lane. A write that fails retires its lane and the
reply goes on the main channel; a lane the agent loses makes it ask again
for the reads still unanswered. Lanes can only make a session faster, never
break it.
"""

from __future__ import annotations

import logging
import shlex
import threading
from typing import Any, Callable, Dict, List, Optional

from remote_runner.mirror import protocol as P

LOG = logging.getLogger("remote_runner.mirror.session")

#: Extra channels per session, besides the agent's own (OpenSSH allows 10 sessions a connection).
DEFAULT_LANES = 3
#: Replies with at least this many payload bytes may take a lane.
LANE_MIN = 64 << 10


def relay_command(python: str, socket_path: str) -> str:
    """The shell command a lane runs on the host (every word quoted)."""
    return " ".join(["exec", shlex.quote(python), "-I", "-S", "-c", shlex.quote(P.LANE_RELAY),
                     shlex.quote(socket_path)])


class _Lane:
    def __init__(self, number: int, stream: Any, main: P.FrameWriter) -> None:
        self.number = number
        self.stream = stream
        self.writer = P.FrameWriter(stream.write_all)
        self.writer.compress = main.compress
        # One policy for all the connection's channels: its pace is theirs together.
        self.writer.policy = main.policy
        self.busy = 0


class Lanes:
    """Up to *count* lanes to the agent that said where they connect (its hello's ``lanes``)."""

    def __init__(self, open_stream: Callable[[str], Any], offer: Any, python: str,
                 main: P.FrameWriter, count: int = DEFAULT_LANES, host: str = "host") -> None:
        self._open_stream = open_stream
        ok = isinstance(offer, dict) and isinstance(offer.get("socket"), str) \
            and isinstance(offer.get("token"), str)
        self._socket = offer["socket"] if ok else ""
        self._token = offer["token"] if ok else ""
        self.python = python
        self.count = count if ok else 0
        self.main = main
        self.host = host
        self._lanes: List[_Lane] = []
        self._unconfirmed: Dict[int, _Lane] = {}
        self._all: List[_Lane] = []
        self._lock = threading.Lock()
        self._opening = False
        self._closed = False
        #: Replies sent on lanes and lanes that failed.
        self.frames = 0
        self.failed = 0

    @property
    def wanted(self) -> int:
        """How many lanes the boot frame asks the agent to accept."""
        return self.count

    def send(self, header: Dict[str, Any], payload: bytes, compressible: bool = False) -> bool:
        """Send a reply on a lane if one is open; False: the caller sends it on the main channel."""
        if self.count <= 0 or len(payload) < LANE_MIN:
            return False
        with self._lock:
            if not self._lanes:
                self._start_opening()
                return False
            lane = min(self._lanes, key=lambda item: item.busy)
            lane.busy += 1
        try:
            lane.writer.send(header, payload, compressible)
        except OSError as exc:
            self._retire(lane, f"write failed: {exc}")
            return False
        finally:
            with self._lock:
                lane.busy -= 1
        with self._lock:
            self.frames += 1
        return True

    def on_frame(self, header: Dict[str, Any], _: bytes = b"") -> Optional[Dict[str, Any]]:
        """A ``lane`` frame from the agent; returns the frame to answer with, if any.

        ``lane``: the agent accepted that lane. ``gone``: it ended there; it
        is retired here, and the answer (``retired``) tells the agent that
        nothing more will be written to it.
        """
        gone = header.get("gone")
        if isinstance(gone, int):
            with self._lock:
                lanes = [lane for lane in self._lanes + list(self._unconfirmed.values()) if lane.number == gone]
            for lane in lanes:
                self._retire(lane, "the agent lost it")
            return {"t": P.LANE, "retired": gone}
        self.confirmed(header)
        return None

    def confirmed(self, header: Dict[str, Any], _: bytes = b"") -> None:
        """The agent accepted lane ``header["lane"]`` (a ``lane`` frame on the main channel)."""
        with self._lock:
            lane = self._unconfirmed.pop(header.get("lane"), None) if isinstance(header.get("lane"), int) else None
            if lane is not None and not self._closed:
                self._lanes.append(lane)

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            open_now, every = len(self._lanes), list(self._all)
        return {"lanes_open": open_now, "lane_frames": self.frames, "lanes_failed": self.failed,
                "lane_bytes": sum(lane.writer.sent for lane in every),
                "lane_payload": sum(lane.writer.payload_bytes for lane in every)}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            lanes, self._lanes = self._lanes + list(self._unconfirmed.values()), []
            self._unconfirmed.clear()
        for lane in lanes:
            lane.stream.close()

    def _start_opening(self) -> None:
        """(Lock held.) Open the lanes in the background, once."""
        if self._opening or self._closed:
            return
        self._opening = True
        for number in range(self.count):
            threading.Thread(target=self._open_one, args=(number,), daemon=True, name="mirror-lane").start()

    def _open_one(self, number: int) -> None:
        try:
            stream = self._open_stream(relay_command(self.python, self._socket))
        except Exception as exc:  # noqa: BLE001 - e.g. MaxSessions reached: no lane, no harm
            LOG.debug("%s: cannot open a lane: %s", self.host, exc)
            with self._lock:
                self.failed += 1
            return
        lane = _Lane(number, stream, self.main)
        with self._lock:
            if self._closed:
                stream.close()
                return
            self._unconfirmed[number] = lane
            self._all.append(lane)
        try:
            lane.writer.send({"t": P.LANE, "token": self._token, "lane": number})
        except OSError as exc:
            self._retire(lane, f"closed at once: {exc}")

    def _retire(self, lane: _Lane, why: str) -> None:
        LOG.debug("%s: lane retired: %s", self.host, why)
        with self._lock:
            if lane in self._lanes:
                self._lanes.remove(lane)
            for number, waiting in list(self._unconfirmed.items()):
                if waiting is lane:
                    del self._unconfirmed[number]
            self.failed += 1
        lane.stream.close()
