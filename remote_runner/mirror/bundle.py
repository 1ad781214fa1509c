"""The agent zipapp shipped to hosts, and the one-exec shell line that runs it.

Nothing is installed on a host by hand: the agent (``agent.py`` +
``protocol.py`` + the single-file ``mfusepy.py``) is packed into a zipapp
whose bytes are deterministic, so its sha256 names it. The host keeps it at
``~/.cache/remote-runner/agent-<sha256>.pyz``; a later run costs one exec that
finds the file and starts it. On a miss the same exec prints ``NEED`` and
reads exactly the payload from stdin with python3 (no head/cat quirks), writes
it atomically (temp file + rename) and starts it.

mfusepy declares Python >= 3.9 but only needs postponed annotations (and its
three module-level type aliases quoted) to import on 3.8; the bundled copy
gets exactly that rewrite, checked by a test that imports it with Python 3.8.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import shlex
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List

from remote_runner.errors import MirrorError

NEED_MARKER = b"RR-MIRROR-NEED-AGENT\n"
CACHE_DIR = ".cache/remote-runner"
_HERE = Path(__file__).resolve().parent
_ALIAS = re.compile(rb"^([A-Za-z_]\w*) = ((?:Union|Iterable|tuple|dict|list)\[.*)$", re.M)

MAIN = """import sys
from rrmirror.agent import main
sys.exit(main())
"""

_RECEIVER = (
    "import os,sys\n"
    "n=int(sys.argv[2]);p=sys.argv[1];t=p+'.tmp.%d'%os.getpid()\n"
    "fd=os.open(t,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600)\n"
    "while n>0:\n"
    " b=os.read(0,min(n,1<<20))\n"
    " if not b: sys.exit('remote-runner: agent upload cut short')\n"
    " os.write(fd,b);n-=len(b)\n"
    "os.fsync(fd);os.close(fd);os.rename(t,p)\n"
)


@dataclass(frozen=True)
class AgentBundle:
    """The zipapp bytes and their content hash."""

    data: bytes
    sha256: str

    @property
    def filename(self) -> str:
        return f"agent-{self.sha256[:32]}.pyz"

    def launch_command(self, mode: str, python: str = "python3") -> str:
        """Return the remote shell line: run the cached agent, or fetch it then run it."""
        path = f'"${{HOME:-/tmp}}"/{CACHE_DIR}/{self.filename}'
        py = shlex.quote(python)
        mode_q = shlex.quote(mode)
        receiver = shlex.quote(_RECEIVER)
        need = NEED_MARKER.decode().strip()
        return (
            f"umask 077; f={path}; "
            f'if test -f "$f"; then exec {py} "$f" {mode_q}; fi; '
            f'mkdir -p "$(dirname "$f")" || exit 126; '
            f"echo {need}; "
            f'{py} -c {receiver} "$f" {len(self.data)} || exit 126; '
            f'exec {py} "$f" {mode_q}'
        )


def _mfusepy_source() -> bytes:
    spec = importlib.util.find_spec("mfusepy")
    if spec is None or not spec.origin:
        raise MirrorError("mfusepy is not installed locally; the mirror agent needs it (pip install mfusepy)")
    source = Path(spec.origin).read_bytes()
    # PEP 585 generics (tuple[...], dict[...]) in module-level aliases fail on 3.8.
    source = _ALIAS.sub(lambda m: m.group(1) + b" = " + repr(m.group(2).decode()).encode(), source)
    if b"from __future__ import annotations" not in source:
        source = b"from __future__ import annotations\n" + source
    return source


def _entries() -> List[tuple]:
    return [
        ("__main__.py", MAIN.encode()),
        ("rrmirror/__init__.py", b""),
        ("rrmirror/protocol.py", (_HERE / "protocol.py").read_bytes()),
        ("rrmirror/agent.py", (_HERE / "agent.py").read_bytes()),
        ("mfusepy.py", _mfusepy_source()),
    ]


@lru_cache(maxsize=1)
def build_bundle() -> AgentBundle:
    """Build the agent zipapp (deterministic bytes, so the hash is stable)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _entries():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    data = buf.getvalue()
    return AgentBundle(data=data, sha256=hashlib.sha256(data).hexdigest())
