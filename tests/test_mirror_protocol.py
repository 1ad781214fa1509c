"""Unit tests of the mirror's wire format, local file service and bundle (no FUSE, no hosts)."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from remote_runner.mirror import packing, protocol as P
from remote_runner.mirror.bundle import NEED_MARKER, build_bundle
from remote_runner.mirror.service import LocalFileService
from remote_runner.mirror.session import files_only_exports, filtered_environment


def test_frame_round_trip_with_binary_payload():
    payload = bytes(range(256)) * 3
    stream = io.BytesIO(P.encode({"t": P.REQ, "id": 7, "op": "write"}, payload))
    header, data = P.read_frame(stream)
    assert header == {"t": P.REQ, "id": 7, "op": "write"}
    assert data == payload


def test_truncated_frame_is_link_closed():
    frame = P.encode({"t": P.PING})
    with pytest.raises(P.LinkClosed):
        P.read_frame(io.BytesIO(frame[:-2]))


@pytest.mark.parametrize("raw", [b"\x00\x00\x00\x02\x00\x00\x00\x00[]", b"\x00\x00\x00\x03\x00\x00\x00\x00{x}"])
def test_malformed_header_is_protocol_error(raw):
    with pytest.raises(P.ProtocolError):
        P.read_frame(io.BytesIO(raw))


def test_oversized_frame_is_refused_before_reading():
    raw = P.PREFIX.pack(P.MAX_HEADER + 1, 0)
    with pytest.raises(P.ProtocolError, match="too large"):
        P.read_frame(io.BytesIO(raw))


def test_non_utf8_names_survive_json():
    name = b"/tmp/caf\xe9-\xff\x80.txt"
    header = {"t": P.REQ, "a": {"path": P.name_to_wire(name)}}
    back, _ = P.read_frame(io.BytesIO(P.encode(header)))
    assert P.name_from_wire(back["a"]["path"]) == name


def test_compressed_payload_round_trip():
    if not packing.lz4_available():
        pytest.skip("lz4 not installed")
    writer_out = io.BytesIO()
    writer = P.FrameWriter(writer_out.write)
    writer.compress = True
    data = b"abc" * 100000
    writer.send({"t": P.REP, "id": 1}, data, compressible=True)
    assert len(writer_out.getvalue()) < len(data)
    header, payload = P.read_frame(io.BytesIO(writer_out.getvalue()))
    assert header["z"] == 1 and payload == data


def test_version_check():
    assert P.check_version(P.PROTOCOL_VERSION) is None
    assert "not compatible" in P.check_version("99.0")
    assert P.check_version(None) is not None


def _call(service, op, payload=b"", **args):
    header, data, _ = service.serve({"t": P.REQ, "id": 1, "op": op, "a": args}, payload)
    return P.expand_reply(header), data  # (as the agent reads it)


def _w(path) -> str:
    return P.name_to_wire(os.fsencode(str(path)))


def test_service_create_write_read_and_errno(tmp_path):
    svc = LocalFileService()
    target = tmp_path / "f.txt"
    header, _ = _call(svc, "create", path=_w(target), mode=0o640, flags=os.O_WRONLY)
    fh = header["fh"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # remote umask applied, not ours
    header, _ = _call(svc, "write", b"hello world", fh=fh, off=0)
    assert header["n"] == 11
    _call(svc, "release", fh=fh)
    header, _ = _call(svc, "open", path=_w(target), flags=os.O_RDONLY)
    _, data = _call(svc, "read", fh=header["fh"], size=5, off=6)
    assert data == b"world"
    header, _ = _call(svc, "getattr", path=_w(tmp_path / "missing"))
    assert header["e"] == errno.ENOENT
    header, _ = _call(svc, "read", fh=99999, size=1, off=0)
    assert header["e"] == errno.EBADF
    header, _ = _call(svc, "no_such_op")
    assert header["e"] == errno.ENOSYS
    header, _ = _call(svc, "getattr", path="relative/path")
    assert header["e"] == errno.EINVAL
    svc.close()
    assert len(svc.handles) == 0


def test_service_writeback_upgrades_wronly_and_strips_append(tmp_path):
    svc = LocalFileService(writeback=True)
    target = tmp_path / "log"
    target.write_bytes(b"abc")
    header, _ = _call(svc, "open", path=_w(target), flags=os.O_WRONLY | os.O_APPEND)
    fh = header["fh"]
    _, data = _call(svc, "read", fh=fh, size=3, off=0)  # the kernel reads partial pages
    assert data == b"abc"
    _call(svc, "write", b"d", fh=fh, off=3)
    _call(svc, "release", fh=fh)
    assert target.read_bytes() == b"abcd"


def test_service_rename_flags(tmp_path):
    svc = LocalFileService()
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.write_text("B")
    header, _ = _call(svc, "rename", old=_w(a), new=_w(b), flags=1)  # RENAME_NOREPLACE
    assert header["e"] == errno.EEXIST
    header, _ = _call(svc, "rename", old=_w(a), new=_w(b), flags=2)  # RENAME_EXCHANGE
    assert "e" not in header
    assert a.read_text() == "B" and b.read_text() == "A"
    header, _ = _call(svc, "rename", old=_w(a), new=_w(b), flags=8)
    assert header["e"] == errno.EINVAL


def test_service_readdir_fifo_symlink_and_bytes_names(tmp_path):
    svc = LocalFileService()
    odd = os.fsencode(str(tmp_path)) + b"/odd-\xff"
    _call(svc, "mknod", path=P.name_to_wire(odd), mode=stat.S_IFIFO | 0o600, dev=0)
    assert stat.S_ISFIFO(os.lstat(odd).st_mode)
    _call(svc, "symlink", path=_w(tmp_path / "ln"), target=P.name_to_wire(b"odd-\xff"))
    header, data = _call(svc, "readdir", path=_w(tmp_path))
    names = data.split(b"\0")
    assert set(names) == {b"odd-\xff", b"ln"}
    assert all(a is not None for a in header["attrs"])
    _, target = _call(svc, "readlink", path=_w(tmp_path / "ln"))
    assert target == b"odd-\xff"


def test_service_roots_restrict_files_only(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "other").write_text("not exported")
    svc = LocalFileService(roots=[os.fsencode(str(allowed))])
    assert "e" not in _call(svc, "getattr", path=_w(allowed))[0]
    # the way to an export can be looked up and listed, showing only that way
    assert "e" not in _call(svc, "getattr", path=_w(tmp_path))[0]
    header, data = _call(svc, "readdir", path=_w(tmp_path))
    assert data[:header.get("nl", len(data))].split(b"\0") == [b"allowed"]
    assert _call(svc, "getattr", path=_w(tmp_path / "other"))[0]["e"] == errno.ENOENT
    assert _call(svc, "mkdir", path=_w(tmp_path / "new"), mode=0o755)[0]["e"] == errno.EACCES
    assert _call(svc, "getattr", path=_w(str(allowed) + "/.."))[0]["e"] == errno.EINVAL


def test_environment_filter_drops_local_sockets_unless_forwarded():
    base = {b"PATH": b"/bin", b"SSH_AUTH_SOCK": b"/tmp/agent", b"DISPLAY": b":0", b"X": b"\xff"}
    env = filtered_environment(base=base)
    assert "SSH_AUTH_SOCK" not in env and "DISPLAY" not in env
    assert env["PATH"] == "/bin" and P.name_from_wire(env["X"]) == b"\xff"
    env = filtered_environment(forward=["DISPLAY"], base=base, extra={"Y": "1"})
    assert env["DISPLAY"] == ":0" and env["Y"] == "1"


def test_files_only_exports(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    other = tmp_path.parent / (tmp_path.name + "-other")
    other.mkdir()
    exports = files_only_exports(["prog", "in/a.txt", str(other), "-v", "/"], str(tmp_path))
    assert exports == sorted(exports, key=len)
    assert os.fsencode(str(tmp_path)) in exports          # cwd (covers in/a.txt)
    assert os.fsencode(str(other)) in exports
    assert b"/" not in exports
    other.rmdir()


def test_bundle_is_deterministic_and_complete():
    bundle = build_bundle()
    names = set(zipfile.ZipFile(io.BytesIO(bundle.data)).namelist())
    assert {"__main__.py", "rrmirror/agent.py", "rrmirror/protocol.py", "rrmirror/packing.py",
            "rrmirror/hardlinks.py", "mfusepy.py"} <= names
    build_bundle.cache_clear()
    assert build_bundle().sha256 == bundle.sha256
    line = bundle.launch_command("exec")
    assert bundle.filename in line and NEED_MARKER.decode().strip() in line


def test_a_built_bundle_is_kept_and_built_again_when_a_source_changes_or_it_is_damaged(tmp_path, monkeypatch):
    """Each exec reads the bundle its sources last made instead of deflating them again; a
    source changed in any way, or a kept copy whose bytes no longer match its name, makes a
    new one (always the bytes a fresh build gives)."""
    from remote_runner.mirror import bundle as B
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    build_bundle.cache_clear()
    fresh = build_bundle()
    kept = sorted(os.listdir(B.built_dir()))
    assert kept == [f"{kept[0][:32]}-{fresh.sha256}.pyz"]
    built = []
    real_entries = B._entries
    monkeypatch.setattr(B, "_entries", lambda sources: built.append(1) or real_entries(sources))
    build_bundle.cache_clear()
    assert build_bundle() == fresh and built == []  # read back, nothing deflated
    path = os.path.join(B.built_dir(), kept[0])
    with open(path, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\0damaged\0")
    build_bundle.cache_clear()
    assert build_bundle() == fresh and built == [1]  # damaged: built again, the same bytes
    # A source that changes (here: only its ctime, as any edit moves it) names another build.
    sources = B._sources()
    monkeypatch.setattr(B, "_sources", lambda: sources[:-1] + [(sources[-1][0], tmp_path / "mfusepy.py")])
    (tmp_path / "mfusepy.py").write_bytes(sources[-1][1].read_bytes())
    build_bundle.cache_clear()
    assert build_bundle() == fresh and built == [1, 1]
    assert len(os.listdir(B.built_dir())) == 2
    os.utime(tmp_path / "mfusepy.py")
    build_bundle.cache_clear()
    assert build_bundle() == fresh and built == [1, 1, 1]
    build_bundle.cache_clear()


def _old_python():
    for version in ("3.8", "3.9"):
        for candidate in Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python{version}"):
            return str(candidate)
    return None


def test_agent_imports_on_python_38(tmp_path):
    """The agent must run on hosts with an old python3 (>= 3.8)."""
    python = _old_python()
    if python is None:
        pytest.skip("no Python 3.8/3.9 interpreter on this machine")
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(build_bundle().data)
    out = subprocess.run([python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import rrmirror.agent, mfusepy; print(mfusepy.fuse_version_major)", str(pyz)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("2", "3")


def test_every_request_gets_a_reply_however_malformed(tmp_path):
    """A host's request with arguments of any shape or type is answered, never left hanging."""
    import random
    service = LocalFileService(roots=[os.fsencode(str(tmp_path))])
    (tmp_path / "f").write_text("x")
    ops = sorted(name[3:] for name in dir(service) if name.startswith("op_"))
    keys = ["path", "old", "new", "target", "fh", "flags", "mode", "size", "offset", "uid", "gid",
            "times", "name", "value", "dirs", "whole", "have", "dir", "seq", "length", "datasync"]
    values = [None, 0, -1, 2 ** 70, 1.5, True, "", "x", str(tmp_path / "f"), "/", "\0", [], [1, "a"],
              {}, {"a": 1}, b"bytes".decode(), [[str(tmp_path), "0" * 40]], "../../etc/passwd"]
    rng = random.Random(7)
    for i in range(3000):
        op = rng.choice(ops + ["nosuch", 5, None])
        args = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 5))}
        shaped = rng.choice([args, args, args, "notadict", [1], None, 7])
        header, _, _ = service.serve({"id": i, "op": op, "a": shaped}, rng.choice([b"", b"\0data"]))
        assert header["id"] == i and header["t"] == P.REP, (op, shaped)
    service.close()


