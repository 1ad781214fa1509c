"""Scripts run on the session lock's shell: one round trip each, never a second run.

The lab tests take a real lock over a real connection (sshd, flock, the
host's sh and head) and run steps on it; the unit tests give the reader a
scripted channel to check how it frames answers and what a refusal does.
"""

from __future__ import annotations

import socket
import time
from typing import List

import pytest

from remote_runner import sessionlock
from remote_runner.errors import CommandTimeout, SessionBusy
from remote_runner.sessionlock import LockShell, SessionLock, acquire_lock
from remote_runner.shell import ARGV_SCRIPT, RemoteShell
from remote_runner.ssh import Connection, SSHOptions
from tests.conftest import ssh


@pytest.fixture
def connected(lab):
    with Connection("h1", SSHOptions(ssh_config_file=lab.ssh_config)) as connection:
        connection.connect()
        yield connection


def _state(tmp_path) -> str:
    return f"/tmp/rr-lockshell-{tmp_path.name}"


@pytest.mark.lab
def test_steps_run_on_the_lock_shell_with_their_own_status_and_outputs(lab, connected, tmp_path):
    state = _state(tmp_path)
    lock = acquire_lock("h1", state, "test", connected, then="echo prepared")
    try:
        assert lock.then_output == "prepared\n" and lock.then_status == 0
        execs = connected.traffic.execs
        # output that looks like the answer's own framing is just output
        first = lock.script("echo out; echo err >&2; echo 'RR-STEP-END 0 0 0 0'; exit 3\n", 60)
        assert (first.exit_status, first.stdout, first.stderr) == \
            (3, "out\nRR-STEP-END 0 0 0 0\n", "err\n")
        # each step is a fresh sh: nothing of the previous one (variables, cwd) is left
        lock.script("rr_x=left; cd /\n", 60)
        second = lock.script('printf "%s|%s" "${rr_x:-unset}" "$PWD"; read -r line; echo "[$line]"\n',
                             60)
        assert second.stdout.startswith("unset|") and not second.stdout.startswith("unset|/|")
        assert second.stdout.endswith("[]\n")  # stdin is /dev/null, not the lock's channel
        # the script was kept where only this user can get at it
        private = lock.script('stat -c "%a %U" "$(dirname "$0")"\n', 60)
        assert private.stdout.split() == ["700", "root"]
        big = "x" * 200000
        third = lock.script(f"printf '%s' '{big}'\n", 60)
        assert third.stdout == big and third.exit_status == 0
        assert connected.traffic.execs == execs and connected.traffic.steps == 5
        with pytest.raises(SessionBusy):  # still held between and after steps
            acquire_lock("h1", state, "other", connected)
    finally:
        lock.release()
        ssh(lab, "h1", f"rm -rf {state}")


@pytest.mark.lab
def test_a_step_that_answers_without_end_is_refused_and_frees_the_lock(lab, connected, tmp_path,
                                                                       monkeypatch):
    from remote_runner import sessionlock
    from remote_runner.errors import OutputTooLarge
    monkeypatch.setattr(sessionlock, "MAX_OUTPUT", 1 << 20)
    state = _state(tmp_path)
    lock = acquire_lock("h1", state, "test", connected)
    try:
        with pytest.raises(OutputTooLarge) as info:
            lock.script("cat /dev/zero\n", 3600)
        assert info.value.host == "h1"
        assert lock.script("echo next\n", 60) is None  # released: the caller runs it another way
        acquire_lock("h1", state, "other", connected).release()  # the lock is free
    finally:
        lock.release()
        ssh(lab, "h1", f"rm -rf {state}")


@pytest.mark.lab
def test_what_a_step_starts_does_not_keep_the_lock(lab, connected, tmp_path):
    state = _state(tmp_path)
    lock = acquire_lock("h1", state, "test", connected)
    try:
        result = lock.script("setsid sleep 60 </dev/null >/dev/null 2>&1 &\necho $!\n", 60)
        pid = int(result.stdout.split()[0])
    finally:
        lock.release()
    try:
        deadline = time.monotonic() + 30
        while True:  # the lock's shell ends when it sees the channel's end
            try:
                again = acquire_lock("h1", state, "again", connected)
                break
            except SessionBusy:
                assert time.monotonic() < deadline, "the lock outlived its shell"
                time.sleep(0.1)
        again.release()
        assert ssh(lab, "h1", f"kill -0 {pid}", check=False).returncode == 0  # it still runs
    finally:
        ssh(lab, "h1", f"kill {pid}; rm -rf {state}", check=False)


