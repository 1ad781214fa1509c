"""Unit tests for muddlers, arg parsers, the TA3 muddler and harness, and the example experiment.

The harness and the demo programs are run for real as local processes (no SSH);
every process started here is waited for or killed by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

from remote_runner.loader import load_experiment
from remote_runner.errors import ConfigError
from remote_runner.muddle import load_extra_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TA3 = os.path.join(ROOT, "muddlers", "ta3_muddler.py")
HARNESS = os.path.join(ROOT, "examples", "harness", "ta3_harness.py")
PUBSUB = os.path.join(ROOT, "examples", "demo", "pubsub.py")
EXPERIMENT = os.path.join(ROOT, "examples", "experiment.py")
DEMO_PARSER = os.path.join(ROOT, "examples", "demo_arg_parser.py")

CONFIG = """
c = Component()
c.name = "comp"
c.host = "h1"
c.executable = "/bin/true"
c.start_index = 1
config.add_component(c)
"""


def write(directory, text: str, name: str) -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as handle:
        handle.write(textwrap.dedent(text).lstrip("\n"))
    return os.path.realpath(path)


def line_of(path: str, marker: str) -> int:
    with open(path) as handle:
        hits = [n for n, line in enumerate(handle, 1) if marker in line]
    assert len(hits) == 1
    return hits[0]


def options(**kwargs) -> argparse.Namespace:
    values = {"ssh_user": "alice"}
    values.update(kwargs)
    return argparse.Namespace(**values)


def load_with_muddler(tmp_path, muddler_text: str, config_text: str = CONFIG, **kwargs):
    config = write(tmp_path, config_text, "exp.py")
    muddler = write(tmp_path, muddler_text, "m.py")
    return load_experiment(config, options(), muddler_file=muddler, **kwargs), muddler


# ----------------------------------------------------------------------------- muddler loading

def test_one_argument_muddler_changes_config_in_place(tmp_path):
    exp, _ = load_with_muddler(tmp_path, """
def muddle(config):
    for c in config.all_components():
        c.args = list(c.args) + ["muddled"]
""")
    assert exp.components[0].args == ("muddled",)


def test_two_argument_muddler_gets_options(tmp_path):
    exp, _ = load_with_muddler(tmp_path, """
def muddle(config, options):
    for c in config.all_components():
        c.args = [options.ssh_user]
""")
    assert exp.components[0].args == ("alice",)


@pytest.mark.parametrize("signature, count, expected", [
    ("config, options=None", "1 if options is None else 2", "2"),
    ("*args", "len(args)", "2"),
    ("config, *rest", "1 + len(rest)", "2"),
    ("config", "1", "1"),
])
def test_muddler_called_by_signature(tmp_path, signature, count, expected):
    exp, _ = load_with_muddler(tmp_path, f"""
def muddle({signature}):
    cfg = args[0] if {signature!r} == "*args" else config
    for c in cfg.all_components():
        c.args = [str({count})]
""")
    assert exp.components[0].args == (expected,)


def test_muddler_namespace_and_cwd(tmp_path):
    (tmp_path / "cfg").mkdir()
    config = write(tmp_path / "cfg", CONFIG, "exp.py")
    muddler = write(tmp_path, """
import os
assert os.getcwd() == CONFIG_DIR_PLACEHOLDER, os.getcwd()
seen = [Component.__name__, util.__name__, options.ssh_user, repr(extra_options), __file__]

def muddle(config):
    assert os.getcwd() == CONFIG_DIR_PLACEHOLDER
    for c in config.all_components():
        c.args = seen + [localhost]
""".replace("CONFIG_DIR_PLACEHOLDER", repr(os.path.dirname(config))), "m.py")
    before = os.getcwd()
    exp = load_experiment(config, options(), muddler_file=muddler)
    assert os.getcwd() == before
    assert exp.components[0].args == ("Component", "remote_runner.util", "alice", "None", muddler,
                                      "localhost")


def test_muddler_adds_and_replaces_components_then_validation_runs(tmp_path):
    exp, _ = load_with_muddler(tmp_path, """
