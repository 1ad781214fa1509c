"""What the mirror serves to a host, decided and enforced on this machine.

While a command runs in the mirror, whoever is root on the host can reach its
file system (through ``/proc/<pid>/root``, or by talking to the agent's FUSE
mount directly) and act as the local user on everything the mirror serves.
The host is not trusted, so the mirror serves a chosen set of trees, and this
side checks every request against it:

* **exports**: trees (or single files) served read-only or read-write. The
  default for a command is the system trees read-only (``/usr``, ``/bin``,
  ``/lib*``, ``/etc``, ``/opt``), the program itself with its prefix and its
  shared libraries read-only, and the cwd, ``/tmp``, ``/var/tmp`` and every
  ``--export PATH`` read-write (``--export PATH:ro`` for read-only,
  ``--read-only`` for all). ``--export /`` serves the whole tree. With
  ``--private-tmp`` the host mounts its own ``/tmp`` and ``/var/tmp``, so they
  are not served; only what another rule serves inside them is (see
  :meth:`Exports.private_scratch`).
* **ancestors** of an export (``/``, ``/home``, ``/home/me`` for an exported
  ``/home/me/proj``) can be looked up and listed, but a listing shows only the
  entries on the way to an export, and nothing in them can be changed. So can
  ``/dev``, ``/proc``, ``/sys`` and ``/run``, which the host mounts its own over.
* a **denylist** of secrets (``~/.ssh``, ``~/.gnupg``, cloud and registry
  credentials, ``/etc/shadow``, sshd's host keys, the SSH agent socket, the
  runner's own keys and known_hosts) is never served, even inside an export,
  unless an export names the denied path itself or a path inside it.

Everything else does not exist, as far as the host can tell (ENOENT); a write
to a read-only export fails with EROFS. The checks are made on the path as the
host names it, and the path is then opened *beneath* the root without
following any symbolic link in its directories (see :func:`resolve_parent`),
so a link the host plants cannot lead out of what is exported: the host's
kernel follows links itself, by asking for the target's path, which is then
checked on its own.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from remote_runner.mirror.localnames import proc_fd_path

#: Trees every command may read: where programs, libraries and their data live.
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
                "/nix", "/gnu", "/snap")
#: Trees every command may write (temporary files), besides its cwd.
SCRATCH_TREES = ("/tmp", "/var/tmp")
#: Where the host mounts its own trees over the mirror: they must exist here, empty.
HOST_MOUNT_POINTS = (b"/dev", b"/proc", b"/sys", b"/run")
#: Secrets under the local user's home that are never served unless exported by name.
HOME_SECRETS = (".ssh", ".gnupg", ".aws", ".azure", ".config/gcloud", ".kube", ".docker",
                ".netrc", ".pgpass", ".git-credentials", ".password-store",
                ".local/share/keyrings", ".config/remote-runner", ".vault-token")
#: System secrets never served unless exported by name.
SYSTEM_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
                  "/etc/sudoers.d", "/etc/ssl/private", "/var/lib/remote-runner")


class Refused(Exception):
    """A request the exports do not allow; carries the errno the host gets."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class Export:
    """One served tree or file."""

    path: bytes
    writable: bool
    #: Named by the user (``--export``): lifts the denylist at and below it.
    explicit: bool = False
    #: Whole copies of its files may stay on a host even when a directory *above* it is
    #: private here (a 0700 home): set for trees the user named and a program's own
    #: installation, never for the cwd or paths merely named in a command
    #: (see :class:`~remote_runner.mirror.sharing.PublicDirs`).
    shared: bool = False


def _norm(path: str) -> bytes:
    return os.path.normpath(os.fsencode(os.path.abspath(os.path.expanduser(path))))


def in_scratch(path: bytes) -> bool:
    """Whether normalized *path* is a scratch tree or lies in one."""
    return any(inside(path, _norm(tree)) for tree in SCRATCH_TREES)


def inside(path: bytes, root: bytes) -> bool:
    """Whether normalized *path* is *root* or lies below it."""
    return path == root or root == b"/" or path.startswith(root + b"/")


def _upwards(path: bytes) -> Iterator[bytes]:
    """*path*, then each directory above it up to ``/`` (absolute normalized paths)."""
    yield path
    while path != b"/":
        cut = path.rfind(b"/")
        if cut < 0:
            return
        path = path[:cut] or b"/"
        yield path


