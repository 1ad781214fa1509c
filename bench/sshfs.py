"""The sshfs + chroot peer: mount the local root on a host, then chroot into it.

sshfs normally needs the remote host to ssh *back* to the local machine. To
avoid running a local sshd (and a listening port), the mount is made in
sshfs's ``passive`` mode: a local ``sftp-server`` is wired to the stdin/stdout
of ``ssh HOST sshfs -o passive :/ MNT``, so the SFTP traffic rides the same
(delayed) ssh link as everything else. Debian's sshfs rejects absolute
symlinks unless ``no_contain_symlinks`` is given, without which the chroot
cannot even exec ``/bin/sh``; ``kernel_cache,cache_timeout=3600`` gives it the
long caching that makes warm runs fair. The host's own /dev and /proc are
bound into the mount, as outrun does.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from typing import List, Optional

from bench.measure import BenchError, kill_group, run

SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/lib/ssh/sftp-server")
OPTIONS = "passive,no_contain_symlinks,kernel_cache,cache_timeout=3600"


def sftp_server() -> Optional[str]:
    """Return the local sftp-server binary, or None."""
    return next((p for p in SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), None)


class SshfsMount:
    """One passive sshfs mount of the local root on one host."""

    def __init__(self, ssh_config: str, host: str, mountpoint: str) -> None:
        self.ssh_config = ssh_config
        self.host = host
        self.mountpoint = mountpoint
        self._sftp: Optional[subprocess.Popen] = None
        self._ssh: Optional[subprocess.Popen] = None

    def _ssh_argv(self, command: str) -> List[str]:
        return ["ssh", "-F", self.ssh_config, "-o", "BatchMode=yes", self.host, command]

    def mount(self, timeout: float = 120) -> None:
        """Mount the local root and bind /dev and /proc; return once it is usable."""
        server = sftp_server()
        if server is None:
            raise BenchError("no local sftp-server found")
        m = shlex.quote(self.mountpoint)
        to_server_r, to_server_w = os.pipe()
        to_ssh_r, to_ssh_w = os.pipe()
        self._sftp = subprocess.Popen([server], stdin=to_server_r, stdout=to_ssh_w, start_new_session=True)
        self._ssh = subprocess.Popen(
            self._ssh_argv(f"mkdir -p {m} && exec sshfs -f -o {OPTIONS} :/ {m}"),
            stdin=to_ssh_r, stdout=to_server_w, stderr=subprocess.DEVNULL, start_new_session=True)
        for fd in (to_server_r, to_server_w, to_ssh_r, to_ssh_w):
            os.close(fd)
        ready = (f"mountpoint -q {m} || exit 1; mountpoint -q {m}/dev || mount --rbind /dev {m}/dev; "
                 f"mountpoint -q {m}/proc || mount -t proc proc {m}/proc")
        deadline = time.monotonic() + timeout
        while True:
            if self._ssh.poll() is not None:
                raise BenchError(f"sshfs on {self.host} exited {self._ssh.returncode} before mounting")
            proc = subprocess.run(self._ssh_argv(ready), capture_output=True, timeout=timeout)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"sshfs mount on {self.host} not ready within {timeout:g} s")
            time.sleep(0.05)

    def run_argv(self, argv: List[str], cwd: str) -> List[str]:
        """Return the ssh command line running *argv* in *cwd* inside the chroot."""
        inner = f"cd {shlex.quote(cwd)} && exec {' '.join(shlex.quote(a) for a in argv)}"
        return self._ssh_argv(f"chroot {shlex.quote(self.mountpoint)} /bin/sh -c {shlex.quote(inner)}")

    def unmount(self) -> None:
        """Unmount everything and stop both ends of the SFTP pipe."""
        m = shlex.quote(self.mountpoint)
        if self._ssh is not None:
            try:
                run(self._ssh_argv(f"umount -R -l {m}/dev; umount -l {m}/proc; "
                                   f"fusermount3 -u -z {m} || umount -l {m}; true"), timeout=120)
            except BenchError:
                pass
        for proc in (self._ssh, self._sftp):
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
        self._ssh = self._sftp = None
