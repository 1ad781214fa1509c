"""The host is not trusted: what the mirror runs and serves is checked on this side.

Lab tests alter what a host keeps (the cached agent) and check that the local
side notices, says so and repairs it rather than running it.
"""

from __future__ import annotations

import glob
import hashlib
import shutil
import subprocess
import sys

import pytest

from remote_runner.mirror import tmpdir
from remote_runner.mirror.bundle import BOOT, CACHE_DIR, build_bundle
from tests.conftest import ssh
from tests.test_mirror_lab import rr_exec, workdir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.lab


def _remote_sha256(lab, host, path):
    return ssh(lab, host, f'sha256sum "{path}"').stdout.split()[0]


def test_an_altered_cached_agent_is_replaced_not_run(lab, workdir):
    bundle = build_bundle()
    cached = f"$HOME/{CACHE_DIR}/{bundle.filename}"
    assert rr_exec(lab, "h3", ["true"], workdir).returncode == 0  # cached now
    marker = "/tmp/rr-agent-was-patched"
    ssh(lab, "h3", f"rm -f {marker}; printf 'import os\\nopen(\"{marker}\", \"w\")\\n' > /tmp/p.py "
                   f"&& cd /tmp && cp \"{cached}\" x.pyz && python3 -c \"import zipfile; "
                   f"z = zipfile.ZipFile('x.pyz', 'a'); z.write('p.py', '__main__.py'); z.close()\" "
                   f"&& cp x.pyz \"{cached}\" && rm x.pyz p.py")
    assert _remote_sha256(lab, "h3", cached) != bundle.sha256
    result = rr_exec(lab, "h3", ["true"], workdir)
    assert result.returncode == 0, result.stderr.decode()
    assert b"was altered" in result.stderr and b"replacing it" in result.stderr
    assert ssh(lab, "h3", f"test -e {marker}", check=False).returncode == 1  # never ran
    assert _remote_sha256(lab, "h3", cached) == bundle.sha256


def _compiled_agents(lab, host, bundle):
    """(name, sha256 of its bytes) of each compiled copy of *bundle*'s agent on *host*."""
    stem = bundle.filename[:-4]
    out = ssh(lab, host, f'cd "$HOME/{CACHE_DIR}" && for f in {stem}.*.pyz; do '
                         '[ -e "$f" ] && echo "$f $(sha256sum < "$f" | cut -c1-16)"; done',
              check=False).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("host", ["h3", "h9"])
def test_the_agent_runs_compiled_by_the_hosts_python_and_a_damaged_copy_is_rebuilt(
        lab, workdir, host, request):
    """Bytecode the host compiled is kept beside the agent, and used only while intact."""
    if host == "h9":
        host = request.getfixturevalue("foreign_host")  # (up even when this test runs alone)
    bundle = build_bundle()
    assert rr_exec(lab, host, ["true"], workdir).returncode == 0
    compiled = _compiled_agents(lab, host, bundle)
    tag = ssh(lab, host, "python3 -c 'import sys; print(sys.implementation.cache_tag)'").stdout
    assert len(compiled) == 1 and f".{tag.strip()}." in compiled[0][0], compiled
    name, digest = compiled[0]
    assert name.endswith(f".{digest}.pyz")  # its bytes hash to its name
    listing = ssh(lab, host, f'python3 -c "import zipfile,sys; print(sorted(zipfile.ZipFile(sys.argv[1])'
                             f'.namelist()))" "$HOME/{CACHE_DIR}/{name}"').stdout
    assert "rrmirror/agent.pyc" in listing and ".py'" not in listing  # bytecode only
    # damaged (cut short): not run, removed and built again; the command still runs
    ssh(lab, host, f'truncate -s 1000 "$HOME/{CACHE_DIR}/{name}"')
    result = rr_exec(lab, host, ["sh", "-c", "echo still here"], workdir)
    assert result.returncode == 0 and result.stdout == b"still here\n", result.stderr.decode()
    # one intact copy again (its bytes may differ: marshal output depends on hash seeds)
    again = _compiled_agents(lab, host, bundle)
    assert len(again) == 1 and again[0][0].endswith(f".{again[0][1]}.pyz"), again


