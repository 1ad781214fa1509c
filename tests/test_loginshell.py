"""What a login gives us, whatever it is: commands reach /bin/sh unchanged whatever the login
shell (csh, tcsh, fish, zsh...), banners its rc files print are not taken for output, a home that
cannot be written is said so (runs) or done without (exec)."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import textwrap

import pytest

from remote_runner.loginshell import ARG_MAX, MARK_SEARCH, WORD, OutputAfterMark, for_login_shell, portable, with_mark
from tests.conftest import experiment, ssh
from tests.test_classic_cli import cli
from tests.test_mirror_lab import rr_exec

SHELLS = ["sh", "bash", "zsh", "csh", "tcsh", "fish"]
#: What sshd would hand a login shell: a multi-line script with a history mark, a
#: backslash, quotes of both kinds, arithmetic, stdin read, and an exit status of its own.
SCRIPT = textwrap.dedent("""\
    x="a b"; echo "$x" 'q' "it's" $((1+2)) $#
    if ! false; then echo "bang!"; fi
    printf '%s\\n' "back\\\\slash" ~nobody-such
    cat
    exit 7
""")


def through(shell: str, command: str) -> subprocess.CompletedProcess:
    """Run *command* the way sshd does: ``SHELL -c COMMAND``, with some stdin."""
    return subprocess.run([shell, "-c", command], input=b"stdin data\n", capture_output=True, timeout=60)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("size", ["small", "over csh's word limit"])
def test_every_login_shell_runs_the_script_as_sh_would(shell, size):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (scripts/setup.sh installs it)")
    script = SCRIPT if size == "small" else SCRIPT.replace("cat\n", "cat\necho " + "y" * 3 * WORD + " | wc -c\n")
    expected = through("sh", script)
    assert expected.returncode == 7 and b"bang!" in expected.stdout and b"stdin data" in expected.stdout
    got = through(shell, for_login_shell(script))
    assert (got.stdout, got.returncode) == (expected.stdout, expected.returncode), got.stderr
    if shell in ("csh", "tcsh"):  # what the wrapping is for: the script as it is goes wrong there
        assert through(shell, script).stdout != expected.stdout


def test_plain_commands_go_as_they_are_and_others_are_encoded():
    kept = ["screen -r 123.runner -p srv", shlex.join(["sh", "-c", 'echo "$HOME" $(id -u) | cat']),
            shlex.join(["echo", "it's", "a b"]), "cmd --opt=1 a=b", ""]
    for command in kept:
        assert portable(command) and for_login_shell(command) == command, command
    changed = ["sh -c 'a\nb'", "echo !x", "sh -c 'echo !'", "sh -c 'a\\b'", "a=1 cmd", " a=1",
               "x 2>&1", "echo $HOME", "ls *", "=ls", "echo 'open", 'echo "$x"', "a\tb"]
    for command in changed:
        assert not portable(command), command
        wrapped = for_login_shell(command)
        assert wrapped != command and portable(wrapped), command


def test_a_command_too_long_once_encoded_goes_as_it_is():
    big = "echo '" + "x" * (ARG_MAX - 100) + "\n'"
    assert not portable(big) and for_login_shell(big) == big
    assert len(for_login_shell(big[: ARG_MAX // 2])) < ARG_MAX


def reader(*chunks: bytes):
    """A channel's recv giving *chunks* one by one, then the end."""
    left = list(chunks)

    def recv(size: int) -> bytes:
        if not left:
            return b""
        chunk = left.pop(0)
        if len(chunk) > size:
            left.insert(0, chunk[size:])
        return chunk[:size]
    return recv


def read_all(recv, size: int = 65536) -> list:
    got = []
    while True:
        data = recv(size)
        if not data:
            return got
        assert len(data) <= size
        got.append(data)


