"""Acceptance tests of the mirror on lab hosts (real sshd, real FUSE, real chroot).

Every program run here lives only on this machine: under LOCAL_ONLY (which
hosts never see) or, for ffmpeg, deleted from the host's private overlay
first. Outputs must appear on the local disk.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ssh

pytestmark = pytest.mark.lab

EXEC_TIMEOUT = 300


def rr_exec(lab, host: str, argv, cwd: Path, *options: str, stdin: bytes = b"", user: str = "",
            env=None):
    """Run ``remote-runner exec`` as a user would; return the CompletedProcess."""
    target = f"{user}@{host}" if user else host
    return subprocess.run([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config,
                           *options, target, *argv],
                          cwd=str(cwd), input=stdin, capture_output=True, timeout=EXEC_TIMEOUT,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def local_only():
    """A fresh directory under LOCAL_ONLY (absent on every host), removed afterwards."""
    from remote_runner.lab import LOCAL_ONLY
    path = Path(LOCAL_ONLY) / f"mirror-{uuid.uuid4().hex[:10]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_c_program_with_its_own_shared_library(lab, local_only, workdir):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    (local_only / "greet.c").write_text('const char *greeting(void) { return "hello from libgreet"; }\n')
    (local_only / "main.c").write_text(textwrap.dedent("""\
        #include <stdio.h>
        const char *greeting(void);
        int main(int argc, char **argv) {
            FILE *f = fopen(argv[1], "w");
            if (!f) return 9;
            fprintf(f, "%s\\n", greeting());
            fclose(f);
            printf("wrote %s\\n", argv[1]);
            return 0;
        }
        """))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(local_only / "libgreet.so"), str(local_only / "greet.c")],
                   check=True)
    subprocess.run(["gcc", "-o", str(local_only / "greeter"), str(local_only / "main.c"),
                    f"-L{local_only}", "-lgreet", f"-Wl,-rpath,{local_only}"], check=True)
    assert ssh(lab, "h1", f"test -e {shlex.quote(str(local_only))}", check=False).returncode != 0
    proc = rr_exec(lab, "h1", [str(local_only / "greeter"), "result.txt"], workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"wrote result.txt\n"
    assert (workdir / "result.txt").read_text() == "hello from libgreet\n"


def test_python_script_importing_local_only_module(lab, local_only, workdir):
    (local_only / "secretmod.py").write_text("import socket\nVALUE = 'local-only module on ' + socket.gethostname()\n")
    (local_only / "script.py").write_text(
        "import sys, secretmod\nopen(sys.argv[1], 'w').write(secretmod.VALUE + '\\n')\n")
    proc = rr_exec(lab, "h2", ["/usr/bin/python3", str(local_only / "script.py"), "py-out.txt"], workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    # Imported from the local disk, ran on h2 (the host's UTS namespace).
    assert (workdir / "py-out.txt").read_text() == "local-only module on h2\n"


def _encode_with_ffmpeg(lab, host: str, workdir: Path) -> None:
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi",
                    "-i", "testsrc=duration=1:size=160x120:rate=10", "clip.mp4"], cwd=workdir, check=True)
    proc = rr_exec(lab, host, ["ffmpeg", "-y", "-loglevel", "error", "-i", "clip.mp4",
                               "-c:v", "libx264", "-preset", "ultrafast", "encoded.mp4"], workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames",
                            "-show_entries", "stream=codec_name,nb_read_frames", "-of", "json", "encoded.mp4"],
                           cwd=workdir, capture_output=True, text=True, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    assert stream["codec_name"] == "h264"
    assert int(stream["nb_read_frames"]) == 10


def test_ffmpeg_encodes_on_a_host_without_ffmpeg(lab, workdir):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed locally")
    ssh(lab, "h3", "rm -f /usr/bin/ffmpeg")  # the host's private overlay only
    assert ssh(lab, "h3", "command -v ffmpeg", check=False).returncode != 0
    _encode_with_ffmpeg(lab, "h3", workdir)


@pytest.mark.parametrize("release", ["11", "13"])
def test_ffmpeg_on_a_foreign_distribution(lab, request, workdir, release):
    """A host with its own (debootstrapped) root: nothing of this machine but the mirror."""
    foreign_host = request.getfixturevalue("foreign_host" if release == "11" else "newer_host")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed on this machine (scripts/setup.sh installs it)")
    assert ssh(lab, foreign_host, "command -v ffmpeg", check=False).returncode != 0
    _encode_with_ffmpeg(lab, foreign_host, workdir)


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_status_is_the_commands(lab, workdir, code):
    proc = rr_exec(lab, "h1", ["sh", "-c", f"echo out; echo err >&2; exit {code}"], workdir)
    assert proc.returncode == code
    assert proc.stdout == b"out\n"
    assert proc.stderr == b"err\n"


def test_killed_by_signal_and_stdin(lab, workdir):
    proc = rr_exec(lab, "h1", ["sh", "-c", "kill -TERM $$"], workdir)
    assert proc.returncode == 143
    proc = rr_exec(lab, "h1", ["sh", "-c", "tr a-z A-Z"], workdir, stdin=b"piped through\n")
    assert proc.returncode == 0 and proc.stdout == b"PIPED THROUGH\n"


def _read_until(fd: int, marker: bytes, seen: bytearray, deadline: float) -> bool:
    """Read the pty master *fd* into *seen* until *marker* appears, EOF, or *deadline*."""
    import select
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed its side
            return False
        if not chunk:
            return False
        seen += chunk
    return True


def test_a_terminal_gets_a_pty_whose_size_follows(lab, workdir):
    """Local stdin and stdout on a terminal: the command gets a pty, and a resize reaches it."""
    import fcntl
    import struct
    import termios
    script = ("test -t 0 && test -t 1 && echo ON-A-TTY; echo SIZE $(stty size); "
              "trap 'echo RESIZED $(stty size); exit 7' WINCH; echo READY; "
              "while :; do sleep 0.1; done")
    argv = [sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, "h1", "sh", "-c", script]
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 97, 0, 0))
    pid = os.fork()
    if pid == 0:  # child: the terminal becomes its controlling tty, as in a shell
        try:
            os.close(master)
            os.chdir(str(workdir))
            os.login_tty(slave)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(slave)
    seen = bytearray()
    status = None
    try:
        ready = _read_until(master, b"READY", seen, time.monotonic() + EXEC_TIMEOUT)
        assert ready, seen.decode(errors="replace")
        # The kernel signals SIGWINCH to the terminal's foreground group: remote-runner.
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 42, 123, 0, 0))
        _read_until(master, b"\x00never", seen, time.monotonic() + 60)  # to EOF
        deadline = time.monotonic() + 60
        while status is None and time.monotonic() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
            else:
                time.sleep(0.05)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
    text = seen.decode(errors="replace")
    assert "ON-A-TTY" in text and "SIZE 31 97" in text, text
    assert "RESIZED 42 123" in text, text
    assert status is not None and os.waitstatus_to_exitcode(status) == 7, text


def test_file_operations_over_ssh(lab, workdir):
    (workdir / "log").write_text("one\n")
    script = r"""
