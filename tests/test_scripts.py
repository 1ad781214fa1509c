"""The README's two set-up commands, and how the scripts get root (with or without sudo)."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_ROOT = os.path.join(ROOT, "scripts", "as-root.sh")


def first_code_block(path):
    text = open(path).read()
    match = re.search(r"```sh\n(.*?)```", text, re.S)
    assert match, "README has no sh block"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.strip()]


def test_readme_starts_with_two_setup_commands_that_need_no_sudo():
    commands = first_code_block(os.path.join(ROOT, "README.md"))
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for command in commands:
        script = os.path.join(ROOT, command.split()[1])
        text = open(script).read()
        # as-root.sh is sourced before anything else happens
        assert text.index('. "$(dirname "$0")/as-root.sh"') < text.index("bash scripts/setup.sh")


@pytest.fixture
def sandbox():
    """A world-readable directory with a copy of as-root.sh, a probe script and a PATH dir."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    top = tempfile.mkdtemp(prefix="rr-asroot-")
    os.chmod(top, 0o755)
    shutil.copy(AS_ROOT, os.path.join(top, "as-root.sh"))
    probe = os.path.join(top, "probe.sh")
    with open(probe, "w") as handle:
        handle.write('#!/bin/bash\nset -eu\n. "$(dirname "$0")/as-root.sh"\necho "ran as $(id -u): $*"\n')
    bindir = os.path.join(top, "bin")
    os.mkdir(bindir)
    for tool in ("bash", "id", "readlink", "basename", "dirname", "cat"):  # no sudo among them
        os.symlink(shutil.which(tool), os.path.join(bindir, tool))
    for name in os.listdir(top):
        os.chmod(os.path.join(top, name), 0o755)
    try:
        yield top, probe, bindir
    finally:
        shutil.rmtree(top)


def run_probe(probe, bindir, user=None):
    prefix = [] if user is None else [shutil.which("setpriv"), f"--reuid={user}", f"--regid={user}",
                                      "--clear-groups"]
    return subprocess.run(prefix + ["/bin/bash", probe, "a b", "c"], capture_output=True,
                          text=True, env={"PATH": bindir}, timeout=60)


def test_root_without_sudo_goes_straight_on(sandbox):
    _top, probe, bindir = sandbox
    out = run_probe(probe, bindir)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ran as 0: a b c\n"


def test_other_user_without_sudo_gets_a_clear_error(sandbox):
    _top, probe, bindir = sandbox
    out = run_probe(probe, bindir, user="65534")
    assert out.returncode == 1
    assert "probe.sh: must run as root" in out.stderr and "sudo is not installed" in out.stderr
    assert "ran as" not in out.stdout


def test_other_user_with_sudo_reruns_the_script_through_it(sandbox):
    top, probe, bindir = sandbox
    fake = os.path.join(bindir, "sudo")  # records how it was called instead of elevating
    with open(fake, "w") as handle:
        handle.write('#!/bin/bash\nfor a in "$@"; do echo "arg=$a"; done\n')
    os.chmod(fake, 0o755)
    out = run_probe(probe, bindir, user="65534")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["arg=bash", f"arg={probe}", "arg=a b", "arg=c"]