def test_the_boot_program_refuses_a_missing_or_altered_agent_without_fetch(tmp_path):
    bundle = build_bundle()
    path = tmp_path / bundle.filename
    missing = subprocess.run(bundle.run_argv(sys.executable, str(path), "attach"),
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "is missing" in missing.stderr
    path.write_bytes(bundle.data + b"x")
    altered = subprocess.run(bundle.run_argv(sys.executable, str(path), "attach"),
                             capture_output=True, text=True)
    assert altered.returncode == 1 and "is altered" in altered.stderr
    assert hashlib.sha256(bundle.data).hexdigest() == bundle.sha256 and BOOT in bundle.run_argv("p", "x")


def test_a_readable_file_in_a_private_directory_is_never_kept_on_a_host(lab, workdir):
    import os
    import shutil
    import uuid
    from pathlib import Path

    from remote_runner.lab import LOCAL_ONLY
    from remote_runner.mirror.service import LocalFileService
    from tests.test_mirror_cache import HOST, host_copies, settle, whole_open

    private = Path(LOCAL_ONLY) / f"private-{uuid.uuid4().hex[:8]}"
    (private / "inner").mkdir(parents=True)
    private.chmod(0o700)
    data = private / "inner" / "notes.txt"
    data.write_text("only for me\n")
    settle(data)  # 0644 itself, settled: only the 0700 directory above makes it private
    try:
        assert "whole" not in whole_open(LocalFileService(), data)[0]
        result = rr_exec(lab, HOST, ["/bin/cat", str(data)], workdir)
        assert result.returncode == 0 and result.stdout == b"only for me\n"
        assert host_copies(lab, data) == []
        private.chmod(0o755)  # reachable by everyone now: it may be kept
        assert "whole" in whole_open(LocalFileService(), data)[0]
        assert os.access(data, os.R_OK)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_a_tree_exported_by_name_below_a_private_directory_is_kept_but_not_what_is_private_in_it(
        lab, workdir):
    """Above a tree the user exported (or a program's own prefix) privacy is the user's choice.

    A Python built in a 0700 home is read through the link at every run unless
    its files may stay on the host; a private directory inside the tree, and
    the same file reached without the export, still may not.
    """
    import shutil
    import uuid
    from pathlib import Path

    from remote_runner.lab import LOCAL_ONLY
    from remote_runner.mirror.exports import Exports
    from remote_runner.mirror.service import LocalFileService
    from tests.test_mirror_cache import HOST, host_copies, settle, whole_open

    home = Path(LOCAL_ONLY) / f"home-{uuid.uuid4().hex[:8]}"
    tree = home / "tools" / "py"
    (tree / "secret").mkdir(parents=True)
    home.chmod(0o700)
    (tree / "bin").mkdir()
    shared, hidden = tree / "lib.txt", tree / "secret" / "key.txt"
    shared.write_text("shared\n")
    hidden.write_text("hidden\n")
    (tree / "secret").chmod(0o700)
    program = tree / "bin" / "tool"
    program.write_text("#!/bin/sh\nexit 0\n")
    for path in (shared, hidden, program):
        settle(path)
    program.chmod(0o755)
    try:
        named = LocalFileService(exports=Exports.for_commands([(["true"], str(workdir))], [f"{tree}:ro"]))
        assert "whole" in whole_open(named, shared)[0]
        assert "whole" not in whole_open(named, hidden)[0]  # private inside the tree
        assert "whole" not in whole_open(LocalFileService(), shared)[0]  # no shared export: private
        # the program's own prefix (X of X/bin/tool) counts as shared too
        prefix = LocalFileService(exports=Exports.for_commands([([str(program)], str(workdir))]))
        assert "whole" in whole_open(prefix, shared)[0]

        result = rr_exec(lab, HOST, ["/bin/cat", str(shared), str(hidden)], workdir, "--export", f"{tree}:ro")
        assert result.returncode == 0 and result.stdout == b"shared\nhidden\n", result.stderr.decode()
        assert len(host_copies(lab, shared)) == 1
        assert host_copies(lab, hidden) == []
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ----------------------------------------------------------------------------- exports


def _svc_call(svc, op, **args):
    from remote_runner.mirror import protocol as P
    wire = {k: (P.name_to_wire(os.fsencode(str(v))) if k in ("path", "old", "new", "target") else v)
            for k, v in args.items()}
    header, data, _ = svc.serve({"t": P.REQ, "id": 1, "op": op, "a": wire}, b"")
    P.expand_reply(header)  # (as the agent reads it)
    return header.get("e", 0), header, data


import errno  # noqa: E402
import os  # noqa: E402

from remote_runner.mirror.exports import Export, Exports, parse_export  # noqa: E402
from remote_runner.mirror.service import LocalFileService  # noqa: E402


def test_exports_serve_chosen_trees_and_never_the_denylist(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / "proj").mkdir()
    (home / "proj" / "data").write_text("data")
    (home / "notes").write_text("private")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "f").write_text("r")
    exports = Exports([Export(os.fsencode(home), True), Export(os.fsencode(tmp_path / "ro"), False)],
                      deny=[os.fsencode(home / ".ssh")])
    svc = LocalFileService(exports=exports)
    assert _svc_call(svc, "getattr", path=home / "proj" / "data")[0] == 0
    assert _svc_call(svc, "getattr", path=home / ".ssh" / "id_ed25519")[0] == errno.ENOENT
    assert _svc_call(svc, "getattr", path=home / ".ssh")[0] == errno.ENOENT
    assert b".ssh" not in _svc_call(svc, "readdir", path=home)[2].split(b"\0")
    assert _svc_call(svc, "open", path=tmp_path / "ro" / "f", flags=os.O_WRONLY)[0] == errno.EROFS
    assert _svc_call(svc, "unlink", path=tmp_path / "ro" / "f")[0] == errno.EROFS
    # an existing name is EEXIST, as the kernel finds it before checking the directory
    assert _svc_call(svc, "mkdir", path=tmp_path / "ro" / "f", mode=0o755)[0] == errno.EEXIST
    assert _svc_call(svc, "symlink", path=tmp_path / "ro" / "f", target="x")[0] == errno.EEXIST
    assert _svc_call(svc, "mkdir", path=tmp_path / "ro" / "new", mode=0o755)[0] == errno.EROFS
    assert _svc_call(svc, "mkdir", path=home / ".ssh", mode=0o755)[0] != errno.EEXIST  # a secret is never told to exist
    fh = _svc_call(svc, "open", path=tmp_path / "ro" / "f", flags=os.O_RDONLY)[1]["fh"]
    assert _svc_call(svc, "chmod", fh=fh, mode=0o777)[0] == errno.EROFS  # not through a handle either
    # the way to an export is listed, but shows nothing else
    _, header, data = _svc_call(svc, "readdir", path=tmp_path)
    assert set(data[:header.get("nl", len(data))].split(b"\0")) == {b"home", b"ro"}
    # its subdirectories' answers come along, screened as their own listings are
    from remote_runner.mirror import protocol as P
    below = {s[0] for s in header["sub"]}
    assert below == {P.name_to_wire(os.fsencode(str(d))) for d in (home, tmp_path / "ro", home / "proj")}
    assert b".ssh" not in data and b"id_ed25519" not in data and b"notes" in data
    assert _svc_call(svc, "getattr", path="/root")[0] in (errno.ENOENT, 0) and \
        _svc_call(svc, "getattr", path="/nonexported-" + tmp_path.name)[0] == errno.ENOENT
    # exported by name: the denylist is lifted for that path
    named = Exports([Export(os.fsencode(home), True), Export(os.fsencode(home / ".ssh"), False, True)],
                    deny=[os.fsencode(home / ".ssh")])
    assert _svc_call(LocalFileService(exports=named), "getattr", path=home / ".ssh" / "id_ed25519")[0] == 0
    assert parse_export("/a:ro") == ("/a", False) and parse_export("/a") == ("/a", True)


