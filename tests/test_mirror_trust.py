"""The host is not trusted: what the mirror runs and serves is checked on this side.

Lab tests alter what a host keeps (the cached agent) and check that the local
side notices, says so and repairs it rather than running it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from remote_runner.mirror.bundle import BOOT, CACHE_DIR, build_bundle
from tests.conftest import ssh
from tests.test_mirror_lab import rr_exec

pytestmark = pytest.mark.lab


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


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
