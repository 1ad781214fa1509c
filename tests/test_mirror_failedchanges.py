"""Changes sent without waiting are not made on top of one that failed in the same directory.

Unit tests on the local service (real files in a temporary directory, the
requests as the host sends them); the lab test of an EBUSY rmdir followed by
mkdirs is in test_mirror_writes_lab.py.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from remote_runner.mirror import protocol as P
from remote_runner.mirror.failedchanges import FailedChanges, directories, not_waited_for
from remote_runner.mirror.replies import OpError
from remote_runner.mirror.service import LocalFileService


def wire(path) -> str:
    return P.name_to_wire(os.fsencode(str(path)))


class Numbered:
    """Requests numbered as the host numbers the changes it does not wait for."""

    def __init__(self, service: LocalFileService) -> None:
        self.service = service
        self.nseq = 0

    def posted(self, op, **args):
        self.nseq += 1
        return self.service.handle(op, dict(args, nseq=self.nseq), b"")

    def waited(self, op, **args):
        return self.service.handle(op, dict(args, after=self.nseq) if self.nseq else args, b"")


@pytest.fixture
def service():
    svc = LocalFileService()
    yield svc
    svc.close()


def test_a_file_is_not_created_where_an_unlink_sent_before_it_failed(service, tmp_path, caplog):
    """The unlink of a name fails here (it is a directory now); the new file the host made under
    that name is not opened over what is there: its create fails with the unlink's error."""
    (tmp_path / "old").mkdir()
    host = Numbered(service)
    with caplog.at_level(logging.WARNING, "remote_runner.mirror.service"):
        with pytest.raises(OSError) as failed:
            host.posted("unlink", path=wire(tmp_path / "old"))
    assert failed.value.errno in (errno.EISDIR, errno.EPERM)
    assert "unlink" in caplog.text and "failed here" in caplog.text
    fh = P.POSTED_HANDLES[0] + 5
    with pytest.raises(OpError) as refused:
        service.handle("create", {"path": wire(tmp_path / "new"), "mode": 0o644, "flags": os.O_WRONLY,
                                  "fh": fh, "seq": 1}, b"")
    assert refused.value.errno == failed.value.errno
    with pytest.raises(OpError):
        host.posted("mkdir", path=wire(tmp_path / "d"), mode=0o755)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert service.failed_changes.failed == 1 and service.failed_changes.refused == 2


def test_a_change_the_host_waits_for_lifts_the_bar(service, tmp_path):
    (tmp_path / "old").mkdir()
    host = Numbered(service)
    with pytest.raises(OSError):
        host.posted("unlink", path=wire(tmp_path / "old"))
    host.waited("mkdir", path=wire(tmp_path / "d"), mode=0o755)   # the host knows: made
    host.posted("mkdir", path=wire(tmp_path / "e"), mode=0o755)   # and later ones are made again
    assert sorted(os.listdir(tmp_path)) == ["d", "e", "old"]


def test_a_failed_mkdir_bars_its_new_directory_and_other_directories_are_not_barred(service, tmp_path):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "other").mkdir()
    host = Numbered(service)
    with pytest.raises(OSError):
        host.posted("mkdir", path=wire(tmp_path / "taken"), mode=0o755)
    with pytest.raises(OpError):
        host.posted("mkdir", path=wire(tmp_path / "taken" / "sub"), mode=0o755)
    host.posted("mkdir", path=wire(tmp_path / "other" / "fine"), mode=0o755)
    assert (tmp_path / "other" / "fine").is_dir()
    assert (tmp_path / "taken").read_text() == "a file"


def test_which_requests_count():
    fh = P.POSTED_HANDLES[0]
    assert not_waited_for("unlink", {"nseq": 3})
    assert not_waited_for("create", {"fh": fh})
    assert not not_waited_for("create", {"fh": 3}) and not not_waited_for("write", {"fh": fh})
    assert directories("rename", {"old": "/a/x", "new": "/b/y"}) == [b"/a", b"/b"]
    assert directories("mkdir", {"path": "/a/x/"}) == [b"/a"]
    assert directories("read", {"path": "/a/x"}) == [] and directories("unlink", {"path": 7}) == []


def test_reads_and_plain_opens_pass_a_barred_directory(tmp_path):
    changes = FailedChanges()
    changes._bar("unlink", {}, [os.fsencode(str(tmp_path))], errno.EBUSY)
    fh = P.POSTED_HANDLES[0]
    path = wire(tmp_path / "f")
    assert changes.run("open", {"path": path, "flags": os.O_RDONLY, "fh": fh}, lambda: "opened") == "opened"
    with pytest.raises(OpError):
        changes.run("open", {"path": path, "flags": os.O_WRONLY | os.O_TRUNC, "fh": fh}, lambda: "emptied")