def test_the_export_a_path_falls_in_is_the_innermost_and_a_denied_path_is_in_none():
    exports = Exports([Export(b"/", False), Export(b"/home/u", True), Export(b"/home/u/proj/out", False),
                       Export(b"/home/u/.ssh/config", False, True), Export(b"/srv/x", True, True)],
                      deny=[b"/home/u/.ssh", b"/home/u/.gnupg", b"/srv/x/key", b"/etc/shadow"])
    paths = [b"/", b"/etc", b"/etc/shadow", b"/etc/shadowy", b"/home", b"/home/u", b"/home/u2",
             b"/home/u/proj", b"/home/u/proj/out", b"/home/u/proj/outer", b"/home/u/proj/out/a/b",
             b"/home/u/.ssh", b"/home/u/.ssh/id", b"/home/u/.ssh/config", b"/home/u/.sshx",
             b"/home/u/.gnupg/k", b"/srv", b"/srv/x", b"/srv/x/key", b"/srv/x/key/y", b"/srv/xy"]

    def innermost(path):  # the rule, spelled out: the longest export that holds the path
        holding = [e for e in exports.exports
                   if path == e.path or e.path == b"/" or path.startswith(e.path + b"/")]
        export = max(holding, key=lambda e: len(e.path))
        for denied in exports.deny:
            inside = path == denied or path.startswith(denied + b"/")
            lifted = export.explicit and (export.path == denied or export.path.startswith(denied + b"/"))
            if inside and not lifted:
                return None
        return export

    for path in paths:
        assert exports.find(path) == innermost(path), path
    assert exports.find(b"/home/u/proj/out/a").writable is False
    assert exports.find(b"/home/u/.ssh/id") is None and exports.find(b"/home/u/.ssh/config") is not None
    assert exports.find(b"/srv/x/key") is None and exports.find(b"/srv/xy").path == b"/"


