"""Directory answers kept on the host between sessions, confirmed by this machine at start.

Unit tests drive the local side's ``validate`` and the host's
:class:`ListingStore` directly; the lab tests run ``remote-runner exec``
twice and change files locally in between.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import pytest

from remote_runner.mirror.host.listings import ListingStore, digest, encode
from remote_runner.mirror.host.names import NameCache
from remote_runner.mirror.host.answers import listing_entries
from remote_runner.mirror.host.profile import Profile
from remote_runner.mirror.listing import directory_answer, encode_answer
from remote_runner.mirror.replies import OpError
from remote_runner.mirror.service import LocalFileService
from tests.conftest import ssh
from tests.test_mirror_lab import local_only, rr_exec, workdir  # noqa: F401 (fixtures)

HOST = "h3"


def offer(service: LocalFileService, dirs) -> dict:
    return json.loads(service.handle("validate", {"dirs": dirs}, b"").payload)


# ----------------------------------------------------------------------------- this machine's side

def test_a_kept_directory_is_confirmed_or_renewed(tmp_path):
    (tmp_path / "a").write_text("one")
    service = LocalFileService(roots=[str(tmp_path).encode()])
    payload = encode_answer(directory_answer(str(tmp_path).encode()))
    assert encode(json.loads(payload)) == payload  # the host computes the same digest
    body = offer(service, [[str(tmp_path), digest(payload)], [str(tmp_path), ""], [str(tmp_path), "0" * 40]])
    assert body["dirs"][0] == 1  # current: no data
    assert body["dirs"][1] == body["dirs"][2] == json.loads(payload)  # none kept, or another: the listing

    st = (tmp_path / "a").stat()
    time.sleep(0.01)
    (tmp_path / "a").write_text("two")  # same size; mtime put back: only ctime tells
    os.utime(tmp_path / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = offer(service, [[str(tmp_path), digest(payload)]])["dirs"][0]
    assert isinstance(changed, dict)
    [(name, attrs, _)] = listing_entries(encode(changed))
    assert name == "a" and attrs["st_ctime"] != st.st_ctime_ns


def test_names_in_a_confirmed_directory_are_not_answered_one_by_one(tmp_path):
    (tmp_path / "a").write_text("one")
    service = LocalFileService(roots=[str(tmp_path).encode()])
    payload = encode_answer(directory_answer(str(tmp_path).encode()))
    names = os.fsencode(str(tmp_path / "a")) + b"\0" + os.fsencode(str(tmp_path / "missing"))
    body = json.loads(service.handle("validate", {"dirs": [[str(tmp_path), digest(payload)]]}, names).payload)
    assert body["dirs"] == [1] and body["names"] == []


def test_what_is_not_served_is_never_listed_whatever_the_host_offers(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("x")
    service = LocalFileService(roots=[str(inside).encode()])

    class Watches:  # records what would be watched (changes there would be reported to the host)
        seen = []

        def watch(self, directory):
            self.seen.append(directory)
            return True

        def watched(self, directory):
            return directory in self.seen

        def stamp(self):
            return 0

        def unchanged_since(self, directory, stamp):
            return False  # (nothing kept: every offer is listed and checked again)

    service.watcher = Watches()
    body = offer(service, [[str(outside), ""], [str(inside / ".." / "out"), ""], [str(inside / "nope"), ""],
                           "garbage", [1, 2], [str(inside), ""]])
    assert body["dirs"][:5] == [0, 0, 0, 0, 0] and body["dw"][:2] + body["dw"][3:] == [0, 0, 0, 0, 1]
    assert body["dirs"][5] == {"n": [], "a": [], "l": []}
    assert not [d for d in Watches.seen if b"out" in d]  # nothing outside the exports is watched
    # nor the directory of any name the host asks about
    (inside / "link").symlink_to(outside)
    for name in (outside / "secret", inside / "link" / "secret"):
        try:  # missing (not served) or refused (a link on the way)
            reply = service.handle("getattr", {"path": str(name), "dir": 1}, b"")
            assert reply.fields.get("missing") and not reply.fields.get("w") and not reply.fields.get("ls")
        except OpError:
            pass
    assert not [d for d in Watches.seen if b"out" in d or b"link" in d]
    assert offer(service, "not a list")["dirs"] == []


# ----------------------------------------------------------------------------- the host's side

def test_the_store_keeps_answers_and_ignores_garbage(tmp_path):
    payload = encode_answer(directory_answer(os.fsencode(str(tmp_path))))
    store = ListingStore(str(tmp_path / "kept"))
    store.keep("/some/dir", payload)
    store.save()
    again = ListingStore(str(tmp_path / "kept"))
    assert again.offer(["/some/dir", "/other"]) == [["/some/dir", digest(payload)], ["/other", ""]]
    [path] = [os.path.join(tmp_path / "kept", n) for n in os.listdir(tmp_path / "kept")]
    good = open(path, "rb").read()
    for garbage in (b"", b"\0\1\2", good[:-3], good.replace(b"/some/dir", b"/some/dix"),
                    b'{"d": "/some/dir", "dg": "%s"}\n[1, 2]' % digest(b"[1, 2]").encode(),
                    good + b"x"):
        with open(path, "wb") as handle:
            handle.write(garbage)
        assert ListingStore(str(tmp_path / "kept")).offer(["/some/dir"]) == [["/some/dir", ""]], garbage


def _keep_empty(store: ListingStore, numbers, pause: float = 0.0) -> None:
    """Keep an empty answer for each directory ``/dN`` and save it, one session each, in turn."""
    for i in numbers:
        store.keep(f"/d{i}", encode({"n": [], "a": [], "l": []}))
        store.save()
        time.sleep(pause)  # (each a later mtime: the oldest are trimmed first)


def test_the_store_keeps_at_most_its_limit(tmp_path):
    store = ListingStore(str(tmp_path / "kept"), limit=3)
    _keep_empty(store, range(5), 0.01)
    assert len(os.listdir(tmp_path / "kept")) == 3


def test_the_store_trims_once_over_its_limit_and_then_leaves_room(tmp_path):
    store = ListingStore(str(tmp_path / "kept"), limit=16)
    _keep_empty(store, range(17), 0.002)
    kept = sorted(os.listdir(tmp_path / "kept"))
    assert len(kept) == 14  # over 16: down to 7/8 of it, the oldest gone
    assert store._file("/d16").rsplit("/", 1)[1] in kept and store._file("/d0").rsplit("/", 1)[1] not in kept
    _keep_empty(store, range(17, 19))
    assert len(os.listdir(tmp_path / "kept")) == 16  # not over: nothing trimmed


def test_an_answer_gone_stale_in_the_session_is_not_written(tmp_path):
    cache = NameCache()
    cache.listings = store = ListingStore(str(tmp_path / "kept"))
    answer = encode({"n": ["f"], "a": [None], "l": [None]})
    for d in ("/gone", "/grown", "/touched", "/kept", "/gone/sub"):
        store.keep(d, answer)
    cache.renamed("/gone/sub")   # removed here: it, and its directory's answer, are stale
    cache.renamed("/gone")
    cache.renamed("/grown/new")  # a name made in it
    cache.changed("/touched/f")  # an entry's attributes changed
    cache.changed("/kept")       # its own attributes: what its answer lists is unchanged
    store.save()
    assert ListingStore(str(tmp_path / "kept")).offer(["/gone", "/gone/sub", "/grown", "/touched", "/kept"]) == [
        ["/gone", ""], ["/gone/sub", ""], ["/grown", ""], ["/touched", ""], ["/kept", digest(answer)]]


def test_profile_keeps_the_directories_used(tmp_path):
    profile = Profile(str(tmp_path / "p.json"))
    profile.record("/usr/lib/python3/json")
    profile.record("/usr/lib/python3/os.py")
    profile.record_dir("/srv/listed")
    profile.save()
    again = Profile(str(tmp_path / "p.json"))
    assert again.load() == ["/usr/lib/python3/json", "/usr/lib/python3/os.py"]
    assert sorted(again.load_dirs()) == ["/srv/listed", "/usr/lib/python3"]
    (tmp_path / "old.json").write_text(json.dumps(["/a/b"]))  # an older profile: names only
    assert Profile(str(tmp_path / "old.json")).load() == ["/a/b"]
    assert Profile(str(tmp_path / "old.json")).load_dirs() == []
    (tmp_path / "bad.json").write_text('{"names": 3, "dirs": ["relative", 5]}')
    assert Profile(str(tmp_path / "bad.json")).load() == [] and Profile(str(tmp_path / "bad.json")).load_dirs() == []


def test_profile_keeps_which_directories_were_listed(tmp_path):
    path = str(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"names": ["/a/b"], "dirs": ["/a"]}))  # an older agent's
    profile = Profile(path)
    profile.record("/usr/lib/x86_64-linux-gnu/libc.so.6")
    profile.record_dir("/usr/lib/python3")
    profile.record_dir("/made/here")
    profile.made("/made/here")
    profile.save()
    assert Profile(path).load_listed() is None  # an earlier session says nothing: all count as listed
    for _ in range(Profile.SESSIONS - 1):  # until the older agent's session is no longer kept
        profile.save()
    again = Profile(path)
    assert again.load_listed() == {"/usr/lib/python3"}
    assert sorted(again.load_dirs()) == ["/usr/lib/python3", "/usr/lib/x86_64-linux-gnu"]


def test_a_directory_only_looked_up_in_is_offered_while_its_answer_is_small(tmp_path):
    from remote_runner.mirror.host.listings import BYTES_PER_NAME, LOOKUP_ONLY_BYTES
    store = ListingStore(str(tmp_path / "kept"))
    big = encode({"n": ["f%04d" % i for i in range(2000)], "a": [None] * 2000, "l": [None] * 2000})
    small = encode({"n": ["a", "b"], "a": [None, None], "l": [None, None]})
    assert len(small) <= LOOKUP_ONLY_BYTES < len(big)
    store.keep("/big", big)
    store.keep("/small", small)
    assert store.worth_offering("/nothing/kept", 1)  # its size is learnt from the local side's answer
    assert store.worth_offering("/small", 0)
    assert not store.worth_offering("/big", 1)
    assert store.worth_offering("/big", len(big) // BYTES_PER_NAME + 1)  # most of its names used


# ----------------------------------------------------------------------------- on lab hosts

def _script(d) -> list:
    """List *d* and show each entry's size, mtime, ctime and inode (as this machine would)."""
    return ["/bin/sh", "-c", f"cd {d} && ls -1a && TZ=UTC stat -c '%n %s %y %z %i %h' * && cat a.txt"]


