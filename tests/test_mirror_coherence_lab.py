"""Acceptance tests of the mirror's coherent cache and pipelined writes on lab hosts (real FUSE).

No timing is asserted: order comes from the channel itself. A local change is
made, then a line is sent to the command's stdin; the command reads the file
only after that line arrived, so it must see the change (the invalidation
went down the same channel first). Request counts come from ``--debug-rpc``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from remote_runner.mirror import listing
from tests.test_mirror_lab import EXEC_TIMEOUT, local_only, rr_exec, workdir  # noqa: F401

pytestmark = pytest.mark.lab


def rpc_lines(stderr: bytes):
    return [line for line in stderr.decode("utf-8", "replace").splitlines() if " rpc " in line]


@pytest.mark.parametrize("host", ["h1", "h9"])
def test_a_directory_answer_serves_later_negative_lookups_without_requests(lab, local_only, workdir, host,
                                                                          request):
    if host == "h9":
        host = request.getfixturevalue("foreign_host")
    d = local_only / "probe"
    d.mkdir()
    (d / "present").write_text("x")
    for n in range(listing.SUB_DIRS):  # so the parent's answer does not bring probe's along
        (local_only / f"other-{n}").mkdir()
    script = (f"test -e {d}/present || exit 3; "
              f"for n in one two three; do test -e {d}/absent-$n && exit 4; done; "
              f"test -e {d}/present && echo ok")
    proc = rr_exec(lab, host, ["sh", "-c", script], workdir, "--debug-rpc")
    assert proc.returncode == 0 and proc.stdout == b"ok\n", proc.stderr.decode()
    lines = rpc_lines(proc.stderr)
    # one lookup brought probe's listing: probe's own (a directory brings its listing) or,
    # where probe was already known from its parent's answer, the first name looked up in
    # it; after that no name inside it, present or absent, went to this machine
    asked = [line for line in lines if " getattr " in line and str(d) in line]
    assert len(asked) == 1, "\n".join(lines[-40:])
    assert not [line for line in lines if "absent-" in line], "negative lookups went to this machine"


def _reader(lab, host: str, cwd: Path, target: Path):
    """Start a command on *host* that, for each stdin line, prints what *target* holds."""
    code = textwrap.dedent(f"""
        import os, sys
        path = {str(target)!r}
        while True:
            line = sys.stdin.readline()
            if not line:
                break
            try:
                st = os.stat(path)
                with open(path) as f:
                    data = f.read()
                print(line.strip(), data, st.st_size, st.st_mtime_ns, flush=True)
            except FileNotFoundError:
                print(line.strip(), "missing", flush=True)
    """)
    return subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, host,
                             "/usr/bin/python3", "-c", code], cwd=str(cwd), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ask(proc, tag: str) -> list:
    proc.stdin.write(tag.encode() + b"\n")
    proc.stdin.flush()
    line = proc.stdout.readline().decode()
    assert line, "the reader ended: " + proc.stderr.read().decode()
    words = line.split()
    assert words[0] == tag.split()[0], line
    return words[1:]


@pytest.mark.parametrize("host", ["h2", "h9"])
def test_local_changes_reach_the_host_before_its_next_read(lab, local_only, workdir, host, request):
    if host == "h9":
        host = request.getfixturevalue("foreign_host")
    target = local_only / "watched.txt"
    target.write_text("one")
    proc = _reader(lab, host, workdir, target)
    try:
        assert _ask(proc, "first")[0] == "one"
        assert _ask(proc, "again")[0] == "one"  # served from what the host holds
        target.write_text("two!")  # rewritten in place
        assert _ask(proc, "rewrite")[:2] == ["two!", "4"]
        os.utime(target, ns=(1_000_000_000, 1_234_000_000_000))  # touch
        assert _ask(proc, "touch")[2] == "1234000000000"
        other = local_only / "other.txt"
        other.write_text("three")
        os.rename(other, target)  # replaced by another file
        assert _ask(proc, "rename")[0] == "three"
        target.unlink()
        assert _ask(proc, "unlink") == ["missing"]
        target.write_text("four")  # a name the host knew as missing
        assert _ask(proc, "create")[0] == "four"
    finally:
        proc.stdin.close()
        proc.wait(EXEC_TIMEOUT)
    assert proc.returncode == 0, proc.stderr.read().decode()


def _lister(lab, host: str, cwd: Path, target: Path, stats: Path):
    """Start a command on *host* that, for each stdin line ``tag [n] [make NAME]``, lists *target* n times."""
    code = textwrap.dedent(f"""
        import os, sys
        path = {str(target)!r}
        while True:
            words = sys.stdin.readline().split()
            if not words:
                break
            if len(words) > 3 and words[2] == "make":
                open(os.path.join(path, words[3]), "w").close()
            for _ in range(int(words[1]) if len(words) > 1 else 1):
                names = sorted(os.listdir(path))
            print(words[0], ",".join(names) or "-", flush=True)
    """)
    return subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config,
                             "--stats", str(stats), host, "/usr/bin/python3", "-c", code],
                            cwd=str(cwd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("host", ["h2", "h9", "h8"])
def test_the_kernel_keeps_listings_and_drops_them_when_the_directory_changes(lab, workdir, host, request,
                                                                              tmp_path):
    """A listing repeated is not asked again; every change, local or made here, is in the next one.

    On Debian 12 and 11 (libfuse 3.14, 3.10) the session's opendir is wrapped;
    on Debian 13 (libfuse 3.17) the file system's own opendir sets the flags.
    """
    if host == "h9":
        host = request.getfixturevalue("foreign_host")  # Debian 11
    elif host == "h8":
        host = request.getfixturevalue("newer_host")  # Debian 13
    d = workdir / "listed"  # (writable through the mirror, as the working directory's tree is)
    d.mkdir()
    (d / "a").write_text("a")
    stats = tmp_path / "stats.json"
    proc = _lister(lab, host, workdir, d, stats)
    try:
        assert _ask(proc, "first") == ["a"]
        assert _ask(proc, "again 60") == ["a"]
        (d / "b").write_text("b")
        assert _ask(proc, "create") == ["a,b"]
        (d / "a").unlink()
        assert _ask(proc, "unlink 5") == ["b"]
        os.rename(d / "b", d / "c")
        assert _ask(proc, "rename") == ["c"]
        (d / "sub").mkdir()
        assert _ask(proc, "mkdir 5") == ["c,sub"]
        assert _ask(proc, "here 5 make x") == ["c,sub,x"]  # made through the mirror
        assert (d / "x").exists()
        (d / "sub").rmdir()
        assert _ask(proc, "rmdir 60") == ["c,x"]
    finally:
        proc.stdin.close()
        proc.wait(EXEC_TIMEOUT)
    assert proc.returncode == 0, proc.stderr.read().decode()
    host_stats = json.loads(stats.read_text())["host"]
    assert host_stats["kernel_listings"] == ["opendir" if host == "h8" else "wrapped"], host_stats
    # 137 listings; only the first of each version of the directory reaches the mirror's readdir
    readdirs = host_stats["answered_on_host"].get("readdir", 0) + host_stats["asked"].get("readdir", 0)
    assert 1 <= readdirs <= 12, host_stats


def test_a_racing_writer_and_reader_never_see_stale_data(lab, local_only, workdir):
    """The local side grows a file (replaced or rewritten in place) while the host reads it.

    The file holds k bytes after step k. Ordered reads (after line k arrived on
    stdin; the writer waits for each to be done) must see at least k bytes, through stat (the name cache) and through
    read (the data); free-running threads stat'ing it must never see it shrink.

    One stat in thousands may come back with the attributes from before the
    last invalidation while another thread's newer answer is being stored: the
    host's kernel marks its cached attributes valid before it writes them
    (fuse_change_attributes), and stat reads them without a lock. That stat is
    repeated at once and counted; only what is still old then (a cache here or
    on the host serving it) fails, and the momentary ones must stay rare.
    """
    target = local_only / "counter"
    target.write_text("")
    code = textwrap.dedent(f"""
        import os, sys, threading
        path = {str(target)!r}
        bad, torn = [], []
        def sizes():
            try:
                st = os.stat(path).st_size
                with open(path, "rb") as f:
                    return st, len(f.read())
            except FileNotFoundError:
                return -1, -1
        stop = threading.Event()
        def free():
            # stat only: a handle kept open across a local replacement shares the
            # name's kernel inode (libfuse's high-level API), see the README
            last, seen = 0, None
            while not stop.is_set():
                try:
                    full = os.stat(path)
                except FileNotFoundError:
                    continue
                st = full.st_size
                if st < last:  # (inode and ctime of both, for whoever reads a failure)
                    again = os.stat(path).st_size
                    (bad if again < last else torn).append("shrank to %d %r after %d %r, then %d" % (
                        st, (full.st_ino, full.st_ctime_ns), last, seen, again))
                if st >= last:
                    last, seen = st, (full.st_ino, full.st_ctime_ns)
        # several at once: two getattrs in flight can end in the kernel in either order
        ts = [threading.Thread(target=free) for _ in range(3)]
        for t in ts:
            t.start()
        for line in sys.stdin:
            k = int(line)
            st, data = sizes()
            if st < k <= data:
                again = os.stat(path).st_size
                if again >= k:
                    torn.append("stat %d then %d at %d" % (st, again, k))
                    st = again
            if st < k or data < k:
                bad.append("stale %d/%d < %d" % (st, data, k))
            print(k, flush=True)  # the writer goes on
        stop.set()
        for t in ts:
            t.join()
        print("BAD" if bad or len(torn) > 5 else "GOOD", bad[:5], len(torn), torn[:5], flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, "h3",
                             "/usr/bin/python3", "-c", code], cwd=str(workdir), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = local_only / "counter.tmp"
    for k in range(1, 301):
        if k % 2:
            tmp.write_bytes(b"x" * k)
            os.rename(tmp, target)  # replaced by a new file
        else:
            with open(target, "r+b") as f:  # the same file, grown in place
                f.write(b"x" * k)
        proc.stdin.write(b"%d\n" % k)
        proc.stdin.flush()
        assert proc.stdout.readline() == b"%d\n" % k, proc.stderr.read().decode()
    out, err = proc.communicate(timeout=EXEC_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert out.startswith(b"GOOD"), out.decode() + err.decode()[-2000:]


@pytest.mark.parametrize("old_mtime", [False, True], ids=["written", "put-in-place"])
def test_a_file_replaced_here_is_read_whole_never_mixed_with_the_one_it_replaced(lab, local_only, workdir,
                                                                                old_mtime):
    """A file replaced here by rename (an editor's save, a config reload; with an old mtime,
    ``rsync -a``) while the host reads it: each read returns one of the versions whole, as it
    does locally, never the new bytes cut or padded with zeros to another version's size (the
    host's kernel keeps one size per name)."""
    target = local_only / "swapped"
    versions = [b"A" * 10, b"B" * 20, b"C" * 4096 + b"c", b"D" * 3]
    target.write_bytes(versions[0])
    code = textwrap.dedent(f"""
        import sys, time
        versions = {versions!r}
        seen, bad = set(), []
        end = time.time() + 4
        while time.time() < end:
            with open({str(target)!r}, "rb") as f:
                data = f.read()
            if data in versions:
                seen.add(data[:1])
            elif len(bad) < 5:
                bad.append(data[:12] + b"..." + data[-12:] + b" (%d bytes)" % len(data))
            else:
                bad.append(b"")
        print(repr((sorted(seen), len(bad), bad[:5])), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, "h3",
                             "/usr/bin/python3", "-c", code], cwd=str(workdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = local_only / "swapped.tmp"
    n = 0
    while proc.poll() is None:
        n += 1
        tmp.write_bytes(versions[n % len(versions)])
        if old_mtime:  # settled by its mtime: sent whole, kept on the host
            os.utime(tmp, (time.time() - 3600 - n, time.time() - 3600 - n))
        os.rename(tmp, target)
        time.sleep(0.002)
    out, err = proc.communicate(timeout=EXEC_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    seen, bad, examples = ast.literal_eval(out.decode())
    assert bad == 0, examples
    assert len(seen) >= 2, out  # the replacements did reach the host


def test_a_file_written_while_the_command_runs_is_read_ahead_and_can_be_mapped_privately(
        lab, local_only, workdir, tmp_path):
    """Read without the kernel's cache, a file written here while the command runs still costs
    one request per 128 KiB, not one per 4 KiB read, and a program can still map it privately
    (as the loader maps a library just built)."""
    import hashlib
    target = local_only / "fresh.bin"
    data = os.urandom(1 << 20)
    code = textwrap.dedent(f"""
        import hashlib, mmap, sys
        print("ready", flush=True)
        sys.stdin.readline()  # the file is written now
        with open({str(target)!r}, "rb") as f:
            chunks = iter(lambda: f.read(4096), b"")
            read = hashlib.sha1(b"".join(chunks)).hexdigest()
        with open({str(target)!r}, "rb") as f:
            mapped = hashlib.sha1(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)[:]).hexdigest()
        print(read, mapped, flush=True)
    """)
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config,
                             "--stats", str(stats), "h3", "/usr/bin/python3", "-c", code], cwd=str(workdir),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
    target.write_bytes(data)
    out, err = proc.communicate(b"go\n", timeout=EXEC_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == [hashlib.sha1(data).hexdigest()] * 2
    host = json.loads(stats.read_text())["host"]
    reads = host["asked"].get("read", 0)
    assert 8 <= reads <= 24, host  # 1 MiB by 128 KiB (the mapping's pages may ask again)
    assert host["answered_on_host"].get("read", 0) >= 200, host  # the 4 KiB reads: past the page cache


def test_a_file_the_command_wrote_keeps_the_page_cache_and_maps_shared(lab, local_only, workdir, tmp_path):
    """A file the command itself just wrote (too big to be answered from what the host kept of
    its writes) did not change under it: it is read through the page cache, so it can still be
    mapped shared on a host whose libfuse predates FUSE_CAP_DIRECT_IO_ALLOW_MMAP (h3)."""
    code = textwrap.dedent(f"""
        import hashlib, mmap, os
        data = os.urandom(5 << 20)
        path = {str(workdir / "out.bin")!r}
        with open(path, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # (MAP_SHARED)
            print(hashlib.sha1(view[:]).hexdigest() == hashlib.sha1(data).hexdigest(), flush=True)
    """)
    done = rr_exec(lab, "h3", ["/usr/bin/python3", "-c", code], workdir)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"True\n"


@pytest.fixture
def full_disk(local_only):
    """A 64 KiB tmpfs on this machine (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path = local_only / "full"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_pipelined_write_errors_surface_by_close(lab, full_disk, workdir):
    code = textwrap.dedent(f"""
        import os, sys
        fd = os.open({str(full_disk / 'big')!r}, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for _ in range(64):
                os.write(fd, b"x" * 65536)
        except OSError as exc:
            print("write failed", exc.errno)
            os.close(fd)
            sys.exit(0)
        try:
            os.close(fd)
        except OSError as exc:
            print("close failed", exc.errno)
            sys.exit(0)
        print("no error")
    """)
    proc = rr_exec(lab, "h1", ["/usr/bin/python3", "-c", code], workdir, "--export", str(full_disk),
                   "--debug-rpc")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "failed 28" in out, out  # ENOSPC, at a write or at close
    writes = [line for line in rpc_lines(proc.stderr) if " write " in line]
    assert writes and all("'seq'" in line for line in writes), writes[:3]


def test_pipelined_writes_land_whole_and_in_order(lab, workdir):
    target = workdir / "out.bin"  # the cwd: served read-write
    code = textwrap.dedent(f"""
        with open({str(target)!r}, "wb") as f:
            for i in range(2000):
                f.write(bytes([i % 251]) * 997)
                if i % 500 == 0:
                    f.flush()
            f.seek(10)
            f.write(b"HEAD")
    """)
    proc = rr_exec(lab, "h2", ["/usr/bin/python3", "-c", code], workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    expected = bytearray(b"".join(bytes([i % 251]) * 997 for i in range(2000)))
    expected[10:14] = b"HEAD"
    assert target.read_bytes() == bytes(expected)


def _type_reader(lab, host: str, cwd: Path, target: Path):
    """Start a command on *host* that, for each stdin line, prints what kind of name *target* is and holds."""
    code = textwrap.dedent(f"""
        import os, stat, sys
        path = {str(target)!r}
        for line in sys.stdin:
            words = line.split()
            name = os.path.join(path, *words[1:])  # "tag [name below]"
            try:
                st = os.lstat(name)
            except OSError as exc:
                print(words[0], "lstat-error", exc.errno, flush=True)
                continue
            try:
                if stat.S_ISLNK(st.st_mode):
                    out = "link " + os.readlink(name)
                elif stat.S_ISDIR(st.st_mode):
                    out = "dir " + ",".join(sorted(os.listdir(name)) or ["-"])
                else:
                    with open(name) as f:
                        out = "file " + f.read()
            except OSError as exc:
                out = "error " + str(exc.errno)
            print(words[0], out, flush=True)
    """)
    return subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, host,
                             "/usr/bin/python3", "-c", code], cwd=str(cwd), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("host", ["h2", "h9"])
def test_a_name_that_changes_type_is_seen_as_its_new_type(lab, local_only, workdir, host, request):
    """file -> directory -> symlink -> file -> directory removed and made again, each seen at the next read."""
    if host == "h9":
        host = request.getfixturevalue("foreign_host")
    target = local_only / "shifting"
    target.write_text("a file")
    proc = _type_reader(lab, host, workdir, target)
    try:
        assert _ask(proc, "1") == ["file", "a", "file"]
        target.unlink()
        target.mkdir()
        (target / "inside").write_text("x")
        assert _ask(proc, "2") == ["dir", "inside"]
        (target / "inside").unlink()
        target.rmdir()
        os.symlink("elsewhere", target)
        assert _ask(proc, "3") == ["link", "elsewhere"]
        target.unlink()
        target.write_text("a file again")
        assert _ask(proc, "4") == ["file", "a", "file", "again"]
        target.unlink()
        target.mkdir()
        assert _ask(proc, "5") == ["dir", "-"]
        target.rmdir()
        target.mkdir()  # removed and made again: another directory
        (target / "new").write_text("y")
        assert _ask(proc, "6") == ["dir", "new"]
        assert _ask(proc, "7 new") == ["file", "y"]
        os.rename(target, local_only / "moved-away")  # (its names go without an event each)
        target.mkdir()  # made again, with a directory where the file was
        (target / "new").mkdir()
        assert _ask(proc, "8 new") == ["dir", "-"]
    finally:
        proc.stdin.close()
        proc.wait(EXEC_TIMEOUT)
    assert proc.returncode == 0, proc.stderr.read().decode()