@pytest.fixture(params=["openat2", "walk"])
def resolution(request, monkeypatch):
    """Each way a request's directories are opened without following links: one openat2, or a walk."""
    from remote_runner.mirror import exports
    if request.param == "walk":
        monkeypatch.setattr(exports, "open_beneath", lambda directory: None)
    else:
        fd = exports.open_beneath(b"/usr")
        assert fd is not None, "openat2 is not available on this machine"
        os.close(fd)
    return request.param


def test_a_link_planted_by_the_host_never_leads_out_of_the_exports(tmp_path, resolution):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    share = tmp_path / "share"
    share.mkdir()
    svc = LocalFileService(exports=Exports([Export(os.fsencode(share), True)]))
    assert _svc_call(svc, "symlink", path=share / "door", target=str(outside))[0] == 0
    # a request through the link, as no kernel would send it, is refused, not followed
    assert _svc_call(svc, "getattr", path=share / "door" / "secret")[0] == errno.ELOOP
    assert _svc_call(svc, "open", path=share / "door" / "secret", flags=os.O_RDONLY)[0] == errno.ELOOP
    assert _svc_call(svc, "rename", old=share / "door" / "secret", new=share / "got",
                     flags=0)[0] == errno.ELOOP
    # a link as the last component is never followed by a changing operation
    assert _svc_call(svc, "symlink", path=share / "s", target=str(outside / "secret"))[0] == 0
    assert _svc_call(svc, "chmod", path=share / "s", mode=0o777)[0] == errno.ELOOP
    assert _svc_call(svc, "truncate", path=share / "s", size=0)[0] == errno.ELOOP
    assert _svc_call(svc, "open", path=share / "s", flags=os.O_WRONLY | os.O_TRUNC)[0] == errno.ELOOP
    assert (outside / "secret").read_text() == "s" and oct((outside / "secret").stat().st_mode)[-3:] != "777"
    # the host's kernel follows the link by asking for the target: that is checked on its own
    assert _svc_call(svc, "getattr", path=outside / "secret")[0] == errno.ENOENT


def test_a_path_longer_than_one_system_call_takes_is_still_walked_without_links(tmp_path, resolution):
    from remote_runner.mirror.exports import OPENAT2_PATH_MAX
    share = tmp_path / "share"
    share.mkdir()
    deep, fd = share, os.open(share, os.O_DIRECTORY)
    try:
        while len(os.fsencode(str(deep))) <= OPENAT2_PATH_MAX + 200:  # longer than PATH_MAX
            os.mkdir("d" * 200, dir_fd=fd)
            below = os.open("d" * 200, os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            deep, fd = deep / ("d" * 200), below
        os.symlink(str(tmp_path), "up", dir_fd=fd)
        svc = LocalFileService(exports=Exports([Export(os.fsencode(share), True)]))
        assert _svc_call(svc, "create", path=deep / "f", mode=0o644, flags=os.O_WRONLY)[0] == 0
        assert os.stat("f", dir_fd=fd).st_size == 0
        assert _svc_call(svc, "getattr", path=deep / "f")[0] == 0
        assert _svc_call(svc, "getattr", path=deep / "up" / "share")[0] == errno.ELOOP
    finally:
        os.close(fd)


def test_root_on_the_host_sees_only_what_is_exported(lab, workdir, tmp_path):
    import os
    import subprocess
    import time
    import uuid

    secret_dir = f"/srv/rr-secret-{uuid.uuid4().hex[:8]}"
    os.makedirs(secret_dir)
    with open(f"{secret_dir}/x", "w") as handle:
        handle.write("local secret\n")
    (workdir / "shared.txt").write_text("shared\n")
    # a sleep long enough to be looked at (the test kills it), and unique on the host
    marker = f"{600 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000 + 1}"
    errors = tmp_path / "exec.stderr"
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config,
                                 "h1", "sleep", marker], cwd=str(workdir), stdin=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        pid = ""
        deadline = time.monotonic() + 120
        while not pid and time.monotonic() < deadline and proc.poll() is None:
            pid = ssh(lab, "h1", f"pgrep -x -f 'sleep {marker}' | head -1", check=False).stdout.strip()
            time.sleep(0.2)
        assert pid, (f"the mirrored command never started (exec: {proc.poll()}): "
                     f"{errors.read_text(errors='replace')[-2000:]}")
        root = f"/proc/{pid}/root"
        assert ssh(lab, "h1", f"cat {root}{workdir}/shared.txt").stdout == "shared\n"  # control
        assert ssh(lab, "h1", f"cat {root}{secret_dir}/x", check=False).returncode != 0
        assert ssh(lab, "h1", f"ls -A {root}/srv", check=False).stdout.strip() == ""
        listing = ssh(lab, "h1", f"ls {root}/ ~/.ssh 2>/dev/null; cat {root}$HOME/.ssh/* 2>&1",
                      check=False).stdout
        assert "PRIVATE KEY" not in listing
        assert ssh(lab, "h1", f"echo x > {root}/usr/rr-written", check=False).returncode != 0
        assert not os.path.exists("/usr/rr-written")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(secret_dir, ignore_errors=True)
        # (killed, it could not remove the empty directory it made for the host's $TMPDIR)
        for left in glob.glob(f"/tmp/{tmpdir.PREFIX}{proc.pid}-*"):
            os.rmdir(left)