class Exports:
    """The served trees, the denylist, and the checks every request passes."""

    def __init__(self, exports: Iterable[Export], deny: Iterable[bytes] = ()) -> None:
        merged: dict = {}
        for export in exports:
            for path in dict.fromkeys((export.path, os.path.realpath(export.path))):
                old = merged.get(path)
                merged[path] = Export(path, export.writable or bool(old and old.writable),
                                      export.explicit or bool(old and old.explicit),
                                      export.shared or bool(old and old.shared))
        #: Every served tree or file (each under its own name and its real path).
        self.exports: Tuple[Export, ...] = tuple(merged.values())
        denied = set()
        for path in deny:
            denied.add(path)
            denied.add(os.path.realpath(path))
        self.deny: FrozenSet[bytes] = frozenset(denied)
        # Every request is checked: by walking up the path (a few steps), not
        # across every export and denied path (dozens).
        self._by_path: Dict[bytes, Export] = merged
        #: Paths on the way to an export (and the host's mount points): lookup and listing only.
        self.ancestors: Set[bytes] = self._ancestor_set()

    # -- construction ---------------------------------------------------------
    @classmethod
    def everything(cls, read_only: bool = False, extra_deny: Iterable[str] = ()) -> "Exports":
        """The whole tree (still without the denylist): the library default."""
        return cls([Export(b"/", not read_only)], default_denylist(extra_deny))

    @classmethod
    def only(cls, roots: Sequence[bytes], read_only: bool = False,
             extra_deny: Iterable[str] = ()) -> "Exports":
        """Exactly *roots* (``--files-only``), read-write unless *read_only*."""
        return cls([Export(os.path.normpath(r), not read_only, True) for r in roots],
                   default_denylist(extra_deny))

    @classmethod
    def for_commands(cls, commands: Sequence[Tuple[Sequence[str], str]], export: Sequence[str] = (),
                     read_only: bool = False, extra_deny: Iterable[str] = (),
                     private_tmp: bool = False) -> "Exports":
        """The default set for running each (argv, cwd) of *commands* (see the module docstring).

        With *private_tmp* the scratch trees (and a ``$TMPDIR`` inside one) are
        not served: the host gives the command its own (:meth:`private_scratch`).
        """
        items: List[Export] = [Export(_norm(t), False) for t in SYSTEM_TREES if os.path.lexists(t)]
        if not private_tmp:
            items += [Export(_norm(t), not read_only) for t in SCRATCH_TREES if os.path.isdir(t)]
        tmpdir = os.environ.get("TMPDIR")
        if tmpdir and os.path.isdir(tmpdir) and not (private_tmp and in_scratch(_norm(tmpdir))):
            items.append(Export(_norm(tmpdir), not read_only))
        for argv, cwd in commands:
            items.append(Export(_norm(cwd), not read_only))
            items += [Export(path, False, shared=True) for path in program_files(argv[0] if argv else "", cwd)]
            items += [Export(path, not read_only) for path in named_paths(argv[1:], cwd)]
        for spec in export:
            path, writable = parse_export(spec)
            items.append(Export(_norm(path), writable and not read_only, True, shared=True))
        exports = cls(items, default_denylist(extra_deny))
        if private_tmp:  # where the host mounts its own: looked up, never served
            for tree in SCRATCH_TREES:
                if os.path.isdir(tree):
                    exports.ancestors.update(_upwards(_norm(tree)))
        return exports

    def private_scratch(self) -> Dict[bytes, List[bytes]]:
        """The scratch trees the host may replace with its own, each with the paths in it still served.

        A tree served by its own name (the command names it, ``cc -o /tmp/prog``,
        or ``--export /tmp``) stays this machine's: its files are results.
        (``--export /`` alone does not name it.)
        """
        trees: Dict[bytes, List[bytes]] = {}
        for tree in SCRATCH_TREES:
            root = _norm(tree)
            if root in self._by_path:
                continue
            trees[root] = sorted(e.path for e in self.exports if e.path != root and inside(e.path, root))
        return trees

    def _ancestor_set(self) -> Set[bytes]:
        found: Set[bytes] = set(HOST_MOUNT_POINTS)
        for export in self.exports:
            path = export.path
            while path != b"/":
                path = os.path.dirname(path)
                found.add(path)
        return found

    # -- checks --------------------------------------------------------------
    def find(self, path: bytes) -> Optional[Export]:
        """The export *path* lies in (None: not served, or denied)."""
        above = list(_upwards(path))
        for step in above:
            export = self._by_path.get(step)
            if export is not None:
                break
        else:
            return None
        for step in above:
            if step in self.deny and not (export.explicit and inside(export.path, step)):
                return None
        return export

    def is_ancestor(self, path: bytes) -> bool:
        """Whether *path* is on the way to an export (lookup and a filtered listing only)."""
        return path in self.ancestors

    def check(self, path: bytes, write: bool = False) -> Optional[Export]:
        """Raise Refused unless the host may look at (or, with *write*, change) *path*."""
        export = self.find(path)
        if export is None:
            if self.is_ancestor(path) and not write:
                return None
            # Changing a directory on the way to an export, or creating in one: no permission.
            near = self.is_ancestor(path) or self.is_ancestor(os.path.dirname(path))
            raise Refused(errno.EACCES if write and near else errno.ENOENT)
        if write and not export.writable:
            raise Refused(errno.EROFS)
        return export

    def listable(self, directory: bytes, name: bytes) -> bool:
        """Whether entry *name* of *directory* may appear in a listing."""
        path = os.path.join(directory, name)
        return self.find(path) is not None or self.is_ancestor(path)

    @property
    def whole_tree(self) -> bool:
        """Whether everything (but the denylist) is served."""
        return any(e.path == b"/" for e in self.exports)