def _lookups_in(stderr: bytes, d) -> list:
    """The lookups and listings of *d*'s names that went to this machine (``--debug-rpc``)."""
    return [line for line in stderr.decode("utf-8", "replace").splitlines()
            if str(d) in line and (" rpc getattr " in line or " rpc readdir " in line)]


@pytest.mark.parametrize("host", [HOST, "h9"])
def test_a_kept_directory_that_changed_between_sessions_is_never_served_stale(lab, local_only, workdir,
                                                                               host, request):
    if host == "h9":
        host = request.getfixturevalue("foreign_host")
    d = local_only / "tree"
    d.mkdir()
    (d / "a.txt").write_text("alpha\n")
    (d / "b.txt").write_text("bravo\n")
    local = lambda: subprocess.run(_script(d), capture_output=True, check=True).stdout  # noqa: E731

    first = rr_exec(lab, host, _script(d), workdir)
    assert first.returncode == 0 and first.stdout == local(), first.stderr.decode()
    # the next session starts with the directory, confirmed in its one validate request
    warm = rr_exec(lab, host, _script(d), workdir, "--debug-rpc", "-l", "INFO")
    assert warm.returncode == 0 and warm.stdout == local(), warm.stderr.decode()
    assert _lookups_in(warm.stderr, d) == []

    # between sessions: rewritten in place to the same size with its mtime put back
    # (only ctime tells), one name removed, one added
    before = (d / "a.txt").stat()
    time.sleep(0.05)
    with open(d / "a.txt", "r+b") as handle:
        handle.write(b"ALPHA\n")
    subprocess.run(["touch", "-d", "@%d.%09d" % divmod(before.st_mtime_ns, 10**9), str(d / "a.txt")], check=True)
    assert (d / "a.txt").stat().st_mtime_ns == before.st_mtime_ns
    (d / "b.txt").unlink()
    (d / "c.txt").write_text("charlie\n")
    after = rr_exec(lab, host, _script(d), workdir)
    assert after.returncode == 0, after.stderr.decode()
    assert after.stdout == local() and b"ALPHA" in after.stdout and b"b.txt" not in after.stdout


