"""Which shared libraries a program will load: read here, before the host asks.

The first run of a program through the mirror is slow for one reason: the
dynamic loader on the host opens its libraries one after another, and every
open is a round trip (ffmpeg loads over 200). Nothing about that order is
secret: it is written in the ELF files themselves (``DT_NEEDED``, with
``DT_RPATH``/``DT_RUNPATH`` and the loader's cache deciding where each name
lives). So when the host opens a dynamically linked program, the local side
reads the whole dependency closure here, the way ``ld.so`` would resolve it,
and answers with the list; the host fetches all of it at once.

Only what the files say is followed, never executed (no ``ldd``). Anything
unreadable or odd is skipped: a wrong guess only costs a file fetched for
nothing, and a missed library is still found by the loader the slow way.
``LD_LIBRARY_PATH``, ``$LIB``/``$PLATFORM`` and libraries opened later with
``dlopen`` are not predicted.

Two libraries read files of their own as a process starts, in directories
no lookup has listed yet: glibc its locale and time zone, libcrypto its
configuration. Those names follow from the environment and the libraries
themselves (:func:`libc_files`, :func:`openssl_files`) and go with them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections import deque
from functools import lru_cache
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29
#: Stop after this many objects (a program with more is not the common case).
MAX_OBJECTS = 1000
#: Where the loader looks last, after its cache (multiarch directories are added).
DEFAULT_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib")


class Dynamic(NamedTuple):
    """What the loader reads from one ELF file."""

    ident: Tuple[int, int]   # (class, machine): a library must match its loader's
    interp: Optional[str]
    needed: List[str]
    rpath: List[str]
    runpath: List[str]


def read_dynamic(path: str) -> Optional[Dynamic]:
    """Parse *path*'s ELF header, program headers and dynamic section; None if it is not ELF."""
    try:
        with open(path, "rb") as fh:
            return _parse(fh)
    except (OSError, struct.error, ValueError, IndexError):
        return None