def muddle(config):
    old = list(config.all_components())
    config.clear_components()
    for n, c in enumerate(old * 2):
        c.name = "harnessed-%d" % n
        config.add_component(c)
""")
    assert [s.name for s in exp.components] == ["harnessed-0", "harnessed-1"]


def test_muddler_may_return_component_list(tmp_path):
    exp, _ = load_with_muddler(tmp_path, """
def muddle(config):
    new = Component(name="only", host="h9", executable="x", start_index=1)
    return [new]
""")
    assert [(s.name, s.host) for s in exp.components] == [("only", "h9")]


def test_muddler_fixes_an_invalid_config_before_validation(tmp_path):
    broken = CONFIG.replace('c.start_index = 1\n', '')
    exp, _ = load_with_muddler(tmp_path, """
def muddle(config):
    for c in config.all_components():
        c.start_index = 7
""", config_text=broken)
    assert exp.components[0].start_index == 7


def test_validation_error_in_muddler_points_at_muddler_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_with_muddler(tmp_path, """
def muddle(config):
    for c in config.all_components():
        c.wait = "yes"  # <err>
""")
    err = info.value
    muddler = os.path.realpath(str(tmp_path / "m.py"))
    assert (err.file, err.line, err.component, err.field) == (
        muddler, line_of(muddler, "# <err>"), "comp", "wait")


def test_unknown_attribute_in_muddler(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_with_muddler(tmp_path, """
def muddle(config):
    for c in config.all_components():
        c.arg = []  # <err>
""")
    muddler = os.path.realpath(str(tmp_path / "m.py"))
    assert (info.value.file, info.value.line) == (muddler, line_of(muddler, "# <err>"))
    assert "did you mean 'args'" in str(info.value)


def test_exception_inside_muddle_names_muddler_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_with_muddler(tmp_path, """
def muddle(config):
    raise RuntimeError("boom")  # <err>
""")
    muddler = os.path.realpath(str(tmp_path / "m.py"))
    assert (info.value.file, info.value.line) == (muddler, line_of(muddler, "# <err>"))
    assert "RuntimeError" in str(info.value) and "boom" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("x = 1\n", "does not define muddle()"),
    ("muddle = 3\n", "not a function"),
    ("def muddle():\n    pass\n", "unsupported signature"),
    ("def muddle(a, b, c):\n    pass\n", "unsupported signature"),
    ("def muddle(config, *, flag):\n    pass\n", "unsupported signature"),
    ("def muddle(config):\n    return 42\n", "returned a int"),
    ("def muddle(config)\n    pass\n", "SyntaxError"),
    ("def muddle(config):\n    config.clear_components()\n", "the muddler left no components"),
    ("def muddle(config):\n    return []\n", "the muddler left no components"),
])
def test_bad_muddlers_are_config_errors_naming_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_with_muddler(tmp_path, text)
    assert info.value.file == os.path.realpath(str(tmp_path / "m.py"))
    assert message in str(info.value)


def test_missing_muddler_file(tmp_path):
    config = write(tmp_path, CONFIG, "exp.py")
    with pytest.raises(ConfigError, match="muddler file does not exist"):
        load_experiment(config, options(), muddler_file=str(tmp_path / "none.py"))


# ----------------------------------------------------------------------------- arg parsers

PARSER = """
import argparse, shlex

def parse_args(extra_args, ssh_user):
    parser = argparse.ArgumentParser(prog="extra")
    parser.add_argument("-p")
    parser.add_argument("-t")
    ns = parser.parse_args(shlex.split(extra_args))
    ns.raw = extra_args
    ns.user = ssh_user
    return ns