def test_a_garbage_kept_answer_on_the_host_is_ignored(lab, local_only, workdir):
    d = local_only / "tree"
    d.mkdir()
    (d / "a.txt").write_text("alpha\n")
    local = lambda: subprocess.run(_script(d), capture_output=True, check=True).stdout  # noqa: E731
    for _ in range(2):  # a directory only listed is offered (and kept) from the next session on
        assert rr_exec(lab, HOST, _script(d), workdir).stdout == local()
    name = hashlib.sha1(str(d).encode()).hexdigest()
    kept = ssh(lab, HOST, f"ls ~/.cache/remote-runner/files/*.listings/{name}").stdout.split()
    assert len(kept) == 1  # the directory's answer is kept on the host
    (d / "z.txt").write_text("new\n")
    for garbage in ("printf '\\001\\377garbage'", "head -c 40"):
        # a kept answer that is garbage, or cut short, is ignored: the listing comes fresh
        ssh(lab, HOST, f"f={kept[0]}; {garbage} $f > $f.x 2>/dev/null; mv $f.x $f")
        again = rr_exec(lab, HOST, _script(d), workdir)
        assert again.returncode == 0 and again.stdout == local(), again.stderr.decode()
        assert b"z.txt" in again.stdout


def _offered_dirs(stderr: bytes) -> list:
    """The directories the host offered in its ``validate`` (``--debug-rpc``)."""
    import ast
    for line in stderr.decode("utf-8", "replace").splitlines():
        if " rpc validate " in line:
            args = ast.literal_eval(line[line.index("{"):line.rindex(" -> ")])
            return [d[0] for d in args.get("dirs") or []]
    raise AssertionError("no validate request in:\n" + stderr.decode("utf-8", "replace"))