def parse_export(spec: str) -> Tuple[str, bool]:
    """``PATH`` or ``PATH:ro`` / ``PATH:rw`` -> (path, writable)."""
    for suffix, writable in ((":ro", False), (":rw", True)):
        if spec.endswith(suffix):
            return spec[: -len(suffix)], writable
    return spec, True


def default_denylist(extra: Iterable[str] = ()) -> List[bytes]:
    """Secrets never served unless exported by name: see the module docstring."""
    homes = {os.path.expanduser("~")}
    if os.environ.get("HOME"):
        homes.add(os.environ["HOME"])
    paths = [os.path.join(home, secret) for home in homes for secret in HOME_SECRETS]
    paths += list(SYSTEM_SECRETS)
    paths += glob.glob("/etc/ssh/ssh_host_*key")  # sshd's private host keys
    sock = os.environ.get("SSH_AUTH_SOCK")
    if sock:
        paths.append(sock)
    paths += list(extra)
    return [_norm(p) for p in paths if p]


def named_paths(args: Sequence[str], cwd: str) -> List[bytes]:
    """Local paths a command's arguments name: a directory, or the directory of a file.

    ``cc -o out/prog ../src/main.c`` gets ``out`` and ``../src``; ``/``, the
    home directory itself and the system trees (served read-only anyway) are
    never exported this way (``--export`` them).
    """
    homes = {_norm("~"), _norm(os.environ.get("HOME") or "~")}
    out: List[bytes] = []
    for arg in args:
        if not arg or "\0" in arg:
            continue
        path = os.path.normpath(os.path.join(os.fsencode(cwd), os.fsencode(arg)))
        if not (os.path.isabs(arg) or os.path.lexists(path)):
            continue  # a word, not a path
        target = path if os.path.isdir(path) else os.path.dirname(path)
        system = any(inside(target, _norm(t)) for t in SYSTEM_TREES)
        if os.path.isdir(target) and target != b"/" and target not in homes and not system:
            out.append(target)
    return out


def program_files(program: str, cwd: str) -> List[bytes]:
    """The program *argv0* names, its prefix (``X`` of ``X/bin/prog``) and its shared libraries.

    The prefix holds an interpreter's own library (a Python build in
    ``~/.pyenv/versions/3.11.7``, a virtual environment); it is left out when
    it would be ``/`` or a home directory, where only the program's directory
    is served. A version manager's *shim* (``~/.pyenv/shims/python3``, and the
    same layout in rbenv, nodenv, goenv, asdf, mise) is a script that runs
    the manager from the directory above its ``shims`` (``libexec/pyenv``),
    which picks the real program below it (``versions/3.11.7/bin/python3``):
    that directory is the prefix served.
    """
    if not program:
        return []
    found = program if "/" in program else shutil.which(program)
    if not found:
        return []
    path = os.path.join(cwd, found)
    out: List[bytes] = []
    homes = {os.path.expanduser("~"), os.environ.get("HOME", "")}
    for candidate in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        out.append(_norm(candidate))
        directory = os.path.dirname(candidate)
        prefix = os.path.dirname(directory)
        if os.path.basename(directory) in ("bin", "shims") and prefix not in ("/", *homes):
            out.append(_norm(prefix))
        else:
            out.append(_norm(directory))
    try:
        from remote_runner.mirror import elf
        out += [_norm(library) for library in elf.closure(os.path.realpath(path))]
    except Exception:  # noqa: BLE001 - not an ELF file (a script): no libraries to add
        pass
    return out