"""


def test_extra_options_reach_config_and_muddler(tmp_path):
    parser = write(tmp_path, PARSER, "parser.py")
    config = write(tmp_path, CONFIG.replace("config.add_component(c)",
                                            "c.args = [extra_options.p, extra_options.t]\n"
                                            "config.add_component(c)"), "exp.py")
    muddler = write(tmp_path, "def muddle(config):\n"
                              "    for c in config.all_components():\n"
                              "        c.args.append(extra_options.user)\n", "m.py")
    exp = load_experiment(config, options(), muddler_file=muddler, arg_parser_file=parser,
                          extra_args="-p '-dash value' -t case7")
    assert exp.components[0].args == ("-dash value", "case7", "alice")
    assert exp.extra_options.raw == "-p '-dash value' -t case7", "parse_args gets ONE string"


def test_extra_args_token_list_is_joined_with_shell_quoting(tmp_path):
    parser = write(tmp_path, PARSER, "parser.py")
    result = load_extra_options(parser, ["-p", "-x y", "-t", "it's"], None)
    assert isinstance(result.raw, str)
    assert (result.p, result.t, result.user) == ("-x y", "it's", None)
    assert shlex.split(result.raw) == ["-p", "-x y", "-t", "it's"]


def test_one_without_the_other_is_an_error(tmp_path):
    parser = write(tmp_path, PARSER, "parser.py")
    assert load_extra_options(None, None, "u") is None
    with pytest.raises(ConfigError, match="--extra-args needs an arg parser"):
        load_extra_options(None, "-p 1", "u")
    config = write(tmp_path, CONFIG, "exp.py")
    with pytest.raises(ConfigError):
        load_experiment(config, options(), extra_args="-p 1")


def test_arg_parser_without_extra_args_warns_and_runs_with_empty_args(tmp_path, caplog):
    parser = write(tmp_path, PARSER, "parser.py")
    with caplog.at_level("WARNING"):
        assert load_extra_options(parser, None, "u").raw == ""
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert parser in warning and "without --extra-args" in warning


def test_empty_extra_args_still_runs_the_parser(tmp_path):
    parser = write(tmp_path, PARSER, "parser.py")
    assert load_extra_options(parser, "", "u").raw == ""


@pytest.mark.parametrize("text, message", [
    ("x = 1\n", "does not define parse_args()"),
    ("def parse_args(extra_args):\n    return 1\n", "must accept two arguments"),
    ("def parse_args(a, b):\n    import sys\n    sys.exit(1)  # <err>\n", "sys.exit(1)"),
])
def test_bad_arg_parsers(tmp_path, text, message):
    parser = write(tmp_path, text, "parser.py")
    with pytest.raises(ConfigError) as info:
        load_extra_options(parser, "", "u")
    assert info.value.file == parser and message in str(info.value)
    if "# <err>" in text:
        assert info.value.line == line_of(parser, "# <err>")


def test_argparse_rejection_is_a_config_error(tmp_path, capsys):
    parser = write(tmp_path, PARSER, "parser.py")
    with pytest.raises(ConfigError) as info:
        load_extra_options(parser, "--unknown-flag", "u")
    assert info.value.file == parser and "sys.exit(2)" in str(info.value)
    assert "unrecognized arguments" in capsys.readouterr().err


# ----------------------------------------------------------------------------- TA3 muddler

TA3_CONFIG = """
for name, host, exe in [("publisher-a", "h1", "bin/pub"), ("publisher-b", localhost, "bin/pub"),
                        ("subscriber", "h2", "/usr/bin/sub"), ("server", "h1", "srv"),
                        ("mypublisher", "h2", "/abs/p")]:
    c = Component()
    c.name = name
    c.host = host
    c.executable = exe
    c.args = ["--rate", 5, "two words"]
    c.start_index = 1
    config.add_component(c)