set -e
echo two >> log
echo new > a && mv a b
mkfifo pipe
(echo via-fifo > pipe &); cat pipe > fifo.txt
n=$(printf 'na\377me'); echo odd > "$n"
hostname > where
"""
    proc = rr_exec(lab, "h2", ["sh", "-c", script], workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (workdir / "log").read_text() == "one\ntwo\n"
    assert (workdir / "b").read_text() == "new\n" and not (workdir / "a").exists()
    assert (workdir / "fifo.txt").read_text() == "via-fifo\n"
    assert Path(os.fsdecode(os.fsencode(str(workdir)) + b"/na\xffme")).read_text() == "odd\n"
    assert (workdir / "where").read_text() == "h2\n"


def _host_pid_alive(lab, host: str, pid: int) -> bool:
    out = ssh(lab, host, f"cat /proc/{pid}/stat 2>/dev/null || true").stdout
    return bool(out) and out.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _ppid(lab, host: str, pid: int) -> int:
    return int(ssh(lab, host, f"cat /proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()[1])


def test_killed_link_exits_254_and_cleans_the_host(lab, workdir):
    local = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, "h1",
                              "sh", "-c", "echo $$ > pid; sleep 1000 & echo $! > child; wait"],
                             cwd=str(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                (workdir / f).exists() and (workdir / f).read_text().strip() for f in ("pid", "child")):
            assert local.poll() is None, local.stderr.read().decode()
            time.sleep(0.1)
        pid = int((workdir / "pid").read_text())
        child = int((workdir / "child").read_text())
        agent = _ppid(lab, "h1", pid)
        sshd = _ppid(lab, "h1", agent)
        assert "sshd" in ssh(lab, "h1", f"cat /proc/{sshd}/comm").stdout
        mnt_ns = ssh(lab, "h1", f"readlink /proc/{agent}/ns/mnt").stdout.strip()
        ssh(lab, "h1", f"kill -KILL {sshd}")
        _, err = local.communicate(timeout=120)
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
    assert local.returncode == 254
    assert b"link" in err and b"lost" in err
    end = time.monotonic() + 60
    while time.monotonic() < end and any(_host_pid_alive(lab, "h1", p) for p in (pid, child, agent)):
        time.sleep(0.2)
    assert not any(_host_pid_alive(lab, "h1", p) for p in (pid, child, agent))
    # Nothing is left in the agent's mount namespace, so its FUSE mount is gone too.
    holders = ssh(lab, "h1", f"for n in /proc/[0-9]*/ns/mnt; do [ \"$(readlink $n)\" = {shlex.quote(mnt_ns)} ] "
                             "&& echo $n; done; true").stdout
    assert holders.strip() == ""


def test_files_only_runs_the_hosts_program_with_local_files(lab, local_only, workdir, tmp_path):
    (workdir / "in.txt").write_text("lower case\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "more.txt").write_text("more\n")
    (local_only / "tool").write_text("#!/bin/sh\necho local tool\n")
    (local_only / "tool").chmod(0o755)
    script = (f"tr a-z A-Z < in.txt > out.txt; cat {shlex.quote(str(elsewhere / 'more.txt'))} >> out.txt; "
              f"test -e {shlex.quote(str(local_only))} && echo sees-local-only || echo host-root")
    proc = rr_exec(lab, "h2", ["sh", "-c", script, "sh", str(elsewhere / "more.txt")], workdir, "--files-only")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"host-root\n"
    assert (workdir / "out.txt").read_text() == "LOWER CASE\nmore\n"
    # The local-only program cannot run: files-only mode uses the host's programs.
    proc = rr_exec(lab, "h2", [str(local_only / "tool")], workdir, "--files-only")
    assert proc.returncode == 127


def test_non_root_user(lab, workdir):
    """As rrtest: an unprivileged user + mount namespace maps the local uid."""
    probe = ssh(lab, "h1", "unshare -Urm true", check=False, user="rrtest")
    assert probe.returncode == 0, f"lab hosts must allow user namespaces: {probe.stderr}"
    proc = rr_exec(lab, "h1", ["sh", "-c", "id -u; echo mine > mine"], workdir, user="rrtest")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == str(os.getuid())
    assert (workdir / "mine").stat().st_uid == os.getuid()


def test_mirror_server_window_argv(lab, local_only, workdir):
    """The runner's API: a daemon agent, and a window command that exits with the command's status."""
    from remote_runner.mirror.session import MirrorServer
    from remote_runner.ssh import Connection, SSHOptions

    (local_only / "job.sh").write_text('#!/bin/sh\necho "$GREETING from $(hostname)" > job.out\nexit 7\n')
    (local_only / "job.sh").chmod(0o755)
    conn = Connection("h1", SSHOptions(ssh_config_file=lab.ssh_config)).connect()
    try:
        server = MirrorServer(conn).start()
        try:
            argv = server.window_argv([str(local_only / "job.sh")], cwd=str(workdir), env={"GREETING": "hi"})
            proc = ssh(lab, "h1", shlex.join(argv), check=False)
            assert proc.returncode == 7, proc.stderr
            assert (workdir / "job.out").read_text() == "hi from h1\n"
            argv = server.window_argv(["sh", "-c", "kill -TERM $$"], cwd=str(workdir))
            assert ssh(lab, "h1", shlex.join(argv), check=False).returncode == 143
            pending = server.window_argv(["true"], cwd=str(workdir))
        finally:
            server.close()
        # Once the mirror is gone, a window command fails with 254 and says why.
        end = time.monotonic() + 60
        proc = ssh(lab, "h1", shlex.join(pending), check=False)
        while proc.returncode != 254 and time.monotonic() < end:
            time.sleep(0.2)
            proc = ssh(lab, "h1", shlex.join(pending), check=False)
        assert proc.returncode == 254
        assert "mirror" in proc.stderr
    finally:
        conn.close()


def test_agent_is_uploaded_once_then_found_by_hash(lab, workdir):
    from remote_runner.mirror.bundle import CACHE_DIR, build_bundle
    cached = f"$HOME/{CACHE_DIR}/{build_bundle().filename}"
    ssh(lab, "h2", f'rm -f "{cached}"')
    first = rr_exec(lab, "h2", ["true"], workdir, "-l", "INFO")
    assert first.returncode == 0, first.stderr.decode()
    assert b"uploading the mirror agent" in first.stderr
    assert ssh(lab, "h2", f'test -f "{cached}" && stat -c %a "{cached}"').stdout.strip() == "600"
    second = rr_exec(lab, "h2", ["true"], workdir, "-l", "INFO")
    assert second.returncode == 0
    assert b"uploading" not in second.stderr


def test_serve_components_for_the_runner(lab, local_only, workdir):
    """The hook remote_runner.runner calls: one mirror per host, argv per component."""
    from types import SimpleNamespace

    from remote_runner.mirror import serve_components
    from remote_runner.ssh import Connection, SSHOptions

    (local_only / "comp.sh").write_text('#!/bin/sh\necho "$1 on $(hostname)" >> comp.out\n')
    (local_only / "comp.sh").chmod(0o755)
    specs = [SimpleNamespace(name=f"c{i}", host=host, executable=str(local_only / "comp.sh"),
                             args=(f"c{i}",), base_dir=str(workdir)) for i, host in enumerate(["h1", "h2"])]
    conns = {h: Connection(h, SSHOptions(ssh_config_file=lab.ssh_config)).connect() for h in ("h1", "h2")}
    try:
        mirrors = serve_components(conns, specs)
        try:
            for spec in specs:
                argv = mirrors.argv(spec, "/tmp")
                proc = ssh(lab, spec.host, "cd /tmp && " + shlex.join(argv), check=False)
                assert proc.returncode == 0, proc.stderr
        finally:
            mirrors.close()
        assert sorted((workdir / "comp.out").read_text().splitlines()) == ["c0 on h1", "c1 on h2"]
    finally:
        for conn in conns.values():
            conn.close()


def test_mirror_server_link_loss_ends_window_commands(lab, workdir):
    """Killing the daemon's SSH session: the window command exits 254 and the job is killed."""
    from remote_runner.mirror.session import MirrorServer
    from remote_runner.ssh import Connection, SSHOptions

    conn = Connection("h2", SSHOptions(ssh_config_file=lab.ssh_config)).connect()
    window = None
    try:
        server = MirrorServer(conn).start()
        argv = server.window_argv(["sh", "-c", "echo $$ > job.pid; exec sleep 1000"], cwd=str(workdir))
        window = subprocess.Popen(["ssh", "-F", lab.ssh_config, "-o", "BatchMode=yes", "h2", shlex.join(argv)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pidfile = workdir / "job.pid"
        end = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < end and window.poll() is None
            time.sleep(0.1)
        job = int(pidfile.read_text())
        sshd = _ppid(lab, "h2", server.agent_pid)
        ssh(lab, "h2", f"kill -KILL {sshd}")
        _, err = window.communicate(timeout=120)
        assert window.returncode == 254
        assert b"link lost" in err or b"went away" in err
        end = time.monotonic() + 60
        while _host_pid_alive(lab, "h2", job) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _host_pid_alive(lab, "h2", job)
        assert not _host_pid_alive(lab, "h2", server.agent_pid)
        server.close()
    finally:
        if window is not None and window.poll() is None:
            window.kill()
            window.wait()
        conn.close()


def test_a_host_that_never_answers_the_handshake_ends_the_start_with_an_error(lab, monkeypatch):
    """Before the agent's hello no heartbeat watches the link: a launch that prints nothing (a
    login shell stuck on a hung home, say) must end the start, not hang it."""
    from types import SimpleNamespace
    from remote_runner.errors import MirrorError
    from remote_runner.mirror import locallink
    from remote_runner.mirror.locallink import LocalLink, MirrorOptions
    from remote_runner.mirror.service import LocalFileService
    from remote_runner.mirror.streams import ChannelStream
    from remote_runner.ssh import Connection, SSHOptions
    monkeypatch.setattr(locallink, "HANDSHAKE_TIMEOUT", 2.0)
    with Connection("h1", SSHOptions(ssh_config_file=lab.ssh_config)) as connection:
        connection.connect()
        stream = ChannelStream(connection.exec_channel("exec sleep 90"))  # ends by itself
        link = LocalLink(stream, LocalFileService(), MirrorOptions(), host="h1")
        started = time.monotonic()
        try:
            with pytest.raises(MirrorError, match="did not start"):
                link.handshake(SimpleNamespace(sha256="0" * 64, data=b""))
        finally:
            link.close()
        assert time.monotonic() - started < 60
