"""Malformed input never gets past the checks that need no host.

Generated cases: a wrong type or a bad value in every component field,
control characters in names and paths, duplicate names, non-finite numbers,
broken muddlers and arg parsers, bad flags and exotic local files. Each case
must end with exactly one ``ERROR:`` line, the documented exit status, no
traceback, and without any host being contacted (the connection step is
replaced by one that records the attempt).
"""

from __future__ import annotations

import os
import textwrap
from typing import List, Tuple

import pytest

from remote_runner.cli import classic
from remote_runner.errors import EXIT_CONFIG, EXIT_COPY

GOOD = {
    "name": "'worker'",
    "host": "'h1'",
    "executable": "'/bin/sleep'",
    "args": "['1']",
    "files": "{}",
    "base_dir": "None",
    "start_index": "1",
    "wait": "False",
    "mirror": "False",
    "num_cores": "None",
}

#: (field, python expression) pairs that must each be refused.
BAD_FIELDS: List[Tuple[str, str]] = [
    *[("name", v) for v in ("None", "1", "''", "'a/b'", "'a\\nb'", "'a\\x1b[31m'", "'a\\x00b'",
                            "['x']", "b'x'")],
    *[("host", v) for v in ("None", "3", "''", "'-oProxyCommand=x'", "'a b'", "'a;touch /tmp/x'",
                            "'$(id)'", "'a`id`'", "'a\\nb'", "'h1\\x00'", "'a|b'", "'u;x@h1'",
                            "'h1:0'", "'h1:99999'", "'h1:x'", "'[::1'")],
    *[("executable", v) for v in ("None", "''", "5", "'a\\nb'", "'\\x1b]0;x\\x07'", "['x']")],
    *[("args", v) for v in ("'x'", "None", "[None]", "[True]", "[b'x']", "[['x']]", "['a\\x00']",
                            "{'a': 1}")],
    *[("files", v) for v in ("None", "['x']", "{'': 'x'}", "{'x': ''}", "{'x': None}",
                             "{'missing-file': 'x'}", "{'x\\ny': 'z'}", "{'data': 'a\\nb'}",
                             "{'data': 'a\\x1bb'}")],
    *[("base_dir", v) for v in ("'relative'", "''", "5", "'/tmp/a\\nb'", "'/tmp/\\x1b[2J'",
                                "['/tmp']")],
    *[("start_index", v) for v in ("None", "'1'", "float('nan')", "True", "[1]")],
    *[("wait", v) for v in ("None", "1", "'yes'")],
    *[("mirror", v) for v in ("None", "0", "'no'")],
    *[("num_cores", v) for v in ("0", "-1", "1.5", "'2'", "True")],
    *[("export", v) for v in ("'/tmp'", "None", "[5]", "['']", "['/tmp/a\\nb']", "['/tmp']")],
]

BAD_CONFIGS = {
    "unknown_field": "c.nmae = 'x'",
    "positional_component": "Component('x')",
    "duplicate_names": "config.add_component(c)",
    "base_exception": "class Boom(BaseException):\n    pass\nraise Boom('no')",
    "system_exit": "import sys\nsys.exit(3)",
    "syntax_error": "def (:",
    "rebinds_config": "config = 5",
    "add_non_component": "config.add_component(5)",
    "no_components": "config.clear_components()",
    "recursion": "def f():\n    return f()\nf()",
    "nul_byte_in_source": "x = 1\x00",
}

BAD_FLAGS = [
    ["--grace", "nan"], ["--grace", "inf"], ["--grace", "-1"], ["--grace", "0"],
    ["--connect-timeout", "nan"], ["--wait-timeout", "nan"], ["--wait-timeout", "-inf"],
    ["--settle", "nan"], ["--settle", "-1"], ["--forks", "0"], ["--forks", "x"], ["--screen", "a b"], ["--screen", "-x"],
    ["--screen", "a\nb"], ["--remote-done-dir", ""], ["--remote-done-dir", "/tmp/a\nb"],
    ["--remote-done-dir", "/tmp/$(id)"], ["--remote-done-dir", "/tmp/\x1b[2J"],
    ["-l", "LOUD"], ["--no-such-flag"], ["-a", "missing-parser.py", "--extra-args", "x"],
    ["-m", "missing-muddler.py"], ["-c", "missing-config.py"],
]

BAD_MUDDLERS = {
    "no_function": "x = 1",
    "wrong_signature": "def muddle():\n    pass",
    "raises": "def muddle(config):\n    raise ValueError('bad muddle')",
    "base_exception": "class B(BaseException):\n    pass\ndef muddle(config):\n    raise B()",
    "returns_garbage": "def muddle(config):\n    return 5",
    "bad_component": "def muddle(config):\n    for c in config.all_components():\n"
                     "        c.host = 'a;b'",
}

