"""Throwaway test hosts on this machine: ``remote-runner lab up N``.

Every feature of remote_runner is OS interaction (SSH, screen, file copies,
FUSE, chroot), so it is only real when proven against real hosts. A lab host
``hN`` is:

* its own network namespace with address ``10.213.0.(10+N)`` on a bridge the
  lab creates (see :mod:`remote_runner.lab.netns`), running its own sshd on
  port 22;
* its own PID, UTS and mount namespaces: an overlay of the local root with a
  per-host upper layer and private /tmp, /var/tmp, /run, /root and /home (see
  :mod:`remote_runner.lab.init`), so files written on one host are invisible
  on the others and locally;
* missing the paths the lab marks local-only: :data:`LOCAL_ONLY`, the lab's own
  state directory (it holds the client key), and this package's own files, so
  tests can prove that something runs remotely without being installed there.

The lab writes an ssh_config (``lab ssh-config`` prints its path) with
``Host h1..hN`` aliases, the lab's client key and a known_hosts file holding
each host's key, with strict host-key checking. Host keys survive ``lab down``
so that a re-created lab keeps the same identities.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from remote_runner.errors import LabError
from remote_runner.lab import netns

#: A local directory that lab hosts never see (created locally by ``lab up``).
LOCAL_ONLY = "/opt/remote-runner-local-only"
#: Where the lab keeps its keys, configs and state.
DEFAULT_DIR = "/var/lib/remote-runner/lab"
#: A non-root user present on every lab host (same key as root).
TEST_USER = "rrtest"
TEST_UID = 2000

SSHD_CONFIG = """\
Port 22
ListenAddress {address}
HostKey /etc/remote-runner-lab/ssh_host_ed25519_key
AuthorizedKeysFile /etc/remote-runner-lab/authorized_keys .ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication yes
ChallengeResponseAuthentication no
UsePAM no
PidFile none
UseDNS no
PrintMotd no
X11Forwarding no
AcceptEnv LANG LC_*
MaxSessions 200
MaxStartups 200:30:400
Subsystem sftp internal-sftp
"""


@dataclass(frozen=True)
class LabHost:
    """One lab host as seen from the local machine."""

    name: str
    index: int
    address: str
    pid: Optional[int] = None
    #: None for an overlay of the local root, else the Debian release of its own root.
    release: Optional[str] = None

    @property
    def netns(self) -> str:
        return netns.netns_name(self.name)


def _pid_alive(pid: Optional[int]) -> bool:
    """Return whether *pid* runs (a zombie does not count)."""
    if not pid:
        return False
    _reap()
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _port_open(address: str, port: int = 22, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _hidden_paths(state_dir: str) -> List[str]:
    """Return the local paths a lab host must not see."""
    import remote_runner

    package_dir = os.path.dirname(os.path.abspath(remote_runner.__file__))
    hidden = [LOCAL_ONLY, state_dir, package_dir]
    checkout = os.path.dirname(package_dir)
    if os.path.exists(os.path.join(checkout, "setup.cfg")):
        hidden.append(checkout)
    if sys.prefix != sys.base_prefix:
        hidden.append(sys.prefix)
    paths = sorted({os.path.realpath(p) for p in hidden if os.path.lexists(p)} - {"/"})
    # A whiteout hides everything below it, so nested paths are redundant.
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths)]


class Lab:
    """The set of lab hosts, with their keys, ssh_config and state."""

    def __init__(self, state_dir: Optional[str] = None) -> None:
        self.dir = state_dir or os.environ.get("REMOTE_RUNNER_LAB_DIR", DEFAULT_DIR)
        self.ssh_config = os.path.join(self.dir, "ssh_config")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.client_key = os.path.join(self.dir, "id_ed25519")
        self.state_file = os.path.join(self.dir, "state.json")

    # -- state -------------------------------------------------------------
    def _load_state(self) -> Dict[str, Dict]:
        try:
            with open(self.state_file) as handle:
                return json.load(handle).get("hosts", {})
        except (OSError, ValueError):
            return {}

    def _save_state(self, hosts: Dict[str, Dict]) -> None:
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as handle:
            json.dump({"hosts": hosts}, handle, indent=1)
        os.replace(tmp, self.state_file)

    def running_hosts(self) -> List[LabHost]:
        """Return the hosts whose init process is alive and whose sshd answers."""
        result = []
        namespaces = netns.list_netns()
        for name, info in self._load_state().items():
            host = LabHost(name, info["index"], info["address"], info.get("pid"), info.get("release"))
            if _pid_alive(host.pid) and host.netns in namespaces and _port_open(host.address):
                result.append(host)
        return sorted(result, key=lambda h: h.index)

    @contextlib.contextmanager
    def _locked(self):
        """Serialise ``up`` and ``down`` (test sessions may run side by side)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        with open(os.path.join(self.dir, "lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def hosts(self) -> List[LabHost]:
        return self.running_hosts()

    # -- up ----------------------------------------------------------------
    @staticmethod
    def require_root() -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network and mount namespaces): "
                           "run it as root, e.g. `sudo remote-runner lab up 3`")
        for tool in ("ip", "unshare", "mount", "ssh-keygen"):
            if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
                raise LabError(f"the lab needs `{tool}` (apt-get install iproute2 util-linux openssh-client)")
        if not os.path.exists("/usr/sbin/sshd"):
            raise LabError("the lab needs sshd: apt-get install openssh-server")

    def up(self, count: int, foreign: Optional[Dict[str, str]] = None) -> List[LabHost]:
        """Ensure hosts h1..h<count> are running; return all running hosts.

        *foreign* maps host names to a Debian release (e.g. ``{"h4": "bullseye"}``):
        those hosts get a root of their own built with debootstrap instead of an
        overlay of the local root, so they share nothing with this machine. A host
        it does not mention keeps the root it has (or had, when it crashed): the lab
        is shared, so ``up(200)`` must not turn someone's Debian 11 ``h9`` into an
        overlay. Only a release named here changes a running host.
        """
        foreign = dict(foreign or {})
        self.require_root()
        if count < 1:
            raise LabError("lab up needs at least one host")
        with self._locked():
            return self._up(count, foreign)

    def _up(self, count: int, foreign: Dict[str, str]) -> List[LabHost]:
        os.makedirs(LOCAL_ONLY, exist_ok=True)
        self._ensure_client_key()
        netns.ensure_bridge()
        state = self._load_state()
        running = {h.name: h for h in self.running_hosts()}
        wanted = [f"h{i}" for i in range(1, count + 1)] + sorted(set(foreign) - {f"h{i}" for i in range(1, count + 1)})
        started = []
        for name in wanted:
            index = _host_index(name)
            release = wanted_release(name, foreign, running, state)
            if name in running and running[name].release == release:
                continue
            lower = ensure_root(release) if release else "/"
            self._stop_host(name, state.get(name, {}).get("pid"))
            pid = self._start_host(name, index, lower)
            state[name] = {"index": index, "address": netns.host_address(index), "pid": pid,
                           "release": release}
            started.append(name)
        self._save_state(state)
        self._write_client_files(state)
        # Hosts start one after another but their sshds come up together: allow for a
        # few hundred of them sharing two cores.
        self._wait_ready([state[n] for n in started], [n for n in started],
                         timeout=30.0 + 0.5 * len(started))
        return self.running_hosts()

    def _ensure_client_key(self) -> None:
        if not os.path.exists(self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "remote-runner-lab",
                            "-f", self.client_key], check=True)

    def _host_key(self, name: str) -> str:
        key = os.path.join(self.dir, "hosts", name, "ssh_host_ed25519_key")
        if not os.path.exists(key):
            os.makedirs(os.path.dirname(key), exist_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lab-{name}",
                            "-f", key], check=True)
        return key

    def _host_files(self, name: str, index: int, lower: str) -> List[Dict]:
        """Return the files a host gets in its upper layer."""
        with open(self._host_key(name)) as handle:
            host_key = handle.read()
        with open(self.client_key + ".pub") as handle:
            authorized = handle.read()
        try:
            with open(os.path.join(lower, "etc/hosts")) as handle:
                hosts = handle.read().rstrip("\n") + "\n"
        except FileNotFoundError:
            hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        hosts += "# remote-runner lab\n"
        hosts += "".join(f"{netns.host_address(i)} h{i}\n" for i in range(1, netns.MAX_HOSTS + 1))
        hosts = hosts.replace("127.0.1.1", "#127.0.1.1")
        files = [
            {"path": "/etc/remote-runner-lab/sshd_config",
             "content": SSHD_CONFIG.format(address=netns.host_address(index))},
            {"path": "/etc/remote-runner-lab/ssh_host_ed25519_key", "content": host_key, "mode": 0o600},
            {"path": "/etc/remote-runner-lab/authorized_keys", "content": authorized},
            {"path": "/etc/hostname", "content": name + "\n"},
            {"path": "/etc/hosts", "content": hosts},
        ]
        files += self._user_files(lower)
        return files

    @staticmethod
    def _user_files(lower: str) -> List[Dict]:
        """Return /etc/passwd, group and shadow with the lab's test user added."""
        out = []
        for path, line, mode in (
            ("/etc/passwd", f"{TEST_USER}:x:{TEST_UID}:{TEST_UID}:remote-runner lab user:/home/{TEST_USER}:/bin/bash", 0o644),
            ("/etc/group", f"{TEST_USER}:x:{TEST_UID}:", 0o644),
            ("/etc/shadow", f"{TEST_USER}:*:19000:0:99999:7:::", 0o640),
        ):
            try:
                with open(os.path.join(lower, path.lstrip("/"))) as handle:
                    content = handle.read()
            except OSError:
                content = ""
            lines = [l for l in content.splitlines() if not l.startswith(TEST_USER + ":")]
            out.append({"path": path, "content": "\n".join(lines + [line]) + "\n", "mode": mode})
        return out

    def _start_host(self, name: str, index: int, lower: str) -> int:
        """Create the namespaces of one host and start its init; return the PID."""
        netns.create_host_netns(name, index)
        host_dir = os.path.join(self.dir, "hosts", name)
        mount_dir = os.path.join(host_dir, "mnt")
        os.makedirs(mount_dir, exist_ok=True)
        spec = {
            "host": name,
            "mount_dir": mount_dir,
            "log": os.path.join(host_dir, "host.log"),
            "sshd_config": "/etc/remote-runner-lab/sshd_config",
            "lower": lower,
            "files": self._host_files(name, index, lower),
            "whiteouts": _hidden_paths(self.dir) if lower == "/" else [],
            "users": [{"home": f"/home/{TEST_USER}", "uid": TEST_UID, "gid": TEST_UID}],
        }
        spec_path = os.path.join(host_dir, "spec.json")
        with open(spec_path, "w") as handle:
            json.dump(spec, handle)
        os.chmod(spec_path, 0o600)
        log = open(spec["log"], "wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns.netns_name(name),
             "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child",
             "--propagation", "private",
             sys.executable, "-m", "remote_runner.lab.init", spec_path],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))})
        log.close()
        return proc.pid

    def _wait_ready(self, infos: List[Dict], names: List[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        pending = dict(zip(names, infos))
        while pending and time.monotonic() < deadline:
            for name, info in list(pending.items()):
                if not _pid_alive(info["pid"]):
                    raise LabError(f"lab host {name} died while starting; see "
                                   f"{os.path.join(self.dir, 'hosts', name, 'host.log')}")
                if _port_open(info["address"]):
                    del pending[name]
            if pending:
                time.sleep(0.05)
        if pending:
            raise LabError(f"lab host(s) {', '.join(sorted(pending))} did not start sshd within "
                           f"{timeout:g} s; see {self.dir}/hosts/*/host.log")

    def _write_client_files(self, state: Dict[str, Dict]) -> None:
        """Write the ssh_config and known_hosts for every host in *state*."""
        known, config = [], [f"# remote-runner lab: ssh -F {self.ssh_config} h1\n"]
        for name, info in sorted(state.items(), key=lambda kv: kv[1]["index"]):
            with open(self._host_key(name) + ".pub") as handle:
                key_type, key_data = handle.read().split()[:2]
            known.append(f"{name},{info['address']} {key_type} {key_data}\n")
            config.append(
                f"\nHost {name} {info['address']}\n"
                f"    HostName {info['address']}\n"
                f"    User root\n"
                f"    IdentityFile {self.client_key}\n"
                f"    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {self.known_hosts}\n"
                f"    GlobalKnownHostsFile /dev/null\n"
                f"    StrictHostKeyChecking yes\n"
                f"    ConnectTimeout 10\n")
        for path, lines in ((self.known_hosts, known), (self.ssh_config, config)):
            tmp = path + ".tmp"
            with open(tmp, "w") as handle:
                handle.writelines(lines)
            os.replace(tmp, path)

    # -- down --------------------------------------------------------------
    def _stop_host(self, name: str, pid: Optional[int]) -> None:
        """Stop one host: its init (which takes its PID namespace along) and namespace."""
        ns = netns.netns_name(name)
        victims = set(netns.netns_pids(ns)) if ns in netns.list_netns() else set()
        victims.update(self._stray_inits(name + "/"))
        if pid and _pid_alive(pid):
            victims.add(pid)
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_pid_alive(v) for v in victims) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.02)
        netns.delete_host_netns(name)

    def down(self) -> None:
        """Remove every namespace, process and interface the lab created."""
        self.require_root()
        with self._locked():
            self._down()

    def _down(self) -> None:
        state = self._load_state()
        names = set(state) | {n[len(netns.NETNS_PREFIX):] for n in netns.list_netns()}
        for name in sorted(names):
            self._stop_host(name, state.get(name, {}).get("pid"))
        for pid in self._stray_inits():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns.delete_bridge()
        if os.path.exists(self.state_file):
            self._save_state({})
        for path in (self.ssh_config, self.known_hosts):
            if os.path.exists(path):
                os.remove(path)

    def _stray_inits(self, host: str = "") -> List[int]:
        """Return PIDs of this lab's host inits (of *host*, or all), known or not."""
        marker = os.path.join(self.dir, "hosts", host).encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if b"remote_runner.lab.init" in argv and any(a.startswith(marker) for a in argv):
                pids.append(int(entry))
        return pids

    def status(self) -> List[Dict]:
        """Return one row per known host: name, address, pid, state."""
        rows = []
        for name, info in sorted(self._load_state().items(), key=lambda kv: kv[1]["index"]):
            alive = _pid_alive(info.get("pid"))
            ssh_ok = alive and _port_open(info["address"])
            rows.append({"host": name, "address": info["address"], "pid": info.get("pid"),
                         "state": "up" if ssh_ok else ("starting" if alive else "down"),
                         "release": info.get("release")})
        return rows


