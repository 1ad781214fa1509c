"""Whether and how a payload is packed for the link: the codecs both ends have, and when it pays.

Why apart from :mod:`.protocol`: packing is a policy measured as frames go,
not a wire rule; the frame only says which codec packed a payload (``z``).
Both ends import it (the agent gets a copy inside its zipapp): stdlib only,
Python 3.8 compatible.

A payload is packed only with a codec both ends have: the agent's hello lists
its ``codecs`` (zlib always, from the standard library; lz4 only where
python3-lz4 is installed, which Debian hosts usually lack) and the boot frame
names the one chosen (:func:`choose_codec`). Compression must stay on the
link's side of the trade, and which side that is depends on the link: zlib at
level 1 packs shared libraries at ~44 MB/s (here) to about half, while an SSH
channel on a fast network carries more than that, so packing them there made a
first run of ``ffmpeg -version`` (246 MB of libraries) 5.2 s instead of 2.9 s.
Each writer therefore measures both rates as it goes (:class:`PackPolicy`) and
packs a payload only when the time packing costs is less than the link time it
saves; a payload whose first 16 KiB shrink to a tenth or less is always packed
(text, logs, sparse files: cheap to pack, large to save), one that does not
shrink by a tenth never is (video, archives: a small sample, not a pass).
Unpacking, bounded by the frame's limit, is the protocol's
(:func:`.protocol.decompress`).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional


#: Codecs in order of preference (fastest first); zlib is always there (standard library).
CODECS = ("lz4", "zlib")
#: How much of a large payload is packed first to see whether the whole is worth packing.
SAMPLE = 16 << 10


def lz4_available() -> bool:
    """Tell whether the lz4 frame module can be imported here."""
    try:
        import lz4.frame  # noqa: F401
    except Exception:
        return False
    return True


def available_codecs() -> List[str]:
    """The codecs this end can pack and unpack, in order of preference."""
    return [c for c in CODECS if c != "lz4" or lz4_available()]


def choose_codec(theirs: Any) -> Optional[str]:
    """The first codec of ours that the peer (its hello's ``codecs`` list) has too, or None."""
    offered = theirs if isinstance(theirs, list) else []
    for codec in available_codecs():
        if codec in offered:
            return codec
    return None


def compress(data: bytes, codec: str = "lz4") -> Optional[bytes]:
    """Pack *data* with *codec* (lz4 frames, or zlib level 1); None when the codec is missing."""
    if codec == "zlib":
        import zlib
        return zlib.compress(data, 1)
    try:
        import lz4.frame
    except Exception:
        return None
    return lz4.frame.compress(data)


class PackPolicy:
    """Whether packing a payload pays on this link, from rates measured as frames go.

    Sending *S* bytes raw costs ``S / link``; packed it costs ``S / pack + r*S / link``
    (*r*: the sample's packed fraction), so packing pays when ``link < pack * (1 - r)``.
    Both rates are running throughputs (bytes and seconds, each decayed by the same
    factor per sample, so a slow stretch counts by its time, not by its number of
    writes): the link's from the wall time large frames take to be written (a channel
    whose window is full blocks, so that time is the link's pace; one that does not
    block is faster than we are), packing's from the CPU time its samples take. Until the
    link's pace is known, packing follows the ratio alone, as before measuring.

    Only data that shrinks to a tenth or less is packed whatever the rates: zlib runs
    through such data at 400 MB/s and more here (a log: 445, zeros: 920), faster than
    any link paramiko feeds. Shared libraries' sections shrinking to a fifth pack at
    ~70 MB/s: packing those on a fast link cost a first-ever ``ffmpeg -version``
    0.57 s of CPU for 49 MB when a quarter was the bar, 0.2 s with a tenth.
    """

    #: A sample shrinking to this fraction or less is always packed; above NEVER, never.
    ALWAYS, NEVER = 0.1, 0.9
    #: Frames smaller than this say little about the link's pace.
    TIMED_WRITE = 64 << 10
    DECAY = 0.8

    def __init__(self) -> None:
        self._link = [0.0, 0.0]                     # decayed bytes, seconds
        self._pack: Dict[str, List[float]] = {}     # codec -> decayed bytes, seconds
        self._lock = threading.Lock()
        self._busy_until = 0.0                      # when the last timed write ended

    @classmethod
    def _add(cls, totals: List[float], size: int, seconds: float) -> None:
        totals[0] = totals[0] * cls.DECAY + size
        totals[1] = totals[1] * cls.DECAY + max(seconds, 1e-6)

    def wrote(self, size: int, seconds: float, ended: Optional[float] = None) -> None:
        """Record that *size* bytes took *seconds* to hand to the link, ending at *ended*.

        Writers on several channels of one connection (a session's lanes)
        share a policy and may write at once; with *ended* (``perf_counter``)
        only the time no earlier write covered counts, so the rate is the
        channels' together, not a share of it.
        """
        if size < self.TIMED_WRITE:
            return
        with self._lock:
            if ended is not None:
                seconds = ended - max(ended - seconds, self._busy_until)
                self._busy_until = max(self._busy_until, ended)
            self._add(self._link, size, max(seconds, 0.0))

    def packed(self, codec: str, size: int, seconds: float) -> None:
        """Record that packing *size* bytes with *codec* took *seconds*."""
        with self._lock:
            self._add(self._pack.setdefault(codec, [0.0, 0.0]), size, seconds)

    def link_rate(self) -> Optional[float]:
        """The link's measured pace in bytes/s, or None before any large frame."""
        return self._link[0] / self._link[1] if self._link[1] else None

    def pack_rate(self, codec: str) -> Optional[float]:
        """How fast *codec* has packed samples here, in bytes/s, or None before any."""
        totals = self._pack.get(codec)
        return totals[0] / totals[1] if totals and totals[1] else None

    def pays(self, codec: str, ratio: float) -> bool:
        """Whether a payload whose sample packs to *ratio* of its size should be packed."""
        if ratio > self.NEVER:
            return False
        link, pack = self.link_rate(), self.pack_rate(codec)
        if ratio <= self.ALWAYS or link is None or pack is None:
            return True
        return link < pack * (1.0 - ratio)
