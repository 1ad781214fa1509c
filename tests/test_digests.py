"""Unit tests of the one test every module applies to a SHA-1 it did not compute."""

from __future__ import annotations

import hashlib

from remote_runner.digests import is_sha1


def test_only_forty_lowercase_hex_digits_are_a_sha1():
    good = hashlib.sha1(b"x").hexdigest()
    assert is_sha1(good)
    for bad in (good.upper(), good[:-1], good + "0", good + "\n", " " + good, "g" * 40, "", None, 40,
                good.encode(), [good]):
        assert not is_sha1(bad), bad
