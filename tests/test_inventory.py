"""Host groups from Slurm allocations and Ansible inventories (--hosts-from), in configs and YAML."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from remote_runner import inventory
from remote_runner.loader import load_experiment
from remote_runner.errors import ConfigError
from tests.conftest import quit_screen, ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")

#: Recorded from a real allocation: `echo $SLURM_JOB_NODELIST` and `scontrol show hostnames`.
SLURM_NODELIST = "node[01-03,07],gpu-rack[1-2]-n[1-2]"
SCONTROL_HOSTNAMES = "node01\nnode02\nnode03\nnode07\ngpu-rack1-n1\ngpu-rack1-n2\n" \
                     "gpu-rack2-n1\ngpu-rack2-n2\n"
EXPECTED_SLURM = ["node01", "node02", "node03", "node07", "gpu-rack1-n1", "gpu-rack1-n2",
                  "gpu-rack2-n1", "gpu-rack2-n2"]

INI = """\
# site inventory
bastion.example ansible_user=ops

[servers]
h1

[clients]
client[01:03]
db-[a:b] ansible_host=10.0.0.9 ansible_port=2222 ansible_user=root
rack[1-2]-n[1-2]

[clients:vars]
foo=bar

[everything:children]
servers
clients
"""

YAML_INV = """\
all:
  hosts:
    bastion.example: {ansible_user: ops}
  children:
    servers:
      hosts:
        h1:
    clients:
      hosts:
        client[01:03]:
        db-a: {ansible_host: 10.0.0.9, ansible_port: 2222, ansible_user: root}
        db-b: {ansible_host: 10.0.0.9, ansible_port: 2222, ansible_user: root}
        rack[1-2]-n[1-2]:
    everything:
      children:
        servers:
        clients:
"""

#: What `ansible-inventory -i INI --list` prints for INI (recorded).
LIST_JSON = {
    "_meta": {"hostvars": {
        "bastion.example": {"ansible_user": "ops"},
        "db-a": {"ansible_host": "10.0.0.9", "ansible_port": 2222, "ansible_user": "root",
                 "foo": "bar"},
        "db-b": {"ansible_host": "10.0.0.9", "ansible_port": 2222, "ansible_user": "root",
                 "foo": "bar"}}},
    "all": {"children": ["ungrouped", "everything"]},
    "ungrouped": {"hosts": ["bastion.example"]},
    "everything": {"children": ["servers", "clients"]},
    "servers": {"hosts": ["h1"]},
    "clients": {"hosts": ["client01", "client02", "client03", "db-a", "db-b", "rack1-n1",
                          "rack1-n2", "rack2-n1", "rack2-n2"]},
}

CLIENTS = ["client01", "client02", "client03", "root@10.0.0.9:2222", "rack1-n1", "rack1-n2",
           "rack2-n1", "rack2-n2"]


def test_slurm_from_the_environment_and_from_recorded_scontrol_output(tmp_path):
    groups = inventory.load(["slurm"], environ={"SLURM_JOB_NODELIST": SLURM_NODELIST})
    assert groups["slurm"] == EXPECTED_SLURM
    assert groups["all"] == EXPECTED_SLURM
    recorded = tmp_path / "hostnames.txt"
    recorded.write_text(SCONTROL_HOSTNAMES)
    assert inventory.load([f"slurm:{recorded}"], environ={})["slurm"] == EXPECTED_SLURM


def test_slurm_without_an_allocation_says_what_to_do():
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST is not set.*slurm:FILE"):
        inventory.load(["slurm"], environ={})


@pytest.mark.parametrize("kind", ["ini", "yaml", "json"])
def test_ansible_inventories_give_the_same_groups(tmp_path, kind):
    text = {"ini": INI, "yaml": YAML_INV, "json": json.dumps(LIST_JSON)}[kind]
    path = tmp_path / f"inventory.{kind}"
    path.write_text(text)
    groups = inventory.load([f"ansible:{path}"], environ={})
    assert groups["servers"] == ["h1"]
    assert groups["clients"] == list(dict.fromkeys(CLIENTS))
    assert groups["everything"] == ["h1"] + list(dict.fromkeys(CLIENTS))
    assert set(groups["all"]) == {"ops@bastion.example", "h1", *CLIENTS}


def test_several_sources_add_up_and_unknown_groups_name_the_known_ones(tmp_path):
    path = tmp_path / "inv.ini"
    path.write_text(INI)
    plain = tmp_path / "spares.txt"
    plain.write_text("# spare nodes\nspare[1-2]\nspare9, node01\n")
    groups = inventory.load(["slurm", f"ansible:{path}", str(plain)],
                            environ={"SLURM_JOB_NODELIST": "node[01-02]"})
    assert groups["spares"] == ["spare1", "spare2", "spare9", "node01"]
    assert groups["all"][:2] == ["node01", "node02"]
    assert "spare9" in groups["all"] and "h1" in groups["all"]
    with pytest.raises(KeyError, match="no host group 'web'.*'slurm'"):
        groups["web"]


@pytest.mark.parametrize("text, message", [
    ("[web]\nweb[05:01]\n", "empty or larger"),
    ("[web]\nweb[1:x]\n", "bad range"),
    ("[web]\nh1 novalue\n", "expected key=value"),
    ("[web:kids]\nh1\n", "unknown section kind"),
    ("[a:children]\nb\n[b:children]\na\n", "contains itself"),
    # JSON and YAML a hand or a script got wrong: an error naming what, never a traceback
    ('{"web": {"hosts": [{"name": "web1"}]}}', "'hosts' must be a list of names"),
    ('{"web": {"hosts": "web1"}}', "'hosts' must be a list of names, got 'web1'"),
    ('{"_meta": "x", "web": ["web1"]}', "'_meta' must be an object"),
    ('{"_meta": {"hostvars": {"web1": "x"}}, "web": ["web1"]}', "variables of host 'web1'"),
    ('{"prod": {"children": "web"}}', "'children' must be a list of names"),
    ("prod:\n  children: web\n", "'children' must map group names"),
    ("web:\n  hosts:\n    - [a, b]\n", "a host in 'hosts' must be a name"),
    ("[web\nweb1\n", "unclosed section header"),
])
def test_bad_inventories_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "inv.ini"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        inventory.load([f"ansible:{path}"], environ={})
    assert str(path) in str(info.value)


def test_a_host_that_cannot_be_a_destination_is_named_at_its_line_and_blocks_only_its_use(
        tmp_path, caplog):
    path = tmp_path / "inv.ini"
    path.write_text("[web]\nweb1 ansible_port=22x\nweb2 ansible_user='{{ vault_user }}'\n"
                    "[db]\ndb1\n")
    groups = inventory.load([f"ansible:{path}"], environ={})
    assert groups["db"] == ["db1"]  # an unused bad host does not stop the inventory
    assert f"{path}:2: host 'web1': ansible_port='22x' is not a port" in caplog.text
    assert f"{path}:3: host 'web2': ansible_user=" in caplog.text


def test_a_yaml_group_may_list_hosts_as_one_host_mappings(tmp_path):
    path = tmp_path / "inv.yml"
    path.write_text("web:\n  hosts:\n    - web1: {ansible_host: 10.0.0.1}\n    - web2\n")
    assert inventory.load([f"ansible:{path}"], environ={})["web"] == ["10.0.0.1", "web2"]


def test_unknown_source_is_a_usage_error():
    with pytest.raises(ConfigError, match="not a file, and not one of slurm"):
        inventory.load(["nowhere-to-be-found"], environ={})


def _load(config, groups):
    options = argparse.Namespace(ssh_user=None, host_groups=groups)
    return load_experiment(str(config), options)


def test_python_and_yaml_configs_see_the_groups(tmp_path):
    groups = inventory.load(["slurm"], environ={"SLURM_JOB_NODELIST": "node[1-3]"})
    py = tmp_path / "exp.py"
    py.write_text(textwrap.dedent("""
        for h in hosts["slurm"]:
            c = Component(name="probe", host=h, executable="/bin/true", start_index=1)
            config.add_component(c)
        assert hosts["all"] == ["node1", "node2", "node3"]
    """))
    assert [c.host for c in _load(py, groups).components] == ["node1", "node2", "node3"]
    yml = tmp_path / "exp.yaml"
    yml.write_text(textwrap.dedent("""
        hosts:
          first: node1
        components:
          - name: probe-{index}
            on: slurm
            executable: /bin/true
            start_index: 1
          - name: lead
            host: first
            executable: /bin/true
            start_index: 1
    """))
    specs = _load(yml, groups).components
    assert [(c.name, c.host) for c in specs] == [("probe-1", "node1"), ("probe-2", "node2"),
                                                 ("probe-3", "node3"), ("lead", "node1")]


def test_an_unknown_group_in_a_python_config_fails_at_its_line(tmp_path):
    py = tmp_path / "exp.py"
    py.write_text('\nfor h in hosts["clients"]:\n    pass\n')
    with pytest.raises(ConfigError) as info:
        _load(py, inventory.HostGroups())
    assert "exp.py:2" in str(info.value) and "no host group 'clients'" in str(info.value)


def test_a_node_set_as_host_is_an_error_suggesting_a_loop(tmp_path):
    py = tmp_path / "exp.py"
    py.write_text('c = Component(name="c", executable="/bin/true", start_index=1)\n'
                  'c.host = "client[1-8]"\nconfig.add_component(c)\n')
    with pytest.raises(ConfigError) as info:
        _load(py, inventory.HostGroups())
    text = str(info.value)
    assert "exp.py:2" in text and "field 'host'" in text
    assert "set of 8 hosts" in text and 'for h in hosts["clients"]' in text


# --------------------------------------------------------------------------- lab

def test_run_on_hosts_from_an_ansible_inventory_and_slurm(lab, screen_name, tmp_path):
    """Real run: the Ansible group `clients` and the Slurm allocation drive the components."""
    inv = tmp_path / "site.ini"
    inv.write_text("[servers]\nh1\n\n[clients]\nh[2-3]\n")
    state = f"/tmp/{screen_name}-state"
    config = tmp_path / "exp.yaml"
    config.write_text(textwrap.dedent("""
        components:
          - name: client-{index}
            on: clients
            executable: /bin/sh
            args: [-c, "hostname > /tmp/{name}-out"]
            start_index: 1
            wait: true
          - name: node-{index}
            on: slurm
            executable: /bin/true
            start_index: 1
            wait: true
    """).replace("{name}", screen_name))
    env = dict(os.environ, SLURM_JOB_NODELIST="h[1,3]")
    env.pop("REMOTE_RUNNER_PASSWORD", None)
    try:
        out = subprocess.run(
            [sys.executable, SCRIPT, "-c", str(config), "-F", lab.ssh_config,
             "--screen", screen_name, "--remote-done-dir", state,
             "--hosts-from", f"ansible:{inv}", "--hosts-from", "slurm"],
            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert out.returncode == 0, out.stderr
        for host in ("h2", "h3"):
            assert ssh(lab, host, f"cat /tmp/{screen_name}-out").stdout.strip() != ""
        assert ssh(lab, "h1", f"test -e /tmp/{screen_name}-out", check=False).returncode != 0
        for host in ("h1", "h3"):
            assert ssh(lab, host, f"cat {state}/latest/node-*.status").stdout.strip() == "0"
    finally:
        for host in ("h1", "h2", "h3"):
            quit_screen(lab, host, screen_name, state, f"/tmp/{screen_name}-out")
