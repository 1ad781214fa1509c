"""``exec --private-tmp`` on lab hosts: the command's own /tmp and /var/tmp, the local paths in them kept.

Real sshd, real FUSE, a real tmpfs in the agent's mount namespace: what the
command writes to its scratch trees reaches neither this machine's disk nor
the host's, while the cwd and the paths it names under /tmp stay this
machine's.
"""

from __future__ import annotations

import os
import shlex
import uuid

import pytest

from tests.conftest import ssh
from tests.test_mirror_lab import rr_exec
from tests.test_runner import env, experiment, options, run  # noqa: F401 (env is a fixture)

pytestmark = pytest.mark.lab


@pytest.fixture
def workdir(tmp_path):
    """A cwd under this machine's /tmp (pytest's tmp_path), so it must be kept."""
    path = tmp_path / "work"
    path.mkdir()
    assert str(path).startswith("/tmp/")
    return path


def test_scratch_is_private_and_the_cwd_under_tmp_stays_local(lab, workdir, tmp_path):
    tag = uuid.uuid4().hex[:10]
    marker = tmp_path / f"local-marker-{tag}"  # in /tmp here, not named by the command
    marker.write_text("local\n")
    var_marker = f"/var/tmp/rr-local-marker-{tag}"
    open(var_marker, "w").close()
    (workdir / "in.txt").write_text("input\n")
    script = (f"test -e {shlex.quote(str(marker))} && echo sees-local-tmp || echo private; "
              f"test -e {var_marker} && echo sees-local-var-tmp || echo private; "
              f"echo scratch > /tmp/scratch-{tag}; echo v > /var/tmp/var-{tag}; "
              f"cat /tmp/scratch-{tag} /var/tmp/var-{tag}; stat -c %a /tmp /var/tmp; "
              "tr a-z A-Z < in.txt > out.txt")
    try:
        proc = rr_exec(lab, "h1", ["sh", "-c", script], workdir, "--private-tmp")
    finally:
        os.unlink(var_marker)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["private", "private", "scratch", "v", "1777", "1777"]
    # The cwd under /tmp was this machine's all along.
    assert (workdir / "out.txt").read_text() == "INPUT\n"
    # The scratch files reached neither this machine nor the host's own disk.
    assert not os.path.exists(f"/tmp/scratch-{tag}") and not os.path.exists(f"/var/tmp/var-{tag}")
    on_host = ssh(lab, "h1", f"ls -d /tmp/scratch-{tag} /var/tmp/var-{tag} 2>/dev/null; true")
    assert on_host.stdout.strip() == ""
    # Without the option the same scratch file lands here.
    proc = rr_exec(lab, "h1", ["sh", "-c", f"echo shared > /tmp/scratch-{tag}"], workdir)
    try:
        assert proc.returncode == 0, proc.stderr.decode()
        assert open(f"/tmp/scratch-{tag}").read() == "shared\n"
    finally:
        if os.path.exists(f"/tmp/scratch-{tag}"):
            os.unlink(f"/tmp/scratch-{tag}")


def test_named_paths_under_tmp_are_kept_and_naming_tmp_keeps_it_shared(lab, workdir, tmp_path):
    tag = uuid.uuid4().hex[:10]
    data = tmp_path / f"data-{tag}"
    data.mkdir()
    (data / "in.txt").write_text("named\n")
    link = tmp_path / f"link-{tag}"
    link.symlink_to(data)
    proc = rr_exec(lab, "h1", ["sh", "-c", 'cat "$1/in.txt" && readlink "$2" && echo w > "$1/new.txt"',
                               "sh", str(data), str(link)], workdir, "--private-tmp")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["named", str(data)]
    assert (data / "new.txt").read_text() == "w\n"
    # An output named directly in /tmp: the tree stays this machine's, nothing is lost.
    out = f"/tmp/rr-out-{tag}"
    try:
        proc = rr_exec(lab, "h1", ["sh", "-c", 'echo result > "$1"', "sh", out], workdir, "--private-tmp")
        assert proc.returncode == 0, proc.stderr.decode()
        assert open(out).read() == "result\n"
    finally:
        if os.path.exists(out):
            os.unlink(out)