def test_what_the_login_shell_printed_before_the_mark_is_dropped():
    command, mark, on_stderr = with_mark("cat file")
    assert command == f"echo {mark.decode().strip()}; cat file" and portable(command) and on_stderr is None
    assert with_mark("x")[1] != mark  # one of its own per command
    script, mark, on_stderr = with_mark("cat file\nexit 3")  # sent encoded: /bin/sh marks stderr too
    assert on_stderr == mark and script.startswith(f"echo {mark.decode().strip()} >&2; ", len(mark) + 6)
    banner = b"Welcome to the cluster\nmodule loaded\n"
    # split anywhere, even inside the mark; then binary output of any size
    for cut in (1, 5, len(banner) + 3, len(banner) + len(mark)):
        stream = banner + mark + b"\x00frame" * 3
        got = read_all(OutputAfterMark(reader(stream[:cut], stream[cut:], b"more"), mark), size=4)
        assert b"".join(got) == b"\x00frame" * 3 + b"more", cut
    assert read_all(OutputAfterMark(reader(banner + mark, b"", b"late"), mark)) == []  # the end is the end
    assert read_all(OutputAfterMark(reader(banner + mark, b"after"), mark)) == [b"after"]


def test_output_is_ready_only_once_the_commands_own_is_there():
    mark = with_mark("x")[1]
    chunks = [b"module loaded\n" + mark, b"error: disk full\n"]
    buffered = lambda: bool(chunks)  # noqa: E731 - what the channel holds, banner and mark included
    recv = OutputAfterMark(lambda size: chunks.pop(0), mark)
    waiting = chunks.pop()  # only the banner and the mark have arrived
    assert not recv.ready(buffered) and not chunks
    chunks.append(waiting)
    assert recv.ready(buffered) and recv(100) == b"error: disk full\n" and not recv.ready(buffered)


