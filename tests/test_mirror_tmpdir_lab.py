"""The command's ``$TMPDIR`` is the host's (``mirror/tmpdir.py``), on lab hosts.

Real sshd, real FUSE, a real bind mount in the agent's namespace: files a
program makes in ``$TMPDIR`` (``mktemp``) reach neither this machine nor stay
on the host, a path the command names in ``/tmp`` is still written here, and
a ``$TMPDIR`` the user chose, or ``--local-tmpdir``, is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import quit_screen, ssh
from tests.test_mirror_lab import rr_exec
from tests.test_mirror_scratch_lab import run_mirrored_pair
from tests.test_runner import env  # noqa: F401 (a fixture)

pytestmark = pytest.mark.lab

#: The agent's own directories on a host (its workdir holds the host's $TMPDIR).
AGENT_DIRS = "ls -d /tmp/rr-mirror-* 2>/dev/null; true"


def mount_points() -> set:
    """This machine's directories the hosts mount a $TMPDIR over (none once every mirror ended)."""
    return {name for name in os.listdir("/tmp") if name.startswith("remote-runner-tmp-")}


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_tmpdir_is_the_hosts_and_a_path_named_in_tmp_stays_this_machines(lab, workdir):
    tag = uuid.uuid4().hex[:10]
    named = f"/tmp/rr-named-{tag}"
    before, agent_dirs = mount_points(), ssh(lab, "h1", AGENT_DIRS).stdout
    script = ('echo "$TMPDIR"; f=$(mktemp); echo scratch > "$f"; echo "$f"; cat "$f"; '
              'stat -c %a "$TMPDIR"; ls -A "$TMPDIR" | wc -l; echo result > "$1"; '
              'python3 -c "import tempfile; print(tempfile.gettempdir())"')
    try:
        proc = rr_exec(lab, "h1", ["sh", "-c", script, "sh", named], workdir)
        assert proc.returncode == 0, proc.stderr.decode()
        tmpdir, made, content, mode, count, python_sees = proc.stdout.decode().split()
        assert tmpdir.startswith("/tmp/remote-runner-tmp-") and os.path.dirname(made) == tmpdir
        assert (content, mode, count, python_sees) == ("scratch", "700", "1", tmpdir)
        # Named in /tmp: written here, at once, as before.
        assert open(named).read() == "result\n"
    finally:
        if os.path.exists(named):
            os.unlink(named)
    # The scratch file never reached this machine, and nothing is left of it on either side.
    assert not os.path.exists(made) and not os.path.exists(tmpdir)
    assert mount_points() == before
    assert ssh(lab, "h1", AGENT_DIRS).stdout == agent_dirs