def test_tmpdir_in_a_private_tree_is_made_for_the_command(lab, workdir):
    tag = uuid.uuid4().hex[:10]
    tmpdir = f"/tmp/rr-tmpdir-{tag}/inner"
    os.makedirs(tmpdir)
    (open(os.path.join(tmpdir, "local-only"), "w")).close()
    try:
        proc = rr_exec(lab, "h1", ["sh", "-c", 'ls -A "$TMPDIR"; stat -c %a "$TMPDIR"; mktemp'],
                       workdir, "--private-tmp", env={"TMPDIR": tmpdir})
        assert proc.returncode == 0, proc.stderr.decode()
        listed_mode, made = proc.stdout.decode().split()
        assert listed_mode == "700"  # empty (no local-only), the command's own
        assert made.startswith(tmpdir + "/") and not os.path.exists(made)
    finally:
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.removedirs(tmpdir)


def test_private_tmp_as_an_unprivileged_user_and_with_files_only(lab, workdir):
    tag = uuid.uuid4().hex[:10]
    script = f"id -u; echo s > /tmp/u-{tag}; cat /tmp/u-{tag}; echo kept > kept.txt"
    proc = rr_exec(lab, "h1", ["sh", "-c", script], workdir, "--private-tmp", user="rrtest")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == [str(os.getuid()), "s"]
    assert (workdir / "kept.txt").read_text() == "kept\n"
    assert not os.path.exists(f"/tmp/u-{tag}")
    # --files-only: the host's own programs, its /tmp private too, the cwd still mounted.
    work_dirs = "ls -d /tmp/rr-mirror-* 2>/dev/null; true"  # the agent's own, under the covered /tmp
    before = ssh(lab, "h2", work_dirs).stdout
    ssh(lab, "h2", f"touch /tmp/host-marker-{tag}")
    try:
        proc = rr_exec(lab, "h2", ["sh", "-c", f"echo f > /tmp/f-{tag}; cat /tmp/f-{tag}; "
                                                f"test -e /tmp/host-marker-{tag} && echo host || echo private; "
                                                "cat kept.txt"],
                       workdir, "--files-only", "--private-tmp")
    finally:
        ssh(lab, "h2", f"rm -f /tmp/host-marker-{tag}")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["f", "private", "kept"]
    assert ssh(lab, "h2", f"ls -d /tmp/f-{tag} 2>/dev/null; true").stdout.strip() == ""
    assert ssh(lab, "h2", work_dirs).stdout == before


def test_mirrored_components_of_a_host_share_one_private_tmp(lab, env, tmp_path):
    """``private_tmp = True`` in an experiment: the components' scratch is the host's, shared by them."""
    tag = uuid.uuid4().hex[:10]
    out = tmp_path / f"out-{tag}"
    out.mkdir()
    marker = f"/tmp/rr-local-marker-{tag}"  # this machine's /tmp, in no served path
    open(marker, "w").close()
    scripts = [f"echo from-a > /tmp/handoff-{tag}",
               f"cat /tmp/handoff-{tag} > {out}/seen.txt; "
               f"test -e {marker} && echo sees-local >> {out}/seen.txt || echo private >> {out}/seen.txt"]
    try:
        report = run_mirrored_pair(env, tmp_path, scripts, out, private_tmp=True)
    finally:
        os.unlink(marker)
    assert [report.components[("h2", f"c{i}")].status for i in (0, 1)] == [0, 0]
    # c1 saw c0's scratch file and not this machine's /tmp.
    assert (out / "seen.txt").read_text().split() == ["from-a", "private"]
    assert not os.path.exists(f"/tmp/handoff-{tag}")
    assert ssh(lab, "h2", f"ls -d /tmp/handoff-{tag} 2>/dev/null; true").stdout.strip() == ""


def run_mirrored_pair(test_env, tmp_path, scripts, out, private_tmp: bool = False):
    """Run *scripts* (``sh -c``) as mirrored components c0 then c1 of h2, each waited for and with
    *out* exported; return the run's report (*test_env*: the ``env`` fixture's options)."""
    exp = experiment(tmp_path, f"""
        for i, script in enumerate({list(scripts)!r}):
            c = Component()
            c.name = 'c%d' % i
            c.host = 'h2'
            c.executable = '/bin/sh'
            c.args = ['-c', script]
            c.mirror = True
            {"c.private_tmp = True" if private_tmp else ""}
            c.export = ['{out}']
            c.wait = True
            c.start_index = i
            config.add_component(c)
    """)
    return run(exp, options(test_env), test_env["ssh"])