def test_a_handle_number_the_host_chose_is_taken_only_in_its_range_and_once():
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.replies import HandleTable, OpError
    table = HandleTable()
    assert table.add(10) == 1
    low, high = P.POSTED_HANDLES
    assert table.add(11, low + 5) == low + 5 and table.get(low + 5) == 11
    for bad in (low + 5, 1, low - 1, high, True, "7"):
        with pytest.raises(OpError):
            table.add(12, bad)
    assert table.add(13) == 2


def test_attributes_in_replies_travel_as_rows_and_come_back_as_they_were(tmp_path):
    st = P.stat_to_wire(os.stat(tmp_path))
    header = {"t": P.REP, "id": 3, "st": dict(st), "dst": dict(st), "w": 1}
    sent = P.compact_reply(dict(header))
    assert sent["st"] == [st[f] for f in P.STAT_FIELDS] and sent["w"] == 1
    raw = P.encode(sent)
    assert len(raw) < len(P.encode(header)) * 0.6
    assert P.expand_reply(P.parse_header(raw[P.PREFIX.size:])) == header
    # a row that is not thirteen integers is no attributes at all
    for bad in ([1, 2], ["x"] * len(P.STAT_FIELDS), [True] * len(P.STAT_FIELDS), {"st_mode": 1}):
        assert "st" not in P.expand_reply({"t": P.REP, "id": 1, "st": bad})
