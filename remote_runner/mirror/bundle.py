"""The agent zipapp shipped to hosts, and the one-exec shell line that runs it.

Nothing is installed on a host by hand: the agent (``agent.py`` and its
parts in ``host/``, ``protocol.py``, ``packing.py``, ``hardlinks.py`` and the single-file
``mfusepy.py``) is packed into a zipapp whose bytes are deterministic, so its
sha256 names it. The host keeps it at
``~/.cache/remote-runner/agent-<sha256>.pyz``; a later run costs one exec that
finds the file and starts it. On a miss the same exec prints ``NEED`` and
reads exactly the payload from stdin with python3 (no head/cat quirks), writes
it atomically (temp file + rename) and starts it.

mfusepy declares Python >= 3.9 but only needs postponed annotations (and its
three module-level type aliases quoted) to import on 3.8; the bundled copy
gets exactly that rewrite, checked by a test that imports it with Python 3.8.

Every ``exec`` needs the bundle's bytes and hash, and deflating ~390 KB of
sources took ~15 ms of this machine's CPU before the connection could be
used. So this machine keeps the last few bundles it built, in
``$XDG_CACHE_HOME/remote-runner/agents/`` (``~/.cache/...``), named by the
full stat of every source that went in (this module among them) and by
their own sha256: a source changed in any way (ctime moves with any
change) names another file, and one whose bytes no longer hash to its name
is built again. Reading one back costs well under a millisecond.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

from remote_runner.cachedir import cache_dir
from remote_runner.errors import MirrorError
from remote_runner.shell import PYTHON_FLAGS

NEED_MARKER = b"RR-MIRROR-NEED-AGENT\n"
CACHE_DIR = ".cache/remote-runner"
_HERE = Path(__file__).resolve().parent
_ALIAS = re.compile(rb"^([A-Za-z_]\w*) = ((?:Union|Iterable|tuple|dict|list)\[.*)$", re.M)

MAIN = """import sys
from rrmirror.agent import main
sys.exit(main())
"""

#: Marker printed instead of NEED when a cached agent exists but its hash is wrong.
ALTERED_MARKER = b"RR-MIRROR-REPL-AGENT\n"
assert len(ALTERED_MARKER) == len(NEED_MARKER)

#: Defines ``compiled(p)``: the path of the verified agent *p* compiled by this host's
#: python, built on first use. A zipapp's modules are compiled from source at every
#: start (zipimport never writes bytecode), tens of milliseconds of host CPU per
#: ``exec``; so the host keeps, beside the agent, ``<agent>.<cache_tag>.<sha256[:16]>.pyz``
#: holding only ``.pyc`` files compiled from it. It is used only when its bytes still
#: hash to its name (a damaged or altered one is removed and built again), written
#: atomically like the agent, and any failure to build it runs the agent itself.
COMPILED = (
    "def compiled(p):\n"
    " tag=getattr(sys.implementation,'cache_tag',None)\n"
    " if not tag:return p\n"
    " d=os.path.dirname(p);b=os.path.basename(p)[:-4]+'.'+tag+'.';t=None\n"
    " try:names=os.listdir(d)\n"
    " except OSError:return p\n"
    " for n in names:\n"
    "  if n.startswith(b) and n.endswith('.pyz') and len(n)==len(b)+20:\n"
    "   c=os.path.join(d,n)\n"
    "   try:\n"
    "    with open(c,'rb') as f:\n"
    "     if digest(f.read())[:16]==n[len(b):-4]:return c\n"
    "   except OSError:pass\n"
    "   try:os.unlink(c)\n"
    "   except OSError:pass\n"
    " try:\n"
    "  import io,marshal,zipfile\n"
    "  from importlib.util import MAGIC_NUMBER\n"
    "  out=io.BytesIO()\n"
    "  with zipfile.ZipFile(p) as z,zipfile.ZipFile(out,'w') as o:\n"
    "   for i in z.infolist():\n"
    "    n,s=i.filename,z.read(i)\n"
    "    if n.endswith('.py'):\n"
    "     s=MAGIC_NUMBER+bytes(12)+marshal.dumps(compile(s,p+'/'+n,'exec',dont_inherit=True))\n"
    "     n+='c'\n"
    "    o.writestr(zipfile.ZipInfo(n,(2020,1,1,0,0,0)),s)\n"
    "  data=out.getvalue()\n"
    "  c=os.path.join(d,b+digest(data)[:16]+'.pyz')\n"
    "  t='%s.tmp.%d'%(c,os.getpid())\n"
    "  fd=os.open(t,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600)\n"
    "  try:\n"
    "   v=memoryview(data)\n"
    "   while v:v=v[os.write(fd,v):]\n"
    "   os.fsync(fd)\n"
    "  finally:os.close(fd)\n"
    "  os.rename(t,c)\n"
    "  return c\n"
    " except Exception:\n"
    "  if t:\n"
    "   try:os.unlink(t)\n"
    "   except OSError:pass\n"
    "  return p\n"
)

#: The host's python runs this first, every time (``-c BOOT path sha256 [--fetch] mode...``):
#: it runs the cached agent only when its sha256 is the one this machine built
#: (importing its ``main`` as the zipapp's ``__main__`` does, from the compiled copy,
#: with ``sys.argv[0]`` naming the agent itself).
#: Otherwise (missing, or altered by someone on the host) it asks for the agent
#: (``--fetch``: NEED or REPL marker, then exactly the payload on stdin), checks
#: the payload's hash too, writes it under a temporary name, fsyncs and renames
#: it into place (a failed write leaves nothing behind), and runs it.
BOOT = (
    "import hashlib,os,sys\n"
    "p,h=sys.argv[1],sys.argv[2]\n"
    "def digest(d):return hashlib.sha256(d).hexdigest()\n"
    + COMPILED +
    "try:\n"
    " with open(p,'rb') as f:ok=digest(f.read())==h\n"
    "except OSError:ok=None\n"
    "rest=sys.argv[3:]\n"
    "fetch=rest[:1]==['--fetch']\n"
    "if fetch:rest=rest[2:]\n"
    "if not ok:\n"
    " if not fetch:sys.exit('remote-runner: the mirror agent %s is %s' % (p,'altered' if ok is False else 'missing'))\n"
    f" os.write(1,{NEED_MARKER!r} if ok is None else {ALTERED_MARKER!r})\n"
    " n=int(sys.argv[4]);b=bytearray()\n"
    " while len(b)<n:\n"
    "  c=os.read(0,min(n-len(b),1<<20))\n"
    "  if not c:sys.exit('remote-runner: agent upload cut short')\n"
    "  b+=c\n"
    " if digest(bytes(b))!=h:sys.exit('remote-runner: the agent upload is corrupt')\n"
    " try:os.makedirs(os.path.dirname(p),0o700,exist_ok=True)\n"
    " except OSError as e:\n"
    # A home that cannot be written (missing, read-only): a private directory for this run.
    "  import tempfile\n"
    "  d=tempfile.mkdtemp(prefix='remote-runner-agent-')\n"
    "  rest=['--remove',d]+rest\n"
    "  sys.stderr.write('WARNING: cannot keep the mirror agent in %s (%s): it is in %s for this run only\\n'"
    " % (os.path.dirname(p),e.strerror,d))\n"
    "  p=os.path.join(d,os.path.basename(p))\n"
    " t='%s.tmp.%d'%(p,os.getpid())\n"
    " try:\n"
    "  fd=os.open(t,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600)\n"
    "  try:\n"
    "   v=memoryview(b)\n"
    "   while v:v=v[os.write(fd,v):]\n"
    "   os.fsync(fd)\n"
    "  finally:os.close(fd)\n"
    "  os.rename(t,p)\n"
    " except OSError as e:\n"
    "  try:os.unlink(t)\n"
    "  except OSError:pass\n"
    "  sys.exit('remote-runner: cannot store the mirror agent in %s: %s' % (os.path.dirname(p),e.strerror))\n"
    "sys.path.insert(0,compiled(p))\n"
    "sys.argv=[p]+rest\n"
    "from rrmirror.agent import main\n"
    "sys.exit(main())\n"
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
        """Return the remote shell line that runs the verified agent, fetching it when needed."""
        path = f'"${{HOME:-/tmp}}"/{CACHE_DIR}/{self.filename}'
        return (f"umask 077; exec {shlex.quote(python)} {PYTHON_FLAGS} -c {shlex.quote(BOOT)} {path} "
                f"{self.sha256} --fetch {len(self.data)} {shlex.quote(mode)}")

    def run_argv(self, python: str, path: str, *args: str) -> List[str]:
        """Return the argv that runs the cached agent at *path* only if its hash is right."""
        return [python, *PYTHON_FLAGS.split(), "-c", BOOT, path, self.sha256, *args]


def _mfusepy_path() -> Path:
    spec = importlib.util.find_spec("mfusepy")
    if spec is None or not spec.origin:
        raise MirrorError("mfusepy is not installed locally; the mirror agent needs it (pip install mfusepy)")
    return Path(spec.origin)


def _mfusepy_source(path: Path) -> bytes:
    source = path.read_bytes()
    # PEP 585 generics (tuple[...], dict[...]) in module-level aliases fail on 3.8.
    source = _ALIAS.sub(lambda m: m.group(1) + b" = " + repr(m.group(2).decode()).encode(), source)
    if b"from __future__ import annotations" not in source:
        source = b"from __future__ import annotations\n" + source
    return source


#: Built bundles this machine keeps (the newest; one per checkout or version in use).
KEEP_BUILT = 4


def _sources() -> List[Tuple[str, Path]]:
    """(name in the zipapp, local file) of every source packed, in the zipapp's order."""
    return [
        ("rrmirror/protocol.py", _HERE / "protocol.py"),
        ("rrmirror/packing.py", _HERE / "packing.py"),
        ("rrmirror/agent.py", _HERE / "agent.py"),
        ("rrmirror/hardlinks.py", _HERE / "hardlinks.py"),
        *(("rrmirror/host/" + part.name, part) for part in sorted((_HERE / "host").glob("*.py"))),
        ("mfusepy.py", _mfusepy_path()),
    ]