"""


def test_ta3_muddler_wraps_only_publishers(tmp_path, monkeypatch):
    config = write(tmp_path, TA3_CONFIG, "exp.py")
    monkeypatch.chdir("/")  # the harness is found relative to the muddler, not the cwd
    exp = load_experiment(config, options(), muddler_file=TA3)
    by_name = {s.name: s for s in exp.components}
    for name in ("subscriber", "server", "mypublisher"):
        assert by_name[name].args == ("--rate", "5", "two words"), name
        assert by_name[name].files == ()
    remote = by_name["publisher-a"]
    assert remote.executable == "rr-ta3/ta3_harness.py"
    assert [(f.src, f.dest) for f in remote.files] == [(HARNESS, "rr-ta3/ta3_harness.py")]
    assert remote.args == ("--name", "publisher-a", "--summary", "publisher-a.summary.json",
                           "--log", "publisher-a.harness.log", "--",
                           "./bin/pub", "--rate", "5", "two words")
    local = by_name["publisher-b"]
    assert local.executable == HARNESS and local.files == ()
    sep = local.args.index("--")
    assert local.args[sep + 1:] == (os.path.join(os.path.dirname(config), "bin", "pub"),
                                    "--rate", "5", "two words")


def test_ta3_wrapped_localhost_publisher_really_runs(tmp_path):
    script = tmp_path / "pub.sh"
    script.write_text("#!/bin/sh\necho \"publishing $1\"\necho oops >&2\nexit 4\n")
    script.chmod(0o755)
    config = write(tmp_path, """
