"""YAML experiments: groups, vars, on/count expansion, errors at YAML lines, the Python twin."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from remote_runner import plan
from remote_runner.loader import load_experiment
from remote_runner.errors import ConfigError
from remote_runner.runner import RunOptions
from remote_runner.ssh import SSHOptions
from tests.conftest import quit_screen, ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
MUDDLER = os.path.join(REPO, "muddlers", "ta3_muddler.py")
ARG_PARSER = os.path.join(EXAMPLES, "demo_arg_parser.py")


def write(tmp_path, text, name="experiment.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def local_plan(config, muddler=None, arg_parser=None, extra_args=None, tmp_path=None):
    """The --no-connect plan of *config* as a dict, without the config file's own name."""
    options = argparse.Namespace(ssh_user=None)
    experiment = load_experiment(config, options, muddler, arg_parser, extra_args)
    empty = os.path.join(str(tmp_path), "empty_ssh_config")
    open(empty, "w").close()
    document = plan.build(experiment, RunOptions(), SSHOptions(ssh_config_file=empty),
                          connect=False).to_dict()
    del document["config_file"]
    return document


@pytest.mark.parametrize("muddler", [None, MUDDLER])
def test_yaml_twin_of_the_example_gives_the_same_plan(tmp_path, muddler, monkeypatch):
    for name in ("RR_DEMO_HOSTS", "RR_DEMO_SERVER_ADDR", "RR_DEMO_PORT", "RR_DEMO_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    python = local_plan(os.path.join(EXAMPLES, "experiment.py"), muddler, tmp_path=tmp_path)
    twin = local_plan(os.path.join(EXAMPLES, "experiment.yaml"), muddler, tmp_path=tmp_path)
    assert twin == python
    names = [w["name"] for h in twin["hosts"] for w in h["windows"]]
    assert sorted(names) == ["checker", "publisher-h2", "publisher-h3", "server",
                             "subscriber-h2", "subscriber-h3"]
    if muddler:  # the TA3 muddler wrapped the publishers in both
        publisher = [w for h in twin["hosts"] for w in h["windows"] if w["name"] == "publisher-h2"]
        assert publisher[0]["argv"][0] == "rr-ta3/ta3_harness.py"


def test_arg_parser_options_override_yaml_vars(tmp_path):
    document = local_plan(os.path.join(EXAMPLES, "experiment.yaml"), MUDDLER, ARG_PARSER,
                          "--port 6000 --server-addr 10.0.0.1", tmp_path=tmp_path)
    server = document["hosts"][0]["windows"][0]
    assert server["argv"][:4] == ["./pubsub.py", "broker", "--port", "6000"]
    subscriber = [w for h in document["hosts"] for w in h["windows"] if w["name"] == "subscriber-h2"]
    assert subscriber[0]["argv"][1:4] == ["subscribe", "10.0.0.1", "6000"]


def test_on_count_index_and_groups_expand(tmp_path):
    (tmp_path / "tool.sh").write_text("#!/bin/sh\n")
    config = write(tmp_path, """
        vars:
          tag: run7
        hosts:
          racks: rack[1-2]-n[1-2]
          extra: [gw, racks]
        components:
          - name: agent-{index}
            on: extra
            executable: /usr/bin/agent
            args: ["--id", "{tag}-{host}-{index}", "{index}", "{{literal}}"]
            files: {tool.sh: "tools/{tag}.sh"}
            start_index: "{index}"
          - name: worker-{index}
            host: gw
            count: 3
            executable: /bin/w
            start_index: 10
    """)
    experiment = load_experiment(config, None)
    specs = {(s.host, s.name): s for s in experiment.components}
    assert sorted(specs) == [("gw", "agent-1"), ("gw", "worker-1"), ("gw", "worker-2"),
                             ("gw", "worker-3"), ("rack1-n1", "agent-2"), ("rack1-n2", "agent-3"),
                             ("rack2-n1", "agent-4"), ("rack2-n2", "agent-5")]
    agent = specs[("rack1-n2", "agent-3")]
    assert agent.args == ("--id", "run7-rack1-n2-3", "3", "{literal}")
    assert agent.start_index == 3 and agent.files[0].dest == "tools/run7.sh"
    assert agent.origin.file == config and agent.origin.line == 7


def test_every_field_takes_variables(tmp_path):
    config = write(tmp_path, """
        vars:
          port: 5555
          settle: 2.5
        components:
          - name: server
            host: h1
            executable: /bin/server
            args: ["{port}"]
            ready: "tcp:{port}"
            env: {PORT: "{port}", "SEEN_{port}": "yes"}
            start_index: 0
          - name: client
            host: h2
            executable: /bin/client
            settle: "{settle}"
            results: ["out-{port}/*.json"]
            start_index: 1
          - name: worker-{index}
            host: h3
            count: "{copies}"
            executable: /bin/worker
            start_index: 2
    """.replace("settle: 2.5", "settle: 2.5\n          copies: 2"))
    specs = {s.name: s for s in load_experiment(config, None).components}
    assert specs["server"].ready == "tcp:5555" and specs["server"].settle is None
    assert dict(specs["server"].env) == {"PORT": "5555", "SEEN_5555": "yes"}
    assert specs["client"].settle == 2.5 and specs["client"].results == ("out-5555/*.json",)
    assert {"worker-1", "worker-2"} <= set(specs) and "worker-3" not in specs


@pytest.mark.parametrize("body, line, words", [
    ("components:\n  - name: a\n    host: h1\n    executabel: /bin/true\n    start_index: 1\n",
     4, "field 'executabel': unknown field 'executabel' (did you mean 'executable'?)"),
    ("components:\n  - name: a\n    host: h1\n    executable: /bin/true\n    args: ['{nope}']\n"
     "    start_index: 1\n", 5, "field 'args': unknown variable {nope}"),
    ("hosts:\n  g: h[3-1]\ncomponents:\n  - name: a\n    on: g\n", 2, "runs backwards"),
    ("components:\n  - name: a\n    name: b\n", 3, "duplicate key 'name' (first at line 2)"),
    ("components:\n  - name: a\n    host: [h1\n", 4, "YAML error"),
    ("components:\n  - name: a\n    host: h1\n    executable: /bin/true\n    start_index: soon\n",
     5, "field 'start_index': start_index must be a number"),
    ("hosts:\n  g: h[1-2]\ncomponents:\n  - name: a\n    host: g\n", 5, "use 'on: g'"),
    ("components:\n  - name: a\n    on: h[1-2]\n    count: 2\n", 4, "not both"),
    ("components:\n  - name: a\n    host: h1\n    count: 0\n", 4, "count must be a positive"),
    ("component:\n  - name: a\n", 1, "unknown top-level key 'component' (did you mean"),
    ("vars:\n  x: [1]\ncomponents: []\n", 2, "must be a string, number or boolean"),
    ("components:\n  - name: a\n    host: h1\n    executable: /bin/true\n    start_index: 1\n"
     "    files: {missing.txt: x}\n", 6, "local source 'missing.txt' does not exist"),
    ("!!python/object/apply:os.system ['true']\n", 1, "YAML error"),
    ("vars:\n  port: 1\ncomponents:\n  - name: a\n    host: h1\n    executable: /bin/true\n"
     "    args: [--port, {port}]\n    start_index: 1\n", 7,
     "field 'args': {port} without quotes is a YAML mapping, not a variable; write \"{port}\""),
    ("hosts:\n  clients: []\ncomponents:\n  - name: c-{host}\n    on: clients\n"
     "    executable: /bin/true\n    start_index: 1\n", 5, "group 'clients' has no hosts"),
    ("hosts:\n  clients: h[2-3]\ncomponents:\n  - name: c-{host}\n    on: client\n"
     "    executable: /bin/true\n    start_index: 1\n", 5, "(did you mean 'clients'?)"),
    ("components:\n  - name: worker\n    host: h2\n    count: 2\n    executable: /bin/true\n"
     "    start_index: 1\n", 2, "give each copy its own name ({index} or {host} in YAML"),
])
def test_errors_name_the_yaml_file_line_and_field(tmp_path, body, line, words):
    config = write(tmp_path, body)
    with pytest.raises(Exception) as info:
        load_experiment(config, None)
    message = str(info.value)
    assert message.startswith(f"{config}:{line}: "), message
    assert words in message


def test_yaml_error_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    config = write(tmp_path, "components:\n  - name: a\n    on: h[1-\n")
    out = subprocess.run([sys.executable, "-m", "remote_runner", "run", "-c", config, "--dry-run"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2
    assert f"{config}:3: component 'a', field 'on': unclosed '['" in out.stderr
    assert "Traceback" not in out.stderr


def test_yaml_experiment_runs_on_lab_hosts(lab, tmp_path, screen_name):
    base = f"/tmp/{screen_name}-base"
    config = write(tmp_path, f"""
        vars:
          greeting: hello
        hosts:
          all: h[1-3]
        components:
          - name: say-{{host}}
            on: all
            executable: /bin/sh
            args: ["-c", "echo {{greeting}} from {{index}} > out-{{host}}.txt"]
            base_dir: {base}
            start_index: 1
            wait: true
    """)
    try:
        out = subprocess.run([sys.executable, "-m", "remote_runner", "run", "-F", lab.ssh_config,
                              "-c", config, "--screen", screen_name], capture_output=True,
                             text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr
        for index, host in enumerate(("h1", "h2", "h3"), 1):
            assert ssh(lab, host, f"cat {base}/out-{host}.txt").stdout == f"hello from {index}\n"
    finally:
        for host in ("h1", "h2", "h3"):
            quit_screen(lab, host, screen_name, base, f"~/.remote-runner/{screen_name}")


def test_an_alias_bomb_or_a_data_file_gets_a_short_error_at_once(tmp_path):
    """A 500-byte document of nested aliases (a 10^8-item list) and a data file given to -c:
    each is one short error, not gigabytes of message or minutes of parsing."""
    nested = "[lol" + ", lol" * 9 + "]"
    for i in range(8):
        nested = f"[&a{i} {nested}" + f", *a{i}" * 9 + "]"
    bomb = write(tmp_path, "components:\n  - name: a\n    host: h1\n    executable: /bin/true\n"
                           f"    start_index: 1\n    args: [{nested}]\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(bomb, None)
    assert len(str(info.value)) < 2000 and "field 'args'" in str(info.value)
    big = tmp_path / "data.yaml"
    big.write_text("- [1, 2, 3]\n" * 500000)  # ~6 MB
    with pytest.raises(ConfigError, match="not an experiment file"):
        load_experiment(str(big), None)


def test_a_merge_key_entry_overrides_what_it_merges_but_not_itself(tmp_path):
    config = write(tmp_path, """
        components:
          - &base
            name: a
            host: h1
            executable: /bin/true
            start_index: 1
          - <<: *base
            name: b
            start_index: 2
    """)
    specs = {s.name: s for s in load_experiment(config, None).components}
    assert (specs["a"].start_index, specs["b"].start_index) == (1, 2)
    assert specs["b"].host == "h1" and specs["b"].executable == "/bin/true"
    twice = write(tmp_path, "components:\n  - &base\n    name: a\n    host: h1\n"
                            "    executable: /bin/true\n    start_index: 1\n"
                            "  - <<: *base\n    name: b\n    name: c\n", "twice.yaml")
    with pytest.raises(ConfigError, match="duplicate key 'name' \\(first at line 8\\)"):
        load_experiment(twice, None)