# --------------------------------------------------------------------------- resolution


def resolve_parent(path: bytes, held: List[int], parents: Optional[Dict[bytes, int]] = None) -> bytes:
    """Return a name for absolute *path* whose directories were walked without following links.

    The parent directory is opened with ``O_PATH | O_DIRECTORY`` from ``/``
    by ``openat2`` with ``RESOLVE_NO_SYMLINKS``: a symbolic link among the
    directories fails (ELOOP), so a request never leaves the tree it was
    checked against, however the host arranged links. One system call: a
    request used to open and close each component in turn (a path six deep
    cost twelve calls, each a chance for another thread to take the GIL).
    Where ``openat2`` is missing (Linux < 5.6, a seccomp filter) or the path
    is too long for one call, each component is opened with ``O_NOFOLLOW``
    relative to the one before, to the same effect. The result is
    ``/proc/self/fd/N/NAME`` (N the parent's descriptor, appended to *held*
    for the caller to close, and noted in *parents* under the directory's
    name), short whatever the path's length; the last component itself is
    left to the operation (which never follows it, or follows it only where
    the kernel would have). A directory already in *parents* is not opened
    again: the names of one request (a rename's two, a batch of lookups in one
    directory) go through the descriptor it was first reached by.
    """
    parts = [p for p in path.split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        raise Refused(errno.EINVAL)
    if not parts:
        return b"/"
    directory = b"/" + b"/".join(parts[:-1])
    if parents is not None and directory in parents:  # reached already for this request
        return os.path.join(proc_fd_path(parents[directory]), parts[-1])
    fd = open_beneath(directory) if len(directory) < OPENAT2_PATH_MAX else None
    if fd is None:
        fd = _walk(parts[:-1], held)
    else:
        held.append(fd)
    if parents is not None:
        parents[directory] = fd
    return os.path.join(proc_fd_path(fd), parts[-1])


def _walk(parts: List[bytes], held: List[int]) -> int:
    """Open directory ``/`` + *parts* one component at a time, never through a link."""
    fd = os.open(b"/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    held.append(fd)
    for part in parts:
        try:
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and os.path.islink(os.path.join(proc_fd_path(held[-1]), part)):
                raise Refused(errno.ELOOP) from None
            raise
        held.append(fd)
    return fd


#: Longest path handed to one openat2 call (PATH_MAX, with room to spare).
OPENAT2_PATH_MAX = 4000
_SYS_OPENAT2 = 437          # the same number on every Linux architecture
_RESOLVE_NO_SYMLINKS = 0x04  # implies RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Openat2:
    """``openat2(AT_FDCWD, directory, O_PATH|O_DIRECTORY, RESOLVE_NO_SYMLINKS)`` through libc's syscall()."""

    def __init__(self) -> None:
        self.call: Optional[object] = None
        self.how = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS)
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                call = libc.syscall
                call.restype = ctypes.c_long
                call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
                self.call = call
            except (OSError, AttributeError):
                self.call = None

    def __call__(self, directory: bytes) -> Optional[int]:
        """The directory's O_PATH descriptor; None when openat2 is not there (walk instead)."""
        call = self.call
        if call is None:
            return None
        fd = call(_SYS_OPENAT2, AT_FDCWD, directory, ctypes.byref(self.how), ctypes.sizeof(self.how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL):
            self.call = None  # no openat2 here (old kernel, seccomp): walk from now on
            return None
        if err == errno.ELOOP:
            raise Refused(errno.ELOOP)
        if err == errno.EAGAIN:
            # (documented for RESOLVE_BENEATH/IN_ROOT races and RESOLVE_CACHED, none used
            # here; a kernel that says it anyway gets the component walk, never a refusal)
            return None
        raise OSError(err, os.strerror(err), directory)


AT_FDCWD = -100
open_beneath = _Openat2()