def _entries(sources: List[Tuple[str, Path]]) -> List[tuple]:
    return [
        ("__main__.py", MAIN.encode()),
        ("rrmirror/__init__.py", b""),
        *((name, _mfusepy_source(path) if name == "mfusepy.py" else path.read_bytes())
          for name, path in sources),
    ]


def built_dir() -> str:
    """Where this machine keeps the bundles it built (see the module's docstring)."""
    return cache_dir("agents")


def _sources_key(sources: List[Tuple[str, Path]]) -> str:
    """A name for this exact set of source files (and of this module, which packs them)."""
    stats = []
    for name, path in [("", Path(__file__))] + sources:
        st = os.stat(path)
        stats.append((name, str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
    return hashlib.sha256(repr(stats).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _read_built(folder: str, key: str) -> Optional[AgentBundle]:
    """The bundle built earlier from the sources named *key*, if it is still whole."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(key + "-") and n.endswith(".pyz")]
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        digest = hashlib.sha256(data).hexdigest()
        if name == f"{key}-{digest}.pyz":
            return AgentBundle(data=data, sha256=digest)
    return None


def _keep_built(folder: str, key: str, bundle: AgentBundle) -> None:
    """Keep *bundle* for later processes (atomically), dropping all but the newest few."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        final = os.path.join(folder, f"{key}-{bundle.sha256}.pyz")
        temp = f"{final}.{os.getpid()}.tmp"
        with open(temp, "wb") as handle:
            handle.write(bundle.data)
        os.replace(temp, final)
        kept = sorted((e for e in os.scandir(folder) if e.name.endswith(".pyz")),
                      key=lambda e: e.stat().st_mtime_ns, reverse=True)
        for entry in kept[KEEP_BUILT:]:
            os.unlink(entry.path)
    except OSError:
        pass  # a cache only: the next process builds the bundle again


@lru_cache(maxsize=1)
def build_bundle() -> AgentBundle:
    """The agent zipapp (deterministic bytes, so the hash is stable), built once per version."""
    sources = _sources()
    folder = built_dir()
    try:
        key: Optional[str] = _sources_key(sources)
    except OSError:
        key = None
    if key is not None:
        found = _read_built(folder, key)
        if found is not None:
            return found
    import zipfile  # (only when building)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _entries(sources):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    data = buf.getvalue()
    bundle = AgentBundle(data=data, sha256=hashlib.sha256(data).hexdigest())
    if key is not None:
        _keep_built(folder, key, bundle)
    return bundle
