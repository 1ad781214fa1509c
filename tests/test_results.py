"""Unit tests of fetching results: what a host lists and sends is checked, never believed.

The host side is faked here (a shell that prints a listing, readers that send
bytes); the lab tests in test_lifecycle.py fetch from real hosts.
"""

from __future__ import annotations

import os

import pytest

from remote_runner import results
from remote_runner.errors import CopyError
from remote_runner.shell import ScriptResult


class ListingShell:
    """A shell whose every script prints *listing* (what ``find … stat`` would)."""

    def __init__(self, listing: str) -> None:
        self.listing = listing

    def script(self, text: str, timeout: float) -> ScriptResult:
        return ScriptResult(0, self.listing, "")


class Reader:
    """Files served from a dict; a value that is an exception is raised on read."""

    def __init__(self, files):
        self.files = files
        self.opened = []

    def open(self, remote: str, size: int):
        self.opened.append(remote)
        body = self.files[remote]
        reader = self

        class Handle:
            sent = 0

            def read(self, n: int) -> bytes:
                if isinstance(body, BaseException):
                    raise body
                chunk = body[self.sent:self.sent + n]
                self.sent += len(chunk)
                return chunk

            def close(self, complete: bool = False) -> None:
                reader.closed = complete
        return Handle()


def test_a_listing_keeps_only_names_that_can_land_safely():
    long = "n" * 300
    listing = "\n".join([
        "5 ./out/good.json",
        "7 ./out/bad\x1b[2J.json",          # an escape sequence in a name
        "3 ./screen.log",                     # would replace the fetched log
        f"4 ./out/{long}.json",               # longer than a file name may be
        "9 ./" + "d/" * 70 + "deep.json",     # deeper than anyone needs
        "²2 ./out/sup.json",                  # not a number we read
        "99999999999999999999999 ./out/huge.json",  # a size past any disk
        "1 ./../etc/passwd.json",
        "",
    ])
    skipped = []
    found = results.list_results(ListingShell(listing), "/base", ["**/*.json", "*.log"], skipped)
    assert found == {"out/good.json": 5}
    reasons = {name: why for name, why in skipped}
    assert "control characters" in reasons["out/bad\\x1b[2J.json"]
    assert "fetched log" in reasons["screen.log"]
    assert any("longer than 255" in why for why in reasons.values())
    assert any("directories deep" in why for why in reasons.values())
    assert any("leaves base_dir" in why for why in reasons.values())


@pytest.fixture
def fetching(monkeypatch):
    """fetch_host with the host's hashes and log size faked away (nothing fetched is unchanged)."""
    monkeypatch.setattr(results, "remote_sha1", lambda shell, paths: ({}, []))
    monkeypatch.setattr(results, "_remote_size", lambda shell, path: None)

    def fetch(listing, files, dest):
        reader = Reader(files)
        return results.fetch_host(ListingShell(listing), lambda: reader, "h1",
                                  [("c", "/base", ["*.bin"], "/state/c.log")], str(dest)), reader
    return fetch


def test_no_more_than_the_listed_size_is_written(fetching, tmp_path):
    report, _ = fetching("4 ./a.bin\n", {"/base/a.bin": b"abcd" + b"X" * 100000}, tmp_path)
    assert (tmp_path / "h1" / "c" / "a.bin").read_bytes() == b"abcd"
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "h1" / "c" / "a.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert report.bytes == 4 and report.copied == [str(tmp_path / "h1" / "c" / "a.bin")]


def test_one_failed_file_does_not_stop_the_others_and_leaves_nothing_half_written(fetching,
                                                                                  tmp_path):
    files = {"/base/a.bin": b"aaaa", "/base/b.bin": EOFError("the channel closed"),
             "/base/c.bin": b"cccc"}
    with pytest.raises(CopyError) as info:
        fetching("4 ./a.bin\n4 ./b.bin\n4 ./c.bin\n", files, tmp_path)
    assert "b.bin" in str(info.value) and "the channel closed" in str(info.value)
    folder = tmp_path / "h1" / "c"
    assert sorted(os.listdir(folder)) == ["a.bin", "c.bin"]  # no b.bin, no temporary file


def test_a_file_is_written_through_no_link_found_on_the_way(fetching, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "runs"
    (dest / "h1" / "c").mkdir(parents=True)
    os.symlink(elsewhere, dest / "h1" / "c" / "out")
    with pytest.raises(CopyError, match="leads out of"):
        results.fetch_host(ListingShell("4 ./out/x.bin\n"), lambda: Reader({"/base/out/x.bin": b"xxxx"}),
                           "h1", [("c", "/base", ["out/*.bin"], "/state/c.log")], str(dest))
    assert os.listdir(elsewhere) == []


def test_a_host_that_trickles_bytes_is_given_up_on(fetching, tmp_path, monkeypatch):
    monkeypatch.setattr(results, "READ_TIMEOUT", -1.0)  # the deadline has passed at the first read
    with pytest.raises(CopyError, match="took longer than"):
        fetching("4 ./a.bin\n", {"/base/a.bin": b"abcd"}, tmp_path)
    assert os.listdir(tmp_path / "h1" / "c") == []


def test_a_fetch_that_cannot_fit_is_refused_before_any_byte(fetching, tmp_path):
    with pytest.raises(CopyError, match="need .* bytes"):
        fetching(f"{1 << 55} ./a.bin\n", {"/base/a.bin": b""}, tmp_path)
    assert not (tmp_path / "h1").exists() or not os.listdir(tmp_path / "h1" / "c")


def test_the_status_table_shows_a_hosts_line_as_text_only():
    from types import SimpleNamespace
    from rich.console import Console
    from remote_runner.cli.lifecycle import status_table
    row = SimpleNamespace(host="h1", name="c", state="exited 1", pid=7, since=None,
                          ended=10 ** 20, healthy=False,
                          last_line="\x1b]0;title\x07[/][link=http://x]boom\x1b[31m red")
    console = Console(record=True, width=200, force_terminal=True)
    console.print(status_table(SimpleNamespace(run_id="r"), [row]))
    text = console.export_text(styles=False)
    assert "[/][link=http://x]boom red" in text and "title" not in text


def test_logs_on_a_terminal_lose_escapes_but_keep_tabs():
    from remote_runner.cli.lifecycle import _terminal_text
    assert _terminal_text("a\tb\x1b[2J\x1b]52;c;ZXZpbA==\x07c\x07") == "a\tbc"


def test_the_agents_stderr_is_read_past_the_handshakes_timeout():
    """A timeout while no stderr comes (the handshake's) is no end of stderr."""
    import socket
    from remote_runner.mirror.streams import ChannelStream

    class Channel:
        closed = eof_received = False
        answers = [socket.timeout(), socket.timeout(), b"WARNING: late\n"]

        def recv_stderr(self, size):
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
    assert ChannelStream(Channel()).read_stderr(4096) == b"WARNING: late\n"