BAD_PARSERS = {
    "no_function": "x = 1",
    "raises": "def parse_args(extra, user):\n    raise KeyError('k')",
    "exits": "def parse_args(extra, user):\n    import sys\n    sys.exit(2)",
}


def config_text(**override: str) -> str:
    fields = dict(GOOD, **override)
    lines = ["c = Component()"] + [f"c.{k} = {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\nconfig.add_component(c)\n"


@pytest.fixture
def attempt(monkeypatch, tmp_path, capfd):
    """Run the classic CLI in-process; return (exit status, stderr, hosts contacted)."""
    contacted: List[str] = []

    def no_connect(hosts, *_args, **_kw):
        contacted.extend(hosts)
        raise AssertionError("a host was contacted")

    import remote_runner.ssh as ssh_module
    monkeypatch.setattr(ssh_module, "connect_all", no_connect)
    monkeypatch.setattr(ssh_module, "connect_some", no_connect)
    (tmp_path / "data").write_text("data\n")
    monkeypatch.chdir(tmp_path)

    def run(config: str, *flags: str) -> Tuple[int, str, List[str]]:
        path = tmp_path / "experiment.py"
        path.write_text(config)
        argv = ["-c", str(path), *flags] if "-c" not in flags else list(flags)
        try:
            status = classic.main(argv)
        except SystemExit as exc:  # argparse
            status = exc.code
        return status, capfd.readouterr().err, list(contacted)

    return run


def assert_refused(result, status=EXIT_CONFIG):
    code, err, contacted = result
    assert contacted == [], f"host contacted for: {err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, err
    assert code == status, err
    return errors[0]


def test_the_good_config_reaches_the_connection_step(attempt):
    code, err, contacted = attempt(config_text())
    assert contacted == ["h1"]  # so the control really would notice a contact


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v}" for f, v in BAD_FIELDS])
def test_a_bad_field_is_refused_naming_it(attempt, field, value):
    expected = EXIT_COPY if field == "files" and "missing" in value else EXIT_CONFIG
    line = assert_refused(attempt(config_text(**{field: value})), expected)
    assert "experiment.py:" in line
    assert f"'{field}'" in line or field in line
    assert "\x1b" not in line and "\x00" not in line  # shown escaped


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_a_broken_config_is_refused(attempt, name):
    body = BAD_CONFIGS[name]
    text = body + "\n" if name in ("syntax_error", "nul_byte_in_source") else \
        config_text() + textwrap.dedent(body) + "\n"
    assert "experiment.py" in assert_refused(attempt(text))


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=[" ".join(f) for f in BAD_FLAGS])
def test_a_bad_flag_is_refused(attempt, flags):
    expected = EXIT_COPY if False else EXIT_CONFIG
    assert_refused(attempt(config_text(), *flags), expected)


@pytest.mark.parametrize("name", sorted(BAD_MUDDLERS))
def test_a_broken_muddler_is_refused(attempt, tmp_path, name):
    (tmp_path / "muddler.py").write_text(BAD_MUDDLERS[name] + "\n")
    assert_refused(attempt(config_text(), "-m", str(tmp_path / "muddler.py")))


@pytest.mark.parametrize("name", sorted(BAD_PARSERS))
def test_a_broken_arg_parser_is_refused(attempt, tmp_path, name):
    (tmp_path / "parser.py").write_text(BAD_PARSERS[name] + "\n")
    assert_refused(attempt(config_text(), "-a", str(tmp_path / "parser.py"),
                           "--extra-args", "--x 1"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_source_is_refused(attempt, tmp_path):
    (tmp_path / "data").chmod(0)
    assert_refused(attempt(config_text(files="{'data': 'data'}")), EXIT_COPY)


def test_a_fifo_inside_a_source_directory_is_refused_at_the_components_files(attempt, tmp_path):
    (tmp_path / "tree").mkdir()
    os.mkfifo(tmp_path / "tree" / "pipe")
    line = assert_refused(attempt(config_text(host="'h2'", files="{'tree': 'tree'}")), EXIT_COPY)
    assert "field 'files'" in line and "pipe" in line and "experiment.py:" in line


def test_an_unreadable_directory_inside_a_source_is_refused(attempt, tmp_path):
    (tmp_path / "tree" / "closed").mkdir(parents=True)
    (tmp_path / "tree" / "closed" / "f").write_text("x")
    (tmp_path / "tree" / "closed").chmod(0)
    try:
        if os.geteuid() == 0:
            pytest.skip("root reads every directory")
        assert_refused(attempt(config_text(files="{'tree': 'tree'}")), EXIT_COPY)
    finally:
        (tmp_path / "tree" / "closed").chmod(0o755)
