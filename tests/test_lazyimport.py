"""The deferred import of paramiko's ``invoke``: not loaded by a run, real when used."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=True, timeout=120).stdout.strip()


def test_importing_the_runner_and_paramiko_does_not_load_invoke():
    out = _python("""
        import sys
        import remote_runner.runner, remote_runner.ssh, paramiko
        print(sorted(m for m in ("invoke.tasks", "unittest.mock") if m in sys.modules))
    """)
    assert out == "[]"


def test_an_ssh_config_match_exec_still_runs_through_the_real_invoke(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text('Match exec "test -d /"\n    HostName matched.invalid\n'
                      'Match exec "test -d /no/such/dir"\n    User never\n')
    out = _python(f"""
        import sys
        import remote_runner.ssh, paramiko
        c = paramiko.SSHConfig.from_path({str(config)!r})
        found = c.lookup("anything")
        print(found["hostname"], found.get("user", "-"), "invoke.tasks" in sys.modules)
    """)
    assert out == "matched.invalid - True"


def test_paramiko_gets_its_version_without_importlib_metadata_and_the_real_module_still_works():
    out = _python("""
        import sys
        import remote_runner.runner, remote_runner.ssh, paramiko
        before = "email.parser" in sys.modules
        import importlib.metadata
        real = importlib.metadata.version("paramiko")  # the stand-in asks nothing of the real module
        names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
        print(before, paramiko.__version__ == real, "paramiko" in names,
              "email.parser" in sys.modules, importlib.metadata.PackageNotFoundError.__name__)
    """)
    assert out == "False True True True PackageNotFoundError"


def test_a_version_without_a_dist_info_directory_comes_from_the_real_module(tmp_path, monkeypatch):
    from remote_runner import lazyimport
    site = tmp_path / "site"
    (site / "Some_Pkg-2.3.4.dist-info").mkdir(parents=True)
    (site / "other-1.0.dist-info").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(site)])
    assert lazyimport.dist_info_version("some-pkg") == "2.3.4"
    assert lazyimport.dist_info_version("some.pkg") == "2.3.4"
    assert lazyimport.dist_info_version("absent") is None