def test_without_a_mark_everything_is_the_commands_output():
    mark = with_mark("x")[1]
    # the command never started: the login shell's words are its error
    assert b"".join(read_all(OutputAfterMark(reader(b"tcsh: Unmatched '.\n"), mark))) == b"tcsh: Unmatched '.\n"
    flood = [b"y" * 65536] * (MARK_SEARCH // 65536 + 2)
    assert b"".join(read_all(OutputAfterMark(reader(*flood), mark))) == b"".join(flood)


#: Login shells of the lab users below, and the rc file each reads for every command.
LOGINS = {"tcsh": ("/usr/bin/tcsh", ".cshrc"), "bash": ("/bin/bash", ".bashrc")}


@pytest.fixture(params=sorted(LOGINS))
def login_user(lab, request):
    """A user on h2 with that login shell, whose rc file prints a banner to stdout and stderr
    for every command, as cluster rc files do (made in the host's own /etc, removed after)."""
    name = "rr" + request.param
    shell, rc = LOGINS[request.param]
    # ('*': no password, and not locked as useradd's default '!' is: sshd refuses those)
    ssh(lab, "h2", f"userdel -r {name} >/dev/null 2>&1; useradd -m -p '*' -s {shell} {name} && "
                   f"printf 'echo Welcome to the cluster\\necho module loaded >/dev/stderr\\n' "
                   f"> /home/{name}/{rc}")
    said = ssh(lab, "h2", "echo hi", user=name)
    assert said.stdout == "Welcome to the cluster\nhi\n" and "module loaded" in said.stderr, said
    yield name
    ssh(lab, "h2", f"pkill -KILL -u {name}; sleep 0.2; userdel -r {name}", check=False)


@pytest.mark.lab
def test_a_run_and_an_exec_work_whatever_the_login_shell_and_its_banners(lab, login_user, tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    # Past the bundles' size: streamed as it is, and packed. Their senders watch stderr for
    # the receiver's failure, and the banner arrives after the first MiB or so.
    (tmp_path / "big.bin").write_bytes(os.urandom(32 << 20))
    (tmp_path / "big.log").write_bytes(b"a line of a log that packs well\n" * (1 << 20))
    config = experiment(tmp_path, {
        "name": "reader", "host": "h2", "executable": "/bin/sh",
        "args": ["-c", 'cat data.txt && echo "in $(basename $PWD) as $(id -un)!"'],
        "base_dir": f"/home/{login_user}/work", "wait": True,
        "files": {str(tmp_path / name): name for name in ("data.txt", "big.bin", "big.log")}})
    run = cli("-c", config, "-F", lab.ssh_config, "-u", login_user, "--screen", "login")
    assert run.returncode == 0, run.stderr
    assert "INFO: h2: reader exited with status 0" in run.stderr
    # the recap's attach hint logs in as the run did (-u wins over the ssh_config's User)
    hint = next(line for line in run.stdout.splitlines() if line.startswith("h2 ")).split("ssh -t ", 1)[1]
    argv = shlex.split(hint)
    assert argv[:5] == ["-F", lab.ssh_config, "-l", login_user, "h2"] and argv[5:7] == ["screen", "-r"]
    listed = subprocess.run(["ssh", "-o", "BatchMode=yes", *argv[:5], "screen", "-ls"], capture_output=True,
                            text=True, timeout=60)
    assert argv[7] in listed.stdout, listed
    sums = ssh(lab, "h2", f"cd /home/{login_user}/work && sha1sum big.bin big.log").stdout.split()[::2]
    assert sums == [hashlib.sha1((tmp_path / name).read_bytes()).hexdigest() for name in ("big.bin", "big.log")]
    log = ssh(lab, "h2", f"cat /home/{login_user}/.remote-runner/login/latest/reader.log").stdout
    assert "hello" in log and f"in work as {login_user}!" in log, log
    exec_ = rr_exec(lab, "h2", ["/bin/sh", "-c", "cat data.txt; echo done!"], tmp_path, user=login_user)
    assert exec_.returncode == 0, exec_.stderr.decode()
    assert exec_.stdout == b"hello\ndone!\n"


@pytest.mark.lab
def test_a_home_that_cannot_be_written_is_named_for_a_run_and_done_without_by_exec(lab, tmp_path):
    name = "rrnohome"
    ssh(lab, "h2", f"userdel {name} >/dev/null 2>&1; useradd -p '*' -d /nonexistent/{name} -s /bin/bash {name}")
    try:
        config = experiment(tmp_path, {"name": "job", "host": "h2", "executable": "/bin/true",
                                       "base_dir": "/tmp/rrnohome-work", "wait": True})
        argv = ["-c", config, "-F", lab.ssh_config, "-u", name, "--screen", "nohome"]
        run = cli(*argv)
        assert run.returncode == 6, run.stderr
        assert ("cannot create the state directory ~/.remote-runner/nohome (mkdir: cannot create directory "
                "'/nonexistent': Permission denied)") in run.stderr and "--remote-done-dir" in run.stderr
        run = cli(*argv, "--remote-done-dir", "/tmp/rrnohome-state")
        assert run.returncode == 0 and "INFO: h2: job exited with status 0" in run.stderr, run.stderr
        ssh(lab, "h2", "rm -rf /tmp/remote-runner-agent-*")
        exec_ = rr_exec(lab, "h2", ["/bin/echo", "works"], tmp_path, user=name)
        assert exec_.returncode == 0 and exec_.stdout == b"works\n", exec_.stderr.decode()
        assert b"for this run only" in exec_.stderr  # where the agent went instead, said once
        assert ssh(lab, "h2", "ls -d /tmp/remote-runner-agent-* 2>/dev/null || true").stdout == ""  # and removed
    finally:
        ssh(lab, "h2", f"pkill -KILL -u {name}; sleep 0.2; userdel {name}; rm -rf /tmp/rrnohome-*", check=False)



@pytest.mark.lab
def test_a_base_dir_the_login_user_cannot_make_is_named_with_its_component(lab, tmp_path):
    config = experiment(tmp_path, *({"name": name, "host": "h2", "executable": "/bin/true", "base_dir": base}
                                     for name, base in (("fine", "/tmp/rr-fine-base"),
                                                        ("denied", "/usr/share/rr-denied/base"))))
    run = cli("-c", config, "-F", lab.ssh_config, "-u", "rrtest", "--screen", "basedir")
    try:
        assert run.returncode == 6, run.stderr
        assert ("host h2: could not create base directory /usr/share/rr-denied/base of denied: mkdir: cannot "
                "create directory '/usr/share/rr-denied': Permission denied") in run.stderr, run.stderr
        assert "STATE " not in run.stderr
    finally:
        ssh(lab, "h2", "rm -rf /tmp/rr-fine-base ~/.remote-runner/basedir", check=False, user="rrtest")
