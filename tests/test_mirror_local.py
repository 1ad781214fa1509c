"""The mirror end to end on this machine: the real agent (zipapp) in a subprocess, real FUSE.

The agent normally runs on a host over SSH; here its stdin/stdout are pipes to
this process, which is all the protocol needs. It still enters its own mount
namespace, mounts the local file system over FUSE and chroots the command into
it, so these tests exercise the same code paths as the lab tests, faster.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from remote_runner.mirror.bundle import build_bundle
from remote_runner.mirror.session import MirrorOptions, PipeStream, run_command

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="local mirror tests need root and /dev/fuse")


@pytest.fixture(scope="module")
def agent_pyz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agent") / build_bundle().filename
    path.write_bytes(build_bundle().data)
    return path


class Run:
    def __init__(self, result, out: bytes, err: bytes) -> None:
        self.status = result.status
        self.result = result
        self.out = out
        self.err = err


def run_local(agent_pyz: Path, tmp_path: Path, argv, stdin: bytes = b"", cwd=None,
              options=None, python: str = sys.executable, streams=None) -> Run:
    """Run *argv* in a local mirror; clean up the agent process whatever happens."""
    stream = PipeStream([python, str(agent_pyz), "exec"])
    if streams is not None:
        streams.append(stream)
    io_dir = tmp_path / "io"
    io_dir.mkdir(exist_ok=True)
    (io_dir / "stdin").write_bytes(stdin)
    with open(io_dir / "stdin", "rb") as fin, open(io_dir / "stdout", "wb") as fout, \
            open(io_dir / "stderr", "wb") as ferr:
        try:
            result = run_command(None, argv, cwd=str(cwd or tmp_path), options=options or MirrorOptions(),
                                 stream=stream, stdin_fd=fin.fileno(), stdout_fd=fout.fileno(),
                                 stderr_fd=ferr.fileno())
        finally:
            if stream.proc.poll() is None:
                try:
                    stream.proc.wait(10)
                except subprocess.TimeoutExpired:
                    stream.proc.kill()
                    stream.proc.wait()
    return Run(result, (io_dir / "stdout").read_bytes(), (io_dir / "stderr").read_bytes())


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes(agent_pyz, tmp_path, code):
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", f"echo out; echo err >&2; exit {code}"])
    assert run.status == code
    assert not run.result.link_lost
    assert run.out == b"out\n" and run.err == b"err\n"


def test_killed_by_signal_is_128_plus_n(agent_pyz, tmp_path):
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", "kill -TERM $$"])
    assert run.status == 128 + signal.SIGTERM


def test_stdin_is_piped(agent_pyz, tmp_path):
    data = os.urandom(300000)
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", "cat > got.bin; wc -c < got.bin"], stdin=data)
    assert run.status == 0
    assert (tmp_path / "got.bin").read_bytes() == data
    assert run.out.strip() == str(len(data)).encode()


def test_file_semantics_land_on_local_disk(agent_pyz, tmp_path):
    (tmp_path / "existing").write_text("first\n")
    script = r"""