def wanted_release(name: str, foreign: Dict[str, str], running: Dict[str, LabHost],
                   state: Dict[str, Dict]) -> Optional[str]:
    """Return the release host *name* should run (None: an overlay of the local root).

    Named in *foreign*: that release. Otherwise what it runs now, or ran before it
    crashed (its entry in the lab's *state*): bringing up more hosts never changes
    the ones already there.
    """
    if name in foreign:
        return foreign[name]
    if name in running:
        return running[name].release
    return state.get(name, {}).get("release")


def _host_index(name: str) -> int:
    if not (name.startswith("h") and name[1:].isdigit()):
        raise LabError(f"lab host names are h1..h{netns.MAX_HOSTS}, not {name!r}")
    return int(name[1:])


#: Packages a foreign host root gets, on top of debootstrap's minbase.
ROOT_PACKAGES = "openssh-server,screen,openssl,python3,fuse3,procps,iproute2"  # (fuse3 brings its release's libfuse3)
ROOTS_DIR = "/var/lib/remote-runner/roots"


def ensure_root(release: str) -> str:
    """Return a Debian *release* root for foreign hosts, building it once with debootstrap."""
    if not release.isalnum():
        raise LabError(f"not a Debian release name: {release!r}")
    root = os.path.join(os.environ.get("REMOTE_RUNNER_ROOTS_DIR", ROOTS_DIR), release)
    if os.path.exists(os.path.join(root, "usr/sbin/sshd")):
        return root
    if subprocess.run(["sh", "-c", "command -v debootstrap"], capture_output=True).returncode:
        raise LabError("foreign lab hosts need debootstrap: apt-get install debootstrap")
    tmp = root + ".tmp"
    subprocess.run(["rm", "-rf", tmp], check=True)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={ROOT_PACKAGES}", release, tmp,
         "http://deb.debian.org/debian"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"debootstrap {release} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    os.replace(tmp, root)
    return root


def _reap() -> None:
    """Collect exited children of ours (hosts started by this process)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


__all__ = ["Lab", "LabHost", "LOCAL_ONLY", "TEST_USER", "TEST_UID"]