def test_a_tmpdir_the_user_chose_and_local_tmpdir_are_left_alone(lab, workdir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    proc = rr_exec(lab, "h1", ["sh", "-c", 'echo "$TMPDIR"; mktemp'], workdir, env={"TMPDIR": str(mine)})
    assert proc.returncode == 0, proc.stderr.decode()
    tmpdir, made = proc.stdout.decode().split()
    assert tmpdir == str(mine) and os.path.dirname(made) == str(mine) and os.path.isfile(made)
    # $TMPDIR=/tmp is the default place, not a choice: the host's is given.
    proc = rr_exec(lab, "h1", ["sh", "-c", 'echo "$TMPDIR"'], workdir, env={"TMPDIR": "/tmp/"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip().startswith("/tmp/remote-runner-tmp-")
    # --local-tmpdir: $TMPDIR stays unset, mktemp writes this machine's /tmp.
    environ = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    proc = rr_exec(lab, "h1", ["sh", "-c", 'echo "TMPDIR=$TMPDIR"; mktemp'], workdir, "--local-tmpdir",
                   env=environ)
    assert proc.returncode == 0, proc.stderr.decode()
    shown, made = proc.stdout.decode().split()
    try:
        assert shown == "TMPDIR=" and os.path.dirname(made) == "/tmp" and os.path.isfile(made)
    finally:
        if os.path.isfile(made):
            os.unlink(made)


def test_an_unprivileged_command_owns_it_and_files_only_keeps_the_hosts_own(lab, workdir):
    before = mount_points()
    # As a user of the host (a user namespace): the command's ids own it; a tree it
    # left unwritable is removed all the same.
    agent_dirs = ssh(lab, "h1", AGENT_DIRS).stdout
    script = ('stat -c %u "$TMPDIR"; id -u; mkdir -p "$TMPDIR/a/b"; touch "$TMPDIR/a/b/f"; '
              'chmod 500 "$TMPDIR/a/b"; chmod 0 "$TMPDIR/a"; echo kept > kept.txt')
    proc = rr_exec(lab, "h1", ["sh", "-c", script], workdir, user="rrtest")
    assert proc.returncode == 0, proc.stderr.decode()
    owner, uid = proc.stdout.decode().split()
    assert owner == uid
    assert (workdir / "kept.txt").read_text() == "kept\n"
    assert ssh(lab, "h1", AGENT_DIRS).stdout == agent_dirs
    # --files-only: the host's own programs and its own /tmp (not served): $TMPDIR is left alone.
    proc = rr_exec(lab, "h2", ["sh", "-c", 'echo "TMPDIR=$TMPDIR"; mktemp'], workdir, "--files-only",
                   env={k: v for k, v in os.environ.items() if k != "TMPDIR"})
    assert proc.returncode == 0, proc.stderr.decode()
    shown, made = proc.stdout.decode().split()
    try:
        assert shown == "TMPDIR=" and os.path.dirname(made) == "/tmp" and not os.path.exists(made)
        assert ssh(lab, "h2", f"ls {made}").stdout.strip() == made
    finally:
        ssh(lab, "h2", f"rm -f {made}")
    assert mount_points() == before


def test_mirrored_components_of_a_host_share_its_tmpdir(lab, env, tmp_path):
    tag = uuid.uuid4().hex[:10]
    out = tmp_path / f"out-{tag}"
    out.mkdir()
    before = mount_points()
    scripts = ['echo from-a > "$TMPDIR/handoff"',
               f'cat "$TMPDIR/handoff" > {out}/seen.txt; echo "$TMPDIR" >> {out}/seen.txt']
    report = run_mirrored_pair(env, tmp_path, scripts, out)
    assert [report.components[("h2", f"c{i}")].status for i in (0, 1)] == [0, 0]
    seen, tmpdir = (out / "seen.txt").read_text().split()
    assert seen == "from-a" and tmpdir.startswith("/tmp/remote-runner-tmp-")
    assert not os.path.exists(os.path.join(tmpdir, "handoff"))
    assert mount_points() == before


def test_a_run_serving_mirrored_components_ended_by_sigterm_unwinds(lab, screen_name, tmp_path):
    """``kill`` of a run that serves a mirrored component: it ends as Ctrl-C ends it (exit 143),
    the component's process on the host ends with its mirror, and the empty directory made
    here for the host's $TMPDIR is removed (Python's default for SIGTERM left all of it)."""
    nap = f"600.{uuid.uuid4().int % 10**9}"  # (names the component's process on the host)
    config = tmp_path / "experiment.py"
    config.write_text(f"c = Component()\nc.name = 'sleeper'\nc.host = 'h2'\nc.executable = '/bin/sleep'\n"
                      f"c.args = ['{nap}']\nc.mirror = True\nc.start_index = 1\nconfig.add_component(c)\n")
    run_env = {**os.environ, "REMOTE_RUNNER_STANDBY": "0", "REMOTE_RUNNER_RUNS": str(tmp_path / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "run", "-c", str(config), "-F",
                             lab.ssh_config, "--screen", screen_name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env)
    running = lambda: ssh(lab, "h2", f"pgrep -f 'sleep {nap}'", check=False).returncode == 0  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while not running() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        assert running(), proc.communicate(timeout=60)
        made = {m for m in mount_points() if m.startswith(f"remote-runner-tmp-{proc.pid}-")}
        assert made  # the run serves the component's mirror, with its $TMPDIR
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == "ERROR: terminated (SIGTERM)", err
        assert not made & mount_points()
        deadline = time.monotonic() + 60
        while running() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not running()  # stopped with its mirror, not left to find its link gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        quit_screen(lab, "h2", screen_name)