set -e
echo second >> existing
printf 'new\n' > created
mv created renamed
mkdir -p d/e && echo deep > d/e/f
ln -s renamed link && cat link > via-link
ln renamed hard
rm -f hard
mkfifo fifo
(echo through-fifo > fifo &) ; cat fifo > fifo-out
name=$(printf 'caf\351')
echo bytes > "$name"
chmod 600 renamed
touch -d '2001-02-03 04:05:06' renamed
truncate -s 2 via-link
dd if=/dev/zero of=sparse bs=1 count=1 seek=70000 2>/dev/null
df -P . > /dev/null
ls -la > listing
"""
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", script])
    assert run.status == 0, run.err
    assert (tmp_path / "existing").read_text() == "first\nsecond\n"
    assert not (tmp_path / "created").exists()
    assert (tmp_path / "renamed").read_text() == "new\n"
    assert (tmp_path / "d/e/f").read_text() == "deep\n"
    assert os.readlink(tmp_path / "link") == "renamed"
    assert (tmp_path / "via-link").read_text() == "ne"
    assert not (tmp_path / "hard").exists()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert (tmp_path / "fifo-out").read_text() == "through-fifo\n"
    assert (Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))).read_text() == "bytes\n"
    st = (tmp_path / "renamed").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert time.gmtime(st.st_mtime)[:1] == (2001,)
    assert (tmp_path / "sparse").stat().st_size == 70001
    assert st.st_uid == os.getuid()
    assert "caf" in (tmp_path / "listing").read_bytes().decode("utf-8", "replace")


def test_umask_and_env_travel(agent_pyz, tmp_path, monkeypatch):
    monkeypatch.setenv("RR_MIRROR_TEST_VAR", "hello")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/nonexistent/agent.sock")
    old = os.umask(0o027)
    try:
        run = run_local(agent_pyz, tmp_path, ["sh", "-c", 'touch made; echo "$RR_MIRROR_TEST_VAR:${SSH_AUTH_SOCK-unset}:$(pwd)"'])
    finally:
        os.umask(old)
    assert run.status == 0
    assert run.out.decode().strip() == f"hello:unset:{tmp_path}"
    assert stat.S_IMODE((tmp_path / "made").stat().st_mode) == 0o640


def test_rename_noreplace_and_exchange_through_fuse(agent_pyz, tmp_path):
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    code = ("import ctypes, os, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "r = libc.renameat2(-100, b'a', -100, b'b', 1)\n"
            "print(r, ctypes.get_errno())\n"
            "r = libc.renameat2(-100, b'a', -100, b'b', 2)\n"
            "print(r, ctypes.get_errno() if r else 0)\n")
    run = run_local(agent_pyz, tmp_path, [sys.executable, "-c", code])
    assert run.status == 0, run.err
    first, second = run.out.decode().split("\n")[:2]
    assert first == "-1 17"  # EEXIST: NOREPLACE was honoured, not silently dropped
    assert second == "0 0"
    assert (tmp_path / "a").read_text() == "B" and (tmp_path / "b").read_text() == "A"


def test_missing_program_exits_127_like_a_shell(agent_pyz, tmp_path):
    run = run_local(agent_pyz, tmp_path, ["/definitely/not/here"])
    assert run.status == 127
    assert not run.result.link_lost
    assert b"/definitely/not/here" in run.err and b"No such file" in run.err


def test_agent_runs_on_python_38(agent_pyz, tmp_path):
    python = next((str(p) for p in Path("/root/.pyenv/versions").glob("3.8.*/bin/python3.8")), None)
    if python is None:
        pytest.skip("no Python 3.8 here")
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", "echo ok > out38; cat out38"], python=python)
    assert run.status == 0, run.err
    assert run.out == b"ok\n"


def test_link_loss_kills_command_and_returns_254(agent_pyz, tmp_path):
    streams = []
    box = {}

    def target():
        box["run"] = run_local(agent_pyz, tmp_path, ["sh", "-c", "echo $$ > pid; sleep 1000 & wait"],
                               streams=streams)

    thread = threading.Thread(target=target)
    thread.start()
    pidfile = tmp_path / "pid"
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    agent = streams[0].proc
    # Cut the link: the agent's stdin closes, as when sshd dies.
    agent.stdin.close()
    thread.join(60)
    assert not thread.is_alive()
    assert box["run"].status == 254
    assert box["run"].result.link_lost
    assert agent.wait(30) is not None

    def alive(p: int) -> bool:
        try:
            with open(f"/proc/{p}/stat") as fh:
                return fh.read().split(") ")[1][0] != "Z"
        except OSError:
            return False

    end = time.monotonic() + 30
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not alive(pid), "the remote command survived the lost link"


USERNS_WRAPPER = (
    # A host where /dev/fuse is 0666 (the usual default): this container's is 0600,
    # so give the agent, in its own mount namespace, a 0666 node for the same device.
    'd=$(mktemp -d) && mknod "$d/fuse" c 10 229 && chmod 666 "$d/fuse" && '
    'mount --bind "$d/fuse" /dev/fuse && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"')


def _userns_possible() -> bool:
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "unshare", "-U", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_non_root_agent_uses_user_namespace(tmp_path, agent_pyz):
    """As a non-root user, the mirror runs in a user namespace with the local uid mapped."""
    if not _userns_possible():
        pytest.skip("this kernel refuses unprivileged user namespaces")
    public = Path("/tmp") / f"rr-agent-{os.getpid()}"
    public.mkdir(mode=0o755, exist_ok=True)
    try:
        pyz = public / "agent.pyz"
        pyz.write_bytes(agent_pyz.read_bytes())
        pyz.chmod(0o644)
        stream = PipeStream(["unshare", "-m", "--propagation", "private", "sh", "-c", USERNS_WRAPPER, "sh",
                             sys.executable, str(pyz), "exec"])
        out = tmp_path / "out"
        with open(out, "wb") as fout, open(os.devnull, "rb") as fin:
            try:
                result = run_command(None, ["sh", "-c", "id -u; echo made > made; cat /proc/self/uid_map"],
                                     cwd=str(tmp_path), stream=stream, stdin_fd=fin.fileno(),
                                     stdout_fd=fout.fileno(), stderr_fd=fout.fileno())
            finally:
                if stream.proc.poll() is None:
                    stream.proc.kill()
                stream.proc.wait()
        lines = out.read_text().split("\n")
        assert result.status == 0, out.read_text()
        assert lines[0] == str(os.getuid())          # the local uid, mapped
        assert lines[1].split() == [str(os.getuid()), "65534", "1"]  # ... onto the connecting user
        assert (tmp_path / "made").read_text() == "made\n"
        assert (tmp_path / "made").stat().st_uid == os.getuid()      # owned by the local user here
    finally:
        for child in public.iterdir():
            child.unlink()
        public.rmdir()


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("signame,status", [("SIGUSR1", 9), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_local_signals_are_forwarded(agent_pyz, tmp_path, signame, status):
    signum = getattr(signal, signame)
    trap = 'trap "echo got > sig.txt; exit 9" USR1; ' if signame == "SIGUSR1" else ""
    ready = tmp_path / "ready"

    def send_when_ready():
        _wait_for(ready)
        os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send_when_ready, daemon=True)
    sender.start()
    streams = []
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", trap + "echo up > ready; while :; do sleep 0.1; done"],
                    streams=streams)
    sender.join(10)
    assert run.status == status, (run.result.message, run.err[-800:], streams[0].proc.returncode,
                                  (tmp_path / "ready").exists())
    if signame == "SIGUSR1":
        assert (tmp_path / "sig.txt").read_text() == "got\n"


def test_stalled_file_operation_fails_with_eio_in_bounded_time(agent_pyz, tmp_path, monkeypatch):
    """A request the local side never answers becomes EIO on the host, not a hang."""
    from remote_runner.mirror import session as session_mod
    from remote_runner.mirror.service import LocalFileService

    release = threading.Event()

    class StallingService(LocalFileService):
        def op_getattr(self, a, payload):
            if a.get("path", "").endswith("/stall"):
                release.wait(120)
            return super().op_getattr(a, payload)

    monkeypatch.setattr(session_mod, "LocalFileService", StallingService)
    try:
        run = run_local(agent_pyz, tmp_path, ["sh", "-c", "cat stall; echo status=$?"],
                        options=MirrorOptions(request_timeout=2.0))
    finally:
        release.set()
    assert run.status == 0
    assert b"status=1" in run.out
    assert b"Input/output error" in run.err


def test_silent_agent_is_a_lost_link(agent_pyz, tmp_path):
    """No frame within the deadline (here: the agent is frozen) -> 254, bounded."""
    streams = []
    box = {}

    def target():
        box["run"] = run_local(agent_pyz, tmp_path, ["sh", "-c", "echo up > ready; sleep 1000"], streams=streams,
                               options=MirrorOptions(heartbeat=0.5, deadline=3.0))

    thread = threading.Thread(target=target)
    thread.start()
    try:
        _wait_for(tmp_path / "ready")
        agent = streams[0].proc
        os.kill(agent.pid, signal.SIGSTOP)
        end = time.monotonic() + 60
        while not agent.stdin.closed and time.monotonic() < end:  # the local side gave up
            time.sleep(0.05)
        os.kill(agent.pid, signal.SIGCONT)  # let it notice and clean up
        thread.join(60)
        assert not thread.is_alive()
        assert box["run"].status == 254 and box["run"].result.link_lost
        assert "no answer" in box["run"].result.message
    finally:
        agent = streams[0].proc
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGCONT)
        thread.join(60)


def test_pty_mode_and_window_size(agent_pyz, tmp_path):
    """With a terminal on stdin and stdout the command gets a pty of the same size."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    chunks = []
    stop = threading.Event()

    def drain():
        import select
        while not stop.is_set():
            if not select.select([master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream = PipeStream([sys.executable, str(agent_pyz), "exec"])
    try:
        result = run_command(None, ["sh", "-c", "test -t 0 && test -t 1 && stty size; exit 6"],
                             cwd=str(tmp_path), stream=stream, stdin_fd=slave, stdout_fd=slave, stderr_fd=slave)
    finally:
        if stream.proc.poll() is None:
            stream.proc.kill()
        stream.proc.wait()
        stop.set()
        reader.join(10)
        os.close(slave)
        os.close(master)
    assert result.status == 6
    assert b"33 101" in b"".join(chunks)


def test_whole_process_tree_is_cleaned_up_when_the_command_ends(agent_pyz, tmp_path):
    """Background children, even ones that left the process group (setsid), do not outlive the command."""
    run = run_local(agent_pyz, tmp_path, ["sh", "-c",
                                          "sleep 1000 & echo $! > bg; setsid sleep 1000 & echo $! > detached; "
                                          "sleep 0.2; exit 0"])
    assert run.status == 0
    pids = [int((tmp_path / name).read_text()) for name in ("bg", "detached")]

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    end = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_version_mismatch_is_a_clear_error(tmp_path):
    """An agent speaking another protocol major version is refused up front."""
    from remote_runner.errors import MirrorError
    from remote_runner.mirror import protocol as P

    fake = tmp_path / "fake_agent.py"
    fake.write_text(
        "import sys, json, struct\n"
        "h = json.dumps({'t': 'hello', 'v': '99.0', 'machine': 'x'}).encode()\n"
        "sys.stdout.buffer.write(struct.pack('!II', len(h), 0) + h); sys.stdout.flush()\n"
        "sys.stdin.read()\n")
    stream = PipeStream([sys.executable, str(fake)])
    try:
        with pytest.raises(MirrorError, match="protocol version '99.0' is not compatible"):
            run_command(None, ["true"], cwd=str(tmp_path), stream=stream)
    finally:
        stream.proc.kill()
        stream.proc.wait()
        for f in (stream.proc.stdin, stream.proc.stdout, stream.proc.stderr):
            f.close()
    assert P.PROTOCOL_VERSION.split(".")[0] != "99"


@pytest.mark.parametrize("library", ["libfuse.so.2", "libfuse3.so.3"])
def test_works_with_either_libfuse(agent_pyz, tmp_path, monkeypatch, library):
    """Hosts may have only libfuse 2 or only libfuse 3."""
    import ctypes
    try:
        ctypes.CDLL(library)
    except OSError:
        pytest.skip(f"{library} is not installed here")
    monkeypatch.setenv("FUSE_LIBRARY_PATH", library)  # what the agent would pick on such a host
    (tmp_path / "f").write_text("one\n")
    run = run_local(agent_pyz, tmp_path, ["sh", "-c", "echo two >> f; mv f g; mkfifo p; cat g; exit 3"])
    assert run.status == 3, run.err
    assert run.out == b"one\ntwo\n"
    assert stat.S_ISFIFO(os.lstat(tmp_path / "p").st_mode)


def test_chown_statfs_and_fsync_reach_the_local_disk(agent_pyz, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    code = ("import os, sys, json\n"
            "fd = os.open('synced', os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "os.write(fd, b'kept'); os.fsync(fd); os.fdatasync(fd); os.close(fd)\n"
            "os.chown('synced', 2000, 2001)\n"
            "sv = os.statvfs('.')\n"
            "print(json.dumps([sv.f_bsize, sv.f_blocks, sv.f_files]))\n")
    run = run_local(agent_pyz, tmp_path, [sys.executable, "-c", code])
    assert run.status == 0, run.err
    st = (tmp_path / "synced").stat()
    assert (tmp_path / "synced").read_bytes() == b"kept" and (st.st_uid, st.st_gid) == (2000, 2001)
    local = os.statvfs(tmp_path)
    assert json.loads(run.out) == [local.f_bsize, local.f_blocks, local.f_files]


def test_exec_to_a_host_it_cannot_reach_says_so_and_exits_254(tmp_path):
    # the handshake runs while exec works out what to serve: its failure still ends the run
    config = tmp_path / "ssh_config"
    config.write_text("Host gone\n    HostName nosuchhost.invalid\n    ConnectTimeout 5\n")
    proc = subprocess.run([sys.executable, "-m", "remote_runner", "exec", "-F", str(config), "gone",
                           "/bin/true"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 254, proc.stderr
    assert "host gone" in proc.stderr and "nosuchhost.invalid" in proc.stderr


def test_libfuse_is_found_by_soname_without_running_ldconfig(monkeypatch):
    """The agent picks libfuse 3, else 2, through the loader's cache; ``find_library`` (which runs
    ``ldconfig -p``, and again inside mfusepy when given a name) only when no soname loads."""
    import ctypes
    import ctypes.util
    from remote_runner.mirror.host import mount
    for var in ("FUSE_LIBRARY_PATH", "FUSE_LIBRARY_NAME"):
        monkeypatch.delenv(var, raising=False)
    searched = []
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: searched.append(name))

    def loads(*sonames):
        def cdll(name, *args, **kwargs):
            if name not in sonames:
                raise OSError(name)
        monkeypatch.setattr(ctypes, "CDLL", cdll)
    loads("libfuse3.so.3", "libfuse.so.2")
    assert mount.choose_libfuse() == "fuse3" and os.environ["FUSE_LIBRARY_PATH"] == "libfuse3.so.3"
    assert searched == []
    monkeypatch.delenv("FUSE_LIBRARY_PATH")
    loads("libfuse.so.2")
    assert mount.choose_libfuse() == "fuse" and os.environ["FUSE_LIBRARY_PATH"] == "libfuse.so.2"
    assert searched == ["fuse3"]
    monkeypatch.delenv("FUSE_LIBRARY_PATH")
    loads()
    with pytest.raises(OSError, match="neither libfuse3 nor libfuse2 .*apt-get install fuse3"):
        mount.choose_libfuse()