@pytest.mark.lab
def test_a_step_past_its_timeout_is_an_error_and_frees_the_lock(lab, connected, tmp_path):
    state = _state(tmp_path)
    lock = acquire_lock("h1", state, "test", connected)
    try:
        with pytest.raises(CommandTimeout) as info:
            lock.script("sleep 3\n", 0.5)
        assert info.value.host == "h1"
        assert lock.handle is None and lock.script("echo again\n", 60) is None
        # a shell on the lock falls back to an exec channel
        shell = LockShell(lock, RemoteShell(connected, "h1"))
        assert shell.script("echo fallback\n", 60).stdout == "fallback\n"
    finally:
        lock.release()
        ssh(lab, "h1", f"sleep 3; rm -rf {state}", check=False)


class ScriptedChannel:
    """A channel that answers with fixed chunks and records what was sent."""

    def __init__(self, chunks: List[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = b""
        self.closed = False

    def settimeout(self, _seconds) -> None:
        pass

    def send(self, data: bytes) -> int:  # (one packet at most, as a paramiko channel)
        self.sent += bytes(data[:32768])
        return min(len(data), 32768)

    def recv(self, _size: int) -> bytes:
        if not self.chunks:
            raise socket.timeout("no answer")
        return self.chunks.pop(0)

    def close(self) -> None:
        self.closed = True


def test_an_answer_in_pieces_is_put_together_and_the_text_sent_length_first(monkeypatch):
    monkeypatch.setattr(sessionlock.secrets, "token_hex", lambda _n: "n0")
    channel = ScriptedChannel([b"ab", b"c\nd\n\nRR-STEP-EN", b"D n0 0 0", b"\n"])
    lock = SessionLock("h", channel)
    result = lock.script("echo \u00e9\n", 5)
    assert (result.exit_status, result.stdout, result.stderr) == (0, "abc\nd\n", "")
    assert channel.sent == "RR-STEP n0 8 0\necho \u00e9\n".encode()


def test_a_step_answer_ends_only_at_its_own_nonce_and_brings_its_stderr(monkeypatch):
    monkeypatch.setattr(sessionlock.secrets, "token_hex", lambda _n: "n2")
    # another nonce's end line and an end line not at a line start are just output
    out = b"x\nRR-STEP-END n9 0 0\ny RR-STEP-END n2 0 0\n"
    channel = ScriptedChannel([out + b"\nRR-STEP-END n2 7 1\ne", b"rr\n\nRR-STEP-E",
                               b"RR n2\n"])
    result = SessionLock("h", channel).script("x\n", 5)
    assert (result.exit_status, result.stdout, result.stderr) == (7, out.decode(), "err\n")


def test_a_host_that_cannot_read_steps_gets_execs_instead(monkeypatch):
    monkeypatch.setattr(sessionlock.secrets, "token_hex", lambda _n: "n1")
    channel = ScriptedChannel([b"RR-STEP-FAIL n1\n"])
    lock = SessionLock("h", channel)
    assert lock.script("true\n", 5) is None
    assert lock.script("true\n", 5) is None and channel.sent.count(b"RR-STEP ") == 1
    assert not channel.closed  # the lock is still held


def test_a_step_on_a_busy_or_local_lock_is_not_taken():
    lock = SessionLock("h", ScriptedChannel([]))
    lock._steps.acquire()
    assert lock.script("true\n", 5) is None
    assert SessionLock("localhost", None).script("true\n", 5) is None


@pytest.mark.lab
def test_a_script_longer_than_one_argument_runs_from_stdin_and_still_reads_its_data(lab, connected):
    """Linux caps one argument at 128 KiB: a longer script goes on stdin ahead of its data."""
    remote = RemoteShell(connected, "h1")
    script = ("# " + "x" * 100 + "\n") * 2000 + "wc -c; echo \"args $#\"\n"  # ~200 KiB
    assert len(script) > 128 << 10 > ARGV_SCRIPT
    result = remote.feed(script, b"0123456789" * 1000, timeout=60)
    assert (result.exit_status, result.stdout.split()) == (0, ["10000", "args", "0"])
    short = remote.feed("wc -c", b"abc", timeout=60)
    assert (short.exit_status, short.stdout.strip()) == (0, "3")


@pytest.mark.lab
def test_a_fed_step_reads_its_data_and_what_it_leaves_is_drained(lab, connected, tmp_path):
    state = _state(tmp_path)
    lock = acquire_lock("h1", state, "test", connected)
    try:
        data = bytes(range(256)) * 4096  # 1 MiB, every byte value
        whole = lock.script("sha1sum | cut -d' ' -f1\n", 60, data)
        assert whole.stdout.strip() == __import__("hashlib").sha1(data).hexdigest()
        # a script that stops reading early (as tar does at its end blocks) leaves the rest
        # to the shell, which drops it: the next step starts at its own header
        early = lock.script("head -c 3 | od -An -tx1; exit 5\n", 60, data)
        assert (early.exit_status, early.stdout.split()) == (5, ["00", "01", "02"])
        assert lock.script("echo next\n", 60).stdout == "next\n"
        # a shell on the lock takes data-fed commands too, without an exec
        execs = connected.traffic.execs
        shell = LockShell(lock, RemoteShell(connected, "h1"))
        assert shell.feed("cat", b"fed\n", 60).stdout == "fed\n"
        assert connected.traffic.execs == execs
    finally:
        lock.release()
        ssh(lab, "h1", f"rm -rf {state}")


@pytest.mark.lab
def test_an_early_answer_comes_before_its_input_is_read_and_the_next_step_starts_clean(
        lab, connected, tmp_path):
    """A fed part whose answer needs none of its input says so: the caller goes on while
    the host still reads that input, and the first step reads the rest of the answer."""
    state = _state(tmp_path)
    feed = b"r" * (3 << 20)  # more than one window: sent while the answer is read
    fed = (f"echo 'answer one'; echo {sessionlock.EARLY_MARK}; sleep 2; "
           f"head -c {len(feed)} | wc -c > {state}/dropped\n")
    lock = acquire_lock("h1", state, "test", connected, then="echo prepared", fed=fed, feed=feed)
    try:
        assert (lock.then_output, lock.then_status) == ("prepared\nanswer one\n", 0)
        assert lock._tail is not None  # taken before the host even began to read its input
        step = lock.script(f"cat {state}/dropped; echo after\n", 60)
        assert step.exit_status == 0 and step.stdout.split() == [str(len(feed)), "after"]
        assert lock.script("echo next\n", 60).stdout == "next\n"
    finally:
        lock.release()
        ssh(lab, "h1", f"rm -rf {state}")


def test_an_early_answer_leaves_the_rest_to_the_first_step(monkeypatch):
    monkeypatch.setattr(sessionlock.secrets, "token_hex", lambda _n: "n3")
    lock = SessionLock("h", None)
    sessionlock._take_then(lock, f"out\n{sessionlock.EARLY_MARK}\nRR-THEN-DO")
    assert (lock.then_output, lock.then_status) == ("out\n", 0)
    # the rest of the answer arrives with the step's, in any pieces
    lock.handle = ScriptedChannel([b"NE 0\nstep o", b"ut\n\nRR-STEP-END n3 0 0\n"])
    result = lock.script("true\n", 5)
    assert (result.exit_status, result.stdout) == (0, "step out\n")
    # whole already: nothing is left for the step to read
    whole = SessionLock("h", None)
    sessionlock._take_then(whole, f"a\n{sessionlock.EARLY_MARK}\nRR-THEN-DONE 0\n")
    assert (whole.then_output, whole.then_status, whole._tail) == ("a\n", 0, None)
    # without the mark, as before: the output before RR-THEN-DONE and its status
    plain = SessionLock("h", None)
    sessionlock._take_then(plain, "b\nRR-THEN-DONE 4\n")
    assert (plain.then_output, plain.then_status, plain._tail) == ("b\n", 4, None)


def test_a_step_cut_short_by_a_dropped_link_is_never_run(tmp_path):
    """The steps loop (run here by a local sh) refuses a script that arrived short: its last line
    could have been cut mid-word (``rm -rf /a/b`` read as ``rm -rf /a``)."""
    import subprocess
    from remote_runner.sessionlock import _STEP, _steps_loop
    victim = tmp_path / "keep"
    victim.mkdir()
    script = f"rm -rf {victim}/sub; echo ran\n".encode()
    cut = script[:script.index(b"/sub")]  # "rm -rf <victim>" and then the link drops
    head = f"{_STEP} abc123 {len(script)} 0\n".encode()
    done = subprocess.run(["sh", "-c", _steps_loop()], input=head + cut, capture_output=True,
                          timeout=60)
    assert f"{_STEP}-FAIL abc123".encode() in done.stdout and b"ran" not in done.stdout
    assert victim.is_dir()


def test_a_long_script_cut_short_is_never_run(tmp_path):
    """What RemoteShell.feed sends for a script past the argv limit, cut short, runs nothing."""
    import shlex
    import subprocess
    from types import SimpleNamespace
    from remote_runner import shell as shell_module
    sent = {}

    def run(command, stdin, timeout, check):
        sent.update(command=command, stdin=stdin)
        return SimpleNamespace(exit_status=0, stdout=b"", stderr=b"")
    victim = tmp_path / "keep"
    victim.mkdir()
    script = "#" * shell_module.ARGV_SCRIPT + f"\nrm -rf {victim}/sub; echo ran\n"
    shell_module.RemoteShell(SimpleNamespace(run=run), "h1").feed(script, b"", 60)
    whole = sent["stdin"]
    cut = whole[:whole.index(b"/sub")]
    done = subprocess.run(shlex.split(sent["command"]), input=cut,
                          capture_output=True, timeout=60)
    assert done.returncode == 125 and b"ran" not in done.stdout and victim.is_dir()