def test_a_big_directory_only_looked_up_in_is_confirmed_name_by_name(lab, local_only, workdir):
    """Its names, the missing one too, are confirmed at start (no request for them), it is not
    listed again, and a file changed or made since is this machine's at the next run."""
    d = local_only / "big"
    d.mkdir()
    for i in range(400):  # its answer: ~50 KiB, far more than the three names the command uses
        (d / f"f{i:03d}.txt").write_text(f"file {i}\n")
    # two names that are there and one that is not (a negative lookup, confirmed as such)
    argv = ["/bin/sh", "-c", f"cat {d}/f007.txt {d}/f008.txt; test -e {d}/absent || echo absent"]
    name = hashlib.sha1(str(d).encode()).hexdigest()
    for _ in range(3):  # until the host keeps the directory's answer (and this command's profile)
        first = rr_exec(lab, HOST, argv, workdir)
        assert first.returncode == 0 and first.stdout == b"file 7\nfile 8\nabsent\n", first.stderr.decode()
        if ssh(lab, HOST, f"ls ~/.cache/remote-runner/files/*.listings/{name}", check=False).returncode == 0:
            break
    else:
        raise AssertionError("the host never kept the directory's answer")
    warm = rr_exec(lab, HOST, argv, workdir, "--debug-rpc", "-l", "INFO")
    assert warm.returncode == 0 and warm.stdout == b"file 7\nfile 8\nabsent\n", warm.stderr.decode()
    assert str(d) not in _offered_dirs(warm.stderr)
    assert _lookups_in(warm.stderr, d) == []  # the three names were confirmed in the validate

    (d / "f007.txt").write_text("seven, changed\n")
    (d / "absent").write_text("there now\n")
    after = rr_exec(lab, HOST, argv[:2] + [argv[2] + f"; cat {d}/absent"], workdir)
    assert after.returncode == 0, after.stderr.decode()
    assert after.stdout == b"seven, changed\nfile 8\nthere now\n"
