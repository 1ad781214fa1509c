"""Which commands get a ``$TMPDIR`` of the host, and the directory made here for it (``mirror/tmpdir.py``)."""

from __future__ import annotations

import os
import time

from remote_runner.mirror import tmpdir
from remote_runner.mirror.exports import Exports


def test_only_a_tmpdir_of_the_users_own_is_a_choice():
    assert not tmpdir.user_chose({})
    assert not tmpdir.user_chose({"TMPDIR": ""})
    assert not tmpdir.user_chose({"TMPDIR": "/tmp/"})
    assert not tmpdir.user_chose({"TMPDIR": "/var/tmp"})
    assert tmpdir.user_chose({"TMPDIR": "/tmp/mine"})
    assert tmpdir.user_chose({"TMPDIR": "/scratch"})


def test_the_mount_point_is_made_empty_in_a_served_tmp_and_removed_after():
    exports = Exports.for_commands([(["true"], "/")])
    made = tmpdir.make_mount_point(exports, {})
    assert made is not None
    try:
        assert os.path.dirname(made) == b"/tmp" and os.path.basename(made).startswith(b"remote-runner-tmp-")
        assert os.listdir(made) == [] and oct(os.stat(made).st_mode & 0o777) == "0o700"
    finally:
        tmpdir.remove_mount_point(made)
    assert not os.path.exists(made)


def test_none_when_the_user_chose_one_or_tmp_is_not_served(tmp_path):
    assert tmpdir.make_mount_point(Exports.for_commands([(["true"], "/")]), {"TMPDIR": str(tmp_path)}) is None
    assert tmpdir.make_mount_point(Exports.only([os.fsencode(tmp_path)]), {}) is None


def test_something_put_in_it_here_is_never_removed(tmp_path, caplog):
    made = os.fsencode(tmp_path / "point")
    os.mkdir(made)
    open(os.path.join(made, b"kept"), "w").close()
    tmpdir.remove_mount_point(made)
    assert os.path.exists(os.path.join(made, b"kept"))
    assert "not empty" in caplog.text


def test_an_empty_directory_of_a_process_that_is_gone_is_removed(tmp_path):
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = tmp_path / f"{tmpdir.PREFIX}{gone.pid}-abc"
    mine = tmp_path / f"{tmpdir.PREFIX}{os.getpid()}-abc"
    kept = tmp_path / f"{tmpdir.PREFIX}{gone.pid}-full"
    for path in (orphan, mine, kept):
        path.mkdir()
    (kept / "something").write_text("x")
    tmpdir.remove_orphans(str(tmp_path))  # a day must pass: one in another pid namespace looks gone
    assert orphan.exists()
    tmpdir.remove_orphans(str(tmp_path), now=time.time() + tmpdir.ORPHAN_AGE + 1)
    assert not orphan.exists() and mine.exists() and (kept / "something").exists()