def _parse(fh) -> Optional[Dynamic]:
    head = fh.read(64)
    if len(head) < 52 or head[:4] != MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    wide = head[4] == 2
    end = "<" if head[5] == 1 else ">"
    machine = struct.unpack_from(end + "H", head, 18)[0]
    if wide:
        phoff, = struct.unpack_from(end + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        ph_fmt, dyn_fmt = end + "IIQQQQQQ", end + "qQ"
    else:
        phoff, = struct.unpack_from(end + "I", head, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
        ph_fmt, dyn_fmt = end + "IIIIIIII", end + "iI"
    if phnum > 256 or phentsize < struct.calcsize(ph_fmt):
        return None
    fh.seek(phoff)
    table = fh.read(phentsize * phnum)
    loads, dynamic, interp = [], None, None
    for i in range(phnum):
        fields = struct.unpack_from(ph_fmt, table, i * phentsize)
        if wide:
            p_type, _, offset, vaddr, _, filesz = fields[:6]
        else:
            p_type, offset, vaddr, _, filesz = fields[:5]
        if p_type == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (offset, filesz)
        elif p_type == PT_INTERP and filesz < 4096:
            fh.seek(offset)
            interp = fh.read(filesz).split(b"\0")[0].decode("utf-8", "surrogateescape") or None
    ident = (head[4], machine)
    if dynamic is None or dynamic[1] > 1 << 20:
        return Dynamic(ident, interp, [], [], [])
    fh.seek(dynamic[0])
    raw = fh.read(dynamic[1])
    entries: List[Tuple[int, int]] = []
    for tag, value in struct.iter_unpack(dyn_fmt, raw[:len(raw) - len(raw) % struct.calcsize(dyn_fmt)]):
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    base = next((off + strtab - va for va, off, size in loads if va <= (strtab or -1) < va + size), None)
    if base is None:
        return Dynamic(ident, interp, [], [], [])

    def string(at: int) -> str:
        fh.seek(base + at)
        data = fh.read(4096)
        return data.split(b"\0")[0].decode("utf-8", "surrogateescape")

    def strings(tag: int) -> List[str]:
        return [string(v) for t, v in entries if t == tag]

    def paths(tag: int) -> List[str]:
        return [p for s in strings(tag) for p in s.split(":") if p]

    return Dynamic(ident, interp, strings(DT_NEEDED), paths(DT_RPATH), paths(DT_RUNPATH))


#: What glibc's loader itself looks at to start any dynamically linked program:
#: the preload list (usually absent: a negative lookup) and its cache of libraries.
LOADER_FILES = ("/etc/ld.so.preload", "/etc/ld.so.cache")


#: The subdirectories glibc's loader probes in a directory it searches by path,
#: before the directory itself: builds for a CPU level (``glibc-hwcaps/x86-64-v3``,
#: glibc 2.33 and later) and the legacy ones (``tls``, platforms and hardware
#: capabilities, up to glibc 2.36). Missing, as they mostly are, each is one
#: negative answer sent with the libraries instead of a round trip per probe.
PROBED_SUBDIRS = (b"glibc-hwcaps", b"tls", b"haswell", b"xeon_phi", b"x86_64", b"avx512_1")


def loader_files(program: str) -> List[str]:
    """:data:`LOADER_FILES` if *program* is started by a loader (has an interpreter), else []."""
    top = read_dynamic(program)
    return list(LOADER_FILES) if top is not None and top.interp is not None else []


#: What glibc reads as a program starts, besides its libraries: the locale the
#: environment names (``setlocale(LC_ALL, "")``, which Python, git and most tools call
#: first: its archive, its alias files, then one directory per locale name), the
#: converters' cache beside the C library, and the time zone (``tzset``: ``$TZ``, else
#: ``/etc/localtime``). Each is a lookup or an open in a directory not seen yet: a round
#: trip apiece on a first run.
LOCALE_DIR = "/usr/lib/locale"
LOCALE_ALIASES = ("/usr/share/locale/locale.alias", "/etc/locale.alias")
#: The variables that name a locale, strongest first (``LANGUAGE`` names catalogues only).
LOCALE_VARIABLES = ("LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_COLLATE", "LC_NUMERIC", "LC_TIME",
                    "LC_MONETARY", "LANG")
ZONE_DEFAULT, ZONE_DIR = "/etc/localtime", "/usr/share/zoneinfo"


def libc_files(libraries: List[str], environ: Mapping[str, str]) -> List[str]:
    """What glibc reads for *environ*'s locale and time zone, if a ``libc.so.6`` is among *libraries*.

    Every locale name a variable gives (the ``C``/``POSIX`` locale needs no
    file), as written and with its codeset normalized (``C.UTF-8`` is the
    directory ``C.utf8``), each directory's category files, and
    ``gconv-modules.cache``; the zone file. Names that do not exist are listed
    too: they are answered as missing.
    """
    libc = next((lib for lib in libraries if os.path.basename(lib) == "libc.so.6"), None)
    if libc is None:
        return []
    zone = environ.get("TZ")
    if zone is None:
        out = [ZONE_DEFAULT]
    else:
        zone = zone[1:] if zone.startswith(":") else zone
        out = [zone if zone.startswith("/") else os.path.join(ZONE_DIR, zone)] if zone else []
    names: List[str] = []
    for variable in LOCALE_VARIABLES:
        value = environ.get(variable, "")
        if value and value not in ("C", "POSIX") and "/" not in value and value not in names:
            names.append(value)
    if not names:
        return out
    out += [os.path.join(LOCALE_DIR, "locale-archive"), *LOCALE_ALIASES]
    for name in names:
        for candidate in dict.fromkeys((name, normalized_locale(name))):
            directory = os.path.join(LOCALE_DIR, candidate)
            out.append(directory)
            try:
                entries = sorted(os.listdir(directory))
            except OSError:
                continue
            for entry in entries:
                path = os.path.join(directory, entry)
                out.append(os.path.join(path, "SYS_LC_MESSAGES") if os.path.isdir(path) else path)
    out.append(os.path.join(os.path.dirname(libc), "gconv", "gconv-modules.cache"))
    return list(dict.fromkeys(out))


#: How libcrypto names the directory of its configuration (``OpenSSL_version(OPENSSL_DIR)``).
_OPENSSL_DIR = b'OPENSSLDIR: "'


def openssl_files(libraries: List[str], environ: Mapping[str, str]) -> List[str]:
    """The configuration OpenSSL reads as it starts, if a ``libcrypto.so`` is among *libraries*.

    ``$OPENSSL_CONF``, else ``openssl.cnf`` in the directory the library was
    built for (Debian's ``/usr/lib/ssl``, a link into ``/etc/ssl``; others
    ``/etc/pki/tls``...), which the library's own bytes name.
    """
    crypto = next((lib for lib in libraries if os.path.basename(lib).startswith("libcrypto.so.")), None)
    if crypto is None:
        return []
    conf = environ.get("OPENSSL_CONF")
    if conf is not None:
        return [conf] if conf.startswith("/") else []
    directory = openssl_dir(crypto)
    return [directory + "/openssl.cnf"] if directory else []


@lru_cache(maxsize=16)
def openssl_dir(library: str) -> Optional[str]:
    """The configuration directory libcrypto at *library* was built for (None: not found)."""
    try:
        with open(library, "rb") as fh:
            data = fh.read(64 << 20)
    except OSError:
        return None
    start = data.find(_OPENSSL_DIR)
    end = data.find(b'"', start + len(_OPENSSL_DIR)) if start >= 0 else -1
    if end < 0 or end - start > 4096:
        return None
    found = data[start + len(_OPENSSL_DIR):end].decode("utf-8", "replace")
    return found if found.startswith("/") else None


def normalized_locale(name: str) -> str:
    """*name* with its codeset as glibc normalizes it: lower-case letters and digits only
    (``UTF-8`` -> ``utf8``; digits alone get ``iso``: ``8859-1`` -> ``iso88591``)."""
    language, dot, rest = name.partition(".")
    if not dot:
        return name
    codeset, at, modifier = rest.partition("@")
    norm = "".join(c.lower() for c in codeset if c.isalnum())
    if norm.isdigit():
        norm = "iso" + norm
    return f"{language}.{norm}{at}{modifier}"


@lru_cache(maxsize=1)
def loader_cache() -> Dict[str, Tuple[str, ...]]:
    """soname -> paths, as the loader's cache (``ldconfig -p``) lists them; {} if unavailable."""
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if ldconfig is None:
        return {}
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, timeout=10,
                             env={"LC_ALL": "C", "PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: Dict[str, List[str]] = {}
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        name, sep, path = line.strip().partition(" => ")
        if sep and path.startswith("/"):
            found.setdefault(name.split(" (")[0], []).append(path)
    return {k: tuple(v) for k, v in found.items()}


def _expand(entry: str, origin: str) -> Optional[str]:
    entry = entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
    return entry if entry.startswith("/") and "$" not in entry else None


def closure(program: str, misses: Optional[List[str]] = None) -> List[str]:
    """The files the loader will open to start *program*, in load order (program excluded).

    The interpreter first, then the libraries breadth-first, each as the path
    the loader opens (a symlink stays a symlink). [] if *program* is not a
    dynamically linked ELF file. A shared object (no interpreter: a Python
    extension module, a plugin, opened with ``dlopen``) gives its libraries
    the same way; those the process already has are then not opened again,
    which costs the host nothing (it holds their copies already). *misses*,
    if given, gains the paths the loader tries in RPATH/RUNPATH directories
    before it finds a library elsewhere.
    """
    top = read_dynamic(program)
    if top is None or (top.interp is None and not top.needed):
        return []
    multiarch = list(_multiarch_dirs())
    # The program's RPATH serves its libraries too ($ORIGIN being the program's directory).
    inherited = [] if top.runpath else _dirs(top.rpath, os.path.dirname(os.path.realpath(program)))
    out: List[str] = []
    seen_paths = {os.path.realpath(program)}
    if top.interp is not None and os.path.isfile(top.interp):
        out.append(top.interp)
        seen_paths.add(os.path.realpath(top.interp))
    loaded: Dict[str, None] = {}
    queue = deque([(program, top)])
    while queue and len(out) < MAX_OBJECTS:
        path, dyn = queue.popleft()
        origin = os.path.dirname(os.path.realpath(path) if path == program else path)
        if dyn.runpath:
            dirs = _dirs(dyn.runpath, origin)
        else:
            dirs = _dirs(dyn.rpath, origin) + ([] if path == program else inherited)
        for name in dyn.needed:
            if name in loaded:
                continue
            found = _resolve(name, dyn.ident, dirs, multiarch, misses)
            if found is None:
                continue
            loaded[name] = None
            real = os.path.realpath(found[0])
            if real in seen_paths:
                continue
            seen_paths.add(real)
            out.append(found[0])
            queue.append(found)
    return out


def _dirs(entries: List[str], origin: str) -> List[str]:
    """RPATH/RUNPATH *entries* with $ORIGIN expanded; those we cannot expand are dropped."""
    return [d for d in (_expand(e, origin) for e in entries) if d]


def _resolve(name: str, ident: Tuple[int, int], dirs: List[str], multiarch: List[str],
             misses: Optional[List[str]] = None) -> Optional[Tuple[str, Dynamic]]:
    """Find *name* as the loader would: RPATH or RUNPATH *dirs*, its cache, the default directories.

    *misses* gains the paths tried in *dirs* before the one found (lookups the loader makes too).
    """
    if "/" in name:
        candidates = [name] if name.startswith("/") else []
    else:
        candidates = [os.path.join(d, name) for d in dirs]
        candidates += list(loader_cache().get(name, ()))
        candidates += [os.path.join(d, name) for d in multiarch + list(DEFAULT_DIRS)]
    for index, candidate in enumerate(candidates):
        dyn = read_dynamic(candidate)
        if dyn is not None and dyn.ident == ident:
            if misses is not None and "/" not in name:
                misses.extend(candidates[:min(index, len(dirs))])
            return candidate, dyn
    return None


@lru_cache(maxsize=1)
def _multiarch_dirs() -> Tuple[str, ...]:
    """/lib/<triplet> and /usr/lib/<triplet> directories present here (Debian's layout)."""
    dirs = []
    for base in ("/lib", "/usr/lib"):
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        dirs += [os.path.join(base, n) for n in names
                 if n.count("-") >= 2 and n.endswith(("-gnu", "-gnueabihf", "-gnueabi", "-musl"))
                 and os.path.isdir(os.path.join(base, n))]
    return tuple(dirs)
