"""What ``--private-tmp`` serves and what it tells the host to keep (unit tests; the lab ones are in
``test_mirror_scratch_lab.py``)."""

from __future__ import annotations

import os

import pytest

from remote_runner.mirror import protocol as P
from remote_runner.mirror.exports import Exports, Refused
from remote_runner.mirror.host.scratch import outermost
from remote_runner.mirror.session import private_tmp_field


@pytest.fixture
def under_tmp(tmp_path):
    real = os.path.realpath(tmp_path)
    if not real.startswith("/tmp/"):
        pytest.skip("pytest's tmp_path is not under /tmp here")
    return real


def test_scratch_trees_are_not_served_but_what_the_command_uses_in_them_is(under_tmp, monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    cwd = os.path.join(under_tmp, "work")
    data = os.path.join(under_tmp, "data")
    os.makedirs(cwd)
    os.makedirs(data)
    open(os.path.join(data, "in.txt"), "w").close()
    exports = Exports.for_commands([(["cat", os.path.join(data, "in.txt")], cwd)], private_tmp=True)
    with pytest.raises(Refused):
        exports.check(b"/tmp/elsewhere.txt", write=True)
    with pytest.raises(Refused):
        exports.check(b"/tmp/elsewhere.txt")
    assert exports.check(os.fsencode(os.path.join(cwd, "out.txt")), write=True) is not None
    # /tmp and /var/tmp can still be looked up: the host mounts its own there.
    assert exports.is_ancestor(b"/tmp") and exports.is_ancestor(b"/var")
    trees = exports.private_scratch()
    assert trees[b"/tmp"] == sorted([os.fsencode(cwd), os.fsencode(data)])
    assert trees.get(b"/var/tmp", []) == []
    # Without the option the trees are served as before, and nothing is private.
    shared = Exports.for_commands([(["true"], cwd)])
    assert shared.check(b"/tmp/elsewhere.txt", write=True) is not None
    assert b"/tmp" not in shared.private_scratch()


def test_a_command_naming_a_file_directly_in_tmp_keeps_tmp_shared(under_tmp):
    exports = Exports.for_commands([(["cc", "-o", "/tmp/prog-out", "main.c"], under_tmp)], private_tmp=True)
    assert exports.check(b"/tmp/prog-out", write=True) is not None
    assert b"/tmp" not in exports.private_scratch()
    # --export / alone does not name /tmp: it stays private.
    everything = Exports.for_commands([(["true"], under_tmp)], ["/"], private_tmp=True)
    assert b"/tmp" in everything.private_scratch()


def test_the_boot_field_names_the_trees_the_kept_paths_and_tmpdir(under_tmp, monkeypatch):
    tmpdir = os.path.join(under_tmp, "my tmp")
    os.makedirs(tmpdir)
    monkeypatch.setenv("TMPDIR", tmpdir)
    cwd = os.path.join(under_tmp, "work")
    os.makedirs(cwd)
    exports = Exports.for_commands([(["true"], cwd)], private_tmp=True)
    # $TMPDIR in a private tree is not served: the host makes its own, empty.
    with pytest.raises(Refused):
        exports.check(os.fsencode(os.path.join(tmpdir, "x")))
    field = private_tmp_field(exports)
    assert field["tmpdir"] == P.name_to_wire(os.fsencode(tmpdir))
    assert field["trees"][P.name_to_wire(b"/tmp")] == [P.name_to_wire(os.fsencode(cwd))]
    monkeypatch.setenv("TMPDIR", "/srv/elsewhere")
    assert "tmpdir" not in private_tmp_field(exports)


def test_outermost_drops_paths_inside_others():
    assert outermost(["/tmp/a/b", "/tmp/a", "/tmp/ab", "/tmp/c/d", "/tmp/a"]) == ["/tmp/a", "/tmp/ab", "/tmp/c/d"]


def test_a_host_refusing_a_tmpfs_is_named_and_what_was_staged_is_unmounted(tmp_path, monkeypatch):
    import errno

    from remote_runner.mirror.host import scratch

    root, stage = tmp_path / "root", tmp_path / "stage"
    for tree in ("tmp", "var/tmp"):
        (root / tree).mkdir(parents=True)
    stage.mkdir()
    mounted, unmounted = [], []

    def fake_mount(source, target, fstype, flags, data=None):
        if mounted:  # the second tree's tmpfs is refused
            raise OSError(errno.EPERM, "mount")
        mounted.append(target)

    monkeypatch.setattr(scratch, "mount", fake_mount)
    monkeypatch.setattr(scratch, "umount", lambda target, flags=2: unmounted.append(target))
    with pytest.raises(OSError) as info:
        scratch.make_private(str(root), {"/tmp": [], "/var/tmp": []}, str(stage))
    assert "/var/tmp" in str(info.value) and "--private-tmp" in str(info.value)
    assert info.value.errno == errno.EPERM
    assert unmounted == mounted == [os.fsencode(str(stage / "scratch-0"))]