c = Component()
c.name = "publisher-local"
c.host = localhost
c.executable = "pub.sh"
c.args = ["news item"]
c.start_index = 1
config.add_component(c)
""", "exp.py")
    (spec,) = load_experiment(config, options(), muddler_file=TA3).components
    workdir = tmp_path / "run"
    workdir.mkdir()
    done = subprocess.run([spec.executable, *spec.args], cwd=str(workdir), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 4
    assert re.search(r"^\S+Z \[publisher-local\] out\| publishing news item$", done.stdout, re.M)
    summary = json.loads((workdir / "publisher-local.summary.json").read_text())
    assert summary["exit_status"] == 4 and summary["lines"] == {"out": 1, "err": 1}
    log = (workdir / "publisher-local.harness.log").read_text()
    assert "[publisher-local] err| oops" in log


# ----------------------------------------------------------------------------- the harness itself

def run_harness(tmp_path, *command, extra=()):
    return subprocess.run([sys.executable, HARNESS, "--name", "t", "--summary",
                           str(tmp_path / "s.json"), *extra, "--", *command],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))


def test_harness_prefixes_output_and_propagates_status(tmp_path):
    done = run_harness(tmp_path, "/bin/sh", "-c", "echo one; echo two; echo bad >&2; exit 3",
                       extra=("--log", str(tmp_path / "h.log")))
    assert done.returncode == 3
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    lines = done.stdout.splitlines()
    assert re.fullmatch(stamp + r" \[t\] harness\| starting: /bin/sh -c .*", lines[0])
    body = [re.sub("^" + stamp + " ", "", line) for line in lines[1:-1]]
    # stdout and stderr are separate pipes: their lines keep their own order, not each other's.
    assert [line for line in body if "] out|" in line] == ["[t] out| one", "[t] out| two"]
    assert [line for line in body if "] err|" in line] == ["[t] err| bad"]
    assert all(re.match(stamp + " ", line) for line in lines)
    assert "exit status 3" in lines[-1]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["exit_status"] == 3 and summary["signal"] is None
    assert summary["command"][0] == "/bin/sh" and summary["lines"] == {"out": 2, "err": 1}
    assert summary["duration_s"] >= 0 and summary["name"] == "t"
    assert (tmp_path / "h.log").read_text().count("\n") == len(lines)


def test_harness_success_and_missing_program(tmp_path):
    assert run_harness(tmp_path, "/bin/sh", "-c", "exit 0").returncode == 0
    assert json.loads((tmp_path / "s.json").read_text())["exit_status"] == 0
    missing = run_harness(tmp_path, str(tmp_path / "no-such-program"))
    assert missing.returncode == 127
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["exit_status"] == 127 and "FileNotFoundError" in summary["error"]


def test_harness_reports_signal_death(tmp_path):
    done = run_harness(tmp_path, "/bin/sh", "-c", "kill -KILL $$")
    assert done.returncode == 128 + 9
    assert json.loads((tmp_path / "s.json").read_text())["signal"] == 9


def test_harness_forwards_sigterm(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, HARNESS, "--summary", str(tmp_path / "s.json"), "--",
                             "/bin/sh", "-c", f"touch {shlex.quote(str(ready))}; exec sleep 300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
    try:
        for line in proc.stdout:  # wait until the program runs (its start line, then the file)
            if b"starting:" in line:
                break
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        proc.terminate()
        assert proc.wait(timeout=60) == 128 + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads((tmp_path / "s.json").read_text())["signals_forwarded"] == [15]


# ----------------------------------------------------------------------------- example experiment

def test_example_experiment_defaults_with_ta3_muddler(monkeypatch):
    for name in ("RR_DEMO_HOSTS", "RR_DEMO_SERVER_ADDR", "RR_DEMO_PORT", "RR_DEMO_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    exp = load_experiment(EXPERIMENT, options(), muddler_file=TA3)
    assert exp.hosts() == ["h1", "h2", "h3"]
    stages = {s.name: s.start_index for s in exp.components}
    assert stages == {"server": 1, "subscriber-h2": 2, "subscriber-h3": 2, "publisher-h2": 3,
                      "publisher-h3": 3, "checker": 4}
    assert [s.name for s in exp.components if s.wait] == ["checker"]
    for spec in exp.components:
        assert not spec.is_local and spec.base_dir is None
        assert (PUBSUB, "pubsub.py") in [(f.src, f.dest) for f in spec.files], spec.name
        wrapped = spec.name.startswith("publisher")
        assert (spec.executable == "rr-ta3/ta3_harness.py") == wrapped
        assert spec.name == "server" or "h1" in spec.args, "clients reach the broker by the server's host name by default"


def test_example_experiment_settings_from_env_and_arg_parser(monkeypatch):
    monkeypatch.setenv("RR_DEMO_HOSTS", "a,b")
    monkeypatch.setenv("RR_DEMO_SERVER_ADDR", "10.9.9.9")
    exp = load_experiment(EXPERIMENT, options())
    assert exp.hosts() == ["a", "b"]
    assert all("10.9.9.9" in s.args for s in exp.components if s.name != "server")
    exp = load_experiment(EXPERIMENT, options(), arg_parser_file=DEMO_PARSER,
                          extra_args="--hosts x,y,z --server-addr 10.1.1.1 --port 6000 --messages 2")
    assert exp.hosts() == ["x", "y", "z"]
    checker = [s for s in exp.components if s.name == "checker"][0]
    assert checker.args == ("check", "10.1.1.1", "6000", "--published", "4", "--delivered", "8",
                            "--timeout", "300")


def test_demo_programs_work_together_locally(tmp_path):
    """Run broker, 2 subscribers, 2 publishers and the checker as local processes."""
    procs = []

    def start(*args, cwd=tmp_path):
        proc = subprocess.Popen([sys.executable, PUBSUB, *args], cwd=str(cwd),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    try:
        broker = start("broker", "--bind", "127.0.0.1", "--port", "0", "--lifetime", "600")
        port = re.search(r":(\d+)$", broker.stdout.readline().strip()).group(1)
        subs = []
        for n in (1, 2):
            (tmp_path / f"s{n}").mkdir()
            subs.append(start("subscribe", "127.0.0.1", port, "--expect", "6", "--timeout", "120",
                              cwd=tmp_path / f"s{n}"))
        pubs = [start("publish", "127.0.0.1", port, "--count", "3", "--from", f"pub{n}",
                      "--subscribers", "2", "--timeout", "120") for n in (1, 2)]
        checker = start("check", "127.0.0.1", port, "--published", "6", "--delivered", "12",
                        "--timeout", "120")
        for proc in pubs + subs + [checker]:
            assert proc.wait(timeout=180) == 0, proc.stdout.read()
        assert "OK: broker answered" in checker.stdout.read()
        for n in (1, 2):
            received = (tmp_path / f"s{n}" / "received.txt").read_text().splitlines()
            assert sorted(received) == sorted(f"MSG demo pub{p} #{i}" for p in (1, 2)
                                              for i in (1, 2, 3))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def test_demo_checker_fails_without_traffic(tmp_path):
    broker = subprocess.Popen([sys.executable, PUBSUB, "broker", "--bind", "127.0.0.1", "--port",
                               "0", "--lifetime", "600"], stdout=subprocess.PIPE, text=True)
    try:
        port = re.search(r":(\d+)$", broker.stdout.readline().strip()).group(1)
        done = subprocess.run([sys.executable, PUBSUB, "check", "127.0.0.1", port, "--published",
                               "1", "--delivered", "1", "--timeout", "0.5"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "FAILED" in done.stdout
    finally:
        broker.kill()
        broker.wait()
        broker.stdout.close()


# ----------------------------------------------------------------------------- on lab hosts

def ship(lab, host: str, local: str, remote: str) -> None:
    """Copy one local file to a lab host (mode 755) through the system ssh client."""
    from tests.conftest import ssh

    with open(local) as handle:
        text = handle.read()
    ssh(lab, host, f"mkdir -p {shlex.quote(os.path.dirname(remote))} && "
                   f"printf '%s' {shlex.quote(text)} > {shlex.quote(remote)} && "
                   f"chmod 755 {shlex.quote(remote)}")


@pytest.mark.lab
def test_demo_programs_and_harness_on_lab_hosts(lab, screen_name):
    """Broker on h1, subscriber on h2, harness-wrapped publisher and checker on h3 (only python3)."""
    from tests.conftest import ssh

    h1, h2, h3 = [h.name for h in lab.hosts[:3]]
    work = f"/tmp/{screen_name}"
    port = 20000 + int(screen_name[-4:], 16) % 20000
    for host in (h1, h2, h3):
        ship(lab, host, PUBSUB, f"{work}/pubsub.py")
    ship(lab, h3, HARNESS, f"{work}/rr-ta3/ta3_harness.py")
    pids = {}
    try:
        # { ...; } keeps the background job to python itself, so ssh returns at once.
        pids[h1] = ssh(lab, h1, f"cd {work} && {{ python3 pubsub.py broker --port {port} "
                                "--lifetime 300 </dev/null >broker.log 2>&1 & echo $!; }"
                       ).stdout.strip()
        pids[h2] = ssh(lab, h2, f"cd {work} && {{ python3 pubsub.py subscribe {h1} {port} "
                                "--expect 3 --timeout 120 </dev/null >sub.log 2>&1 & echo $!; }"
                       ).stdout.strip()
        pub = ssh(lab, h3, f"cd {work} && rr-ta3/ta3_harness.py --name publisher-{h3} --summary "
                           f"pub.json -- ./pubsub.py publish {h1} {port} --count 3 --from p "
                           "--subscribers 1 --timeout 120", check=False)
        assert pub.returncode == 0, pub.stdout + pub.stderr
        assert re.search(rf"Z \[publisher-{h3}\] out\| published p #3$", pub.stdout, re.M)
        summary = json.loads(ssh(lab, h3, f"cat {work}/pub.json").stdout)
        assert summary["exit_status"] == 0 and summary["host"] == h3
        check = ssh(lab, h3, f"cd {work} && python3 pubsub.py check {h1} {port} --published 3 "
                             "--delivered 3 --timeout 120", check=False)
        assert check.returncode == 0 and "OK: broker answered" in check.stdout, check.stdout
        # The subscriber exits by itself once it has all 3 messages.
        ssh(lab, h2, f"while kill -0 {pids[h2]} 2>/dev/null; do sleep 0.1; done")
        received = ssh(lab, h2, f"cat {work}/received.txt").stdout.splitlines()
        assert received == ["MSG demo p #1", "MSG demo p #2", "MSG demo p #3"]
    finally:
        for host in (h1, h2, h3):
            pid = pids.get(host, "")
            kill = f"kill {pid} 2>/dev/null; " if pid.isdigit() else ""
            ssh(lab, host, f"{kill}rm -rf {work}", check=False)