@pytest.fixture
def outside_exports():
    """A local directory outside every default export (not under /tmp, /usr, /etc, ...)."""
    import uuid
    from pathlib import Path
    path = Path(f"/srv/rr-extra-{uuid.uuid4().hex[:8]}")
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_read_only_and_export_flags(lab, workdir, outside_exports):
    extra = outside_exports
    (extra / "in.txt").write_text("extra\n")
    argv = ["sh", "-c", f"cat {extra}/in.txt; echo out > out.txt"]
    hidden = rr_exec(lab, "h1", argv, workdir)
    assert b"extra" not in hidden.stdout and (workdir / "out.txt").exists()  # not exported
    (workdir / "out.txt").unlink()
    shown = rr_exec(lab, "h1", argv, workdir, "--export", f"{extra}:ro")
    assert shown.stdout == b"extra\n" and (workdir / "out.txt").exists()
    (workdir / "out.txt").unlink()
    ro = rr_exec(lab, "h1", argv, workdir, "--export", str(extra), "--read-only")
    assert ro.stdout == b"extra\n" and not (workdir / "out.txt").exists()
    assert b"Read-only file system" in ro.stderr


def test_a_version_managers_shim_runs_the_program_it_picks(lab, workdir, outside_exports):
    """``python3`` found as ``~/.pyenv/shims/python3`` (pyenv, rbenv, asdf, mise ...): the shim
    runs the manager from the directory above ``shims``, which runs the version it picks.
    That directory is served (read-only) like a ``bin`` directory's prefix; nothing beside it."""
    import os
    from remote_runner.mirror.exports import program_files
    root = outside_exports / ".fakeenv"
    for folder in ("shims", "libexec", "versions/1.0/bin"):
        (root / folder).mkdir(parents=True)
    scripts = {
        "shims/tool": f'#!/bin/sh\nexec "{root}/libexec/fakeenv" exec tool "$@"\n',
        "libexec/fakeenv": f'#!/bin/sh\nshift\nv=$(cat "{root}/version")\n'
                           f'p="$1"; shift\nexec "{root}/versions/$v/bin/$p" "$@"\n',
        "versions/1.0/bin/tool": f'#!/bin/sh\n[ "$1" = write ] && {{ echo x > "{root}/version"; exit; }}\n'
                                 'echo "tool 1.0: $*"\n'}
    for name, text in scripts.items():
        (root / name).write_text(text)
        (root / name).chmod(0o755)
    (root / "version").write_text("1.0\n")
    (outside_exports / "beside.txt").write_text("not served\n")
    assert os.fsencode(root) in program_files(str(root / "shims" / "tool"), str(workdir))
    env = {"PATH": f"{root}/shims:{os.environ['PATH']}"}
    ran = rr_exec(lab, "h1", ["tool", "a b"], workdir, env=env)
    assert (ran.returncode, ran.stdout) == (0, b"tool 1.0: a b\n"), ran.stderr[-2000:]
    peek = rr_exec(lab, "h1", ["sh", "-c", f"cat {outside_exports}/beside.txt"], workdir, env=env)
    assert peek.returncode != 0 and b"not served" not in peek.stdout
    written = rr_exec(lab, "h1", ["tool", "write"], workdir, env=env)  # served read-only
    assert written.returncode != 0 and b"Read-only file system" in written.stderr
    assert (root / "version").read_text() == "1.0\n"
