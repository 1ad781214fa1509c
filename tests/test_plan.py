"""``--dry-run``: the plan on stdout (text and JSON), read-only, secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import jsonschema
import pytest

from remote_runner.plan import mask_args
from remote_runner.schemas import PLAN_SCHEMA
from tests.conftest import ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")


def cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "REMOTE_RUNNER_PASSWORD"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, env=full_env, cwd=REPO)


def test_mask_args_hides_values_of_secret_flags_and_known_secrets():
    argv = ["./app", "--password", "hunter2", "--token=abc", "db_pass=x", "--port", "5",
            "-p", "plain", "url=http://u:s3cret@h/", "--api-key", "k"]
    assert mask_args(argv, ["s3cret"]) == [
        "./app", "--password", "***", "--token=***", "db_pass=***", "--port", "5",
        "-p", "plain", "url=http://u:***@h/", "--api-key", "***"]


SSH_CONFIG = """\
Host gate
    HostName 192.0.2.1
    User jumper
    Port 2200
Host inner
    HostName 10.99.0.5
    User alice
    ProxyJump gate
Host plain
    HostName 198.51.100.7
    Port 2222
    UserKnownHostsFile {known}
"""


def test_local_plan_resolves_routes_and_contacts_nobody(tmp_path):
    known = tmp_path / "known_hosts"
    # A key recorded for [198.51.100.7]:2222 only: 'plain' is known, the others are not.
    known.write_text("[198.51.100.7]:2222 ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    config_file = tmp_path / "ssh_config"
    config_file.write_text(SSH_CONFIG.format(known=known))
    (tmp_path / "app.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "app.sh", 0o755)
    experiment = tmp_path / "experiment.py"
    experiment.write_text(textwrap.dedent("""
        for host, index in (("inner", 1), ("plain", 2)):
            c = Component()
            c.name = "app-" + host
            c.host = host
            c.executable = "app.sh"
            c.args = ["--password", "hunter2", "--mode", "fast"]
            c.files = {"app.sh": "app.sh"}
            c.base_dir = "/srv/app"
            c.start_index = index
            c.wait = host == "plain"
            config.add_component(c)
    """))
    out = cli("-F", str(config_file), "-u", "bob", "-c", str(experiment), "--dry-run",
              "--no-connect", env={"REMOTE_RUNNER_PASSWORD": "pw-not-shown"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"plan for {experiment}",
        "  screen session 'runner' on every host (replaces the previous one), state in "
        "~/.remote-runner/runner",
        "  files checked on the hosts: no (--no-connect)",
        "",
        "inner  bob@10.99.0.5:22  host key unknown  via gate (jumper@192.0.2.1:2200, key unknown)",
        "  files: 1, would copy 0 (0 B)",
        "    ?    /srv/app/app.sh  (10 B, 0755)  not checked",
        "  window app-inner  index 1: ./app.sh --password '***' --mode fast  (in /srv/app)",
        "",
        "plain  bob@198.51.100.7:2222  host key known",
        "  files: 1, would copy 0 (0 B)",
        "    ?    /srv/app/app.sh  (10 B, 0755)  not checked",
        "  window app-plain  index 2 [wait]: ./app.sh --password '***' --mode fast  (in /srv/app)",
        "",
        "start order:",
        "  index 1: inner:app-inner",
        "  index 2: plain:app-plain",
        "",
        "dry run: nothing was started or changed",
    ]
    assert "hunter2" not in out.stdout + out.stderr and "pw-not-shown" not in out.stdout + out.stderr
    as_json = cli("-F", str(config_file), "-c", str(experiment), "--dry-run", "--no-connect",
                  "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    jsonschema.validate(document, PLAN_SCHEMA)
    inner = document["hosts"][0]
    assert inner["route"]["target"] == "alice@10.99.0.5:22"  # ssh_config's User without -u
    assert [j["target"] for j in inner["jumps"]] == ["jumper@192.0.2.1:2200"]
    assert document["order"] == [{"start_index": 1, "components": ["inner:app-inner"]},
                                 {"start_index": 2, "components": ["plain:app-plain"]}]


def test_no_connect_needs_dry_run(tmp_path):
    experiment = tmp_path / "e.py"
    experiment.write_text("c = Component(name='x', host='h1', executable='/bin/true', "
                          "start_index=1)\nconfig.add_component(c)\n")
    out = cli("-c", str(experiment), "--no-connect")
    assert out.returncode == 2 and "--no-connect" in out.stderr


def test_an_unusable_file_inside_a_copied_directory_is_named_at_its_files(tmp_path):
    """An editor's dangling lock link or a FIFO in a directory given to ``files``: exit 4 (as a
    missing source) at the component's ``files`` line, before any host is contacted."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.txt").write_text("ok\n")
    os.symlink("nobody@host.1234:1700000000", data / ".#notes.txt")  # as Emacs leaves them
    experiment = tmp_path / "e.py"
    experiment.write_text("c = Component(name='srv', host='h1', executable='/bin/true',\n"
                          "              start_index=1)\n"
                          "c.files = {'data': 'data'}\n"
                          "config.add_component(c)\n")
    out = cli("-c", str(experiment), "--dry-run", "--no-connect")
    assert out.returncode == 4, out.stderr
    assert f"{experiment}:3: component 'srv', field 'files'" in out.stderr
    assert ".#notes.txt" in out.stderr and "host" not in out.stderr.split("field 'files'")[0]


# --------------------------------------------------------------------------- on lab hosts

@pytest.fixture
def remote_dirs(lab):
    """A unique base directory name on the lab hosts, removed afterwards."""
    base = f"/tmp/rr-plan-{uuid.uuid4().hex[:10]}"
    yield base
    for host in ("h1", "h2", "h3"):
        ssh(lab, host, f"rm -rf {base}", check=False)


def test_plan_for_three_hosts_says_why_each_file_would_be_copied(lab, remote_dirs, tmp_path,
                                                                  screen_name):
    base = remote_dirs
    src = tmp_path / "src"
    src.mkdir()
    contents = {"missing.txt": "new\n", "size.txt": "longer now\n", "hash.txt": "abcd\n",
                "mode.txt": "same\n", "same.txt": "unchanged\n"}
    for name, text in contents.items():
        (src / name).write_text(text)
        os.chmod(src / name, 0o644)
    # h1 gets size.txt shorter, hash.txt with other bytes of the same size, mode.txt 0600,
    # same.txt identical; missing.txt is not there. h2 has nothing (its base_dir is missing).
    ssh(lab, "h1", f"mkdir -p {base} && cd {base} && printf short > size.txt && "
                   "printf 'wxyz\\n' > hash.txt && printf 'same\\n' > mode.txt && "
                   "chmod 600 mode.txt && printf 'unchanged\\n' > same.txt && chmod 644 *")
    ssh(lab, "h1", f"chmod 600 {base}/mode.txt")
    experiment = tmp_path / "experiment.py"
    experiment.write_text(textwrap.dedent(f"""
        files = {{"src/" + n: n for n in {sorted(contents)!r}}}
        a = Component(name="server", host="h1", executable="/bin/sleep", args=["600"],
                      files=files, base_dir={base!r}, start_index=1)
        config.add_component(a)
        b = Component(name="client", host="h2", executable="/bin/sleep", args=["600"],
                      files={{"src/missing.txt": "in/missing.txt"}}, base_dir={base!r},
                      start_index=2)
        config.add_component(b)
        c = Component(name="check", host="h3", executable="/bin/true",
                      files={{"src/same.txt": "same.txt"}}, start_index=3, wait=True)
        config.add_component(c)
        d = Component(name="viewer", host="h3", executable="/usr/bin/env", start_index=3,
                      mirror=True)
        config.add_component(d)
    """))
    out = cli("-F", lab.ssh_config, "-c", str(experiment), "--screen", screen_name, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"plan for {experiment}",
        f"  screen session '{screen_name}' on every host (replaces the previous one), state in "
        f"~/.remote-runner/{screen_name}",
        "  files checked on the hosts: yes",
        "",
        "h1  root@10.213.0.11:22  host key known",
        "  files: 5, would copy 4 (25 B)",
        f"    copy {base}/hash.txt  (5 B, 0644)  hash",
        f"    copy {base}/missing.txt  (4 B, 0644)  missing",
        f"    copy {base}/mode.txt  (5 B, 0644)  mode",
        f"    skip {base}/same.txt  (10 B, 0644)  unchanged",
        f"    copy {base}/size.txt  (11 B, 0644)  size",
        "  window server  index 1: /bin/sleep 600  (in " + base + ")",
        "",
        "h2  root@10.213.0.12:22  host key known",
        "  files: 1, would copy 1 (4 B)",
        f"    copy {base}/in/missing.txt  (4 B, 0644)  missing",
        "  window client  index 2: /bin/sleep 600  (in " + base + ")",
        "",
        "h3  root@10.213.0.13:22  host key known",
        "  files: 1, would copy 1 (10 B)",
        "    copy /<temporary base_dir of check>/same.txt  (10 B, 0644)  "
        "missing (new temporary base_dir)",
        "  window check  index 3 [wait]: /bin/true  (in /<temporary base_dir of check>)",
        "  window viewer  index 3 [mirror]: /usr/bin/env  (in /<temporary base_dir of viewer>)",
        "",
        "start order:",
        "  index 1: h1:server",
        "  index 2: h2:client",
        "  index 3: h3:check, h3:viewer",
        "",
        "dry run: nothing was started or changed",
    ]
    # Nothing changed: h1's files are as they were, h2 got no directory, no session anywhere.
    listing = ssh(lab, "h1", f"cd {base} && stat -c '%n %s %a' *").stdout.split("\n")
    assert sorted(filter(None, listing)) == ["hash.txt 5 644", "mode.txt 5 600",
                                             "same.txt 10 644", "size.txt 5 644"]
    assert ssh(lab, "h2", f"test -e {base}", check=False).returncode == 1
    for host in ("h1", "h2", "h3"):
        sessions = ssh(lab, host, "screen -ls || true", check=False).stdout
        assert screen_name not in sessions
        assert ssh(lab, host, f"test -e ~/.remote-runner/{screen_name}", check=False).returncode == 1
    as_json = cli("-F", lab.ssh_config, "-c", str(experiment), "--screen", screen_name,
                  "--dry-run", "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    jsonschema.validate(document, PLAN_SCHEMA)
    reasons = {f["dest"]: f["reason"] for f in document["hosts"][0]["files"]}
    assert reasons[f"{base}/hash.txt"] == "hash" and reasons[f"{base}/same.txt"] == "unchanged"


def test_plan_names_an_unreachable_host_and_exits_3(lab, tmp_path):
    config_file = tmp_path / "ssh_config"
    config_file.write_text(open(lab.ssh_config).read() + "\nHost deadhost\n    HostName 10.213.0.250\n"
                           "    ConnectTimeout 2\n    StrictHostKeyChecking accept-new\n"
                           f"    UserKnownHostsFile {tmp_path}/kh\n")
    (tmp_path / "kh").write_text("10.213.0.250 ssh-ed25519 "
                                 "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    experiment = tmp_path / "experiment.py"
    experiment.write_text("c = Component(name='x', host='deadhost', executable='/bin/true', "
                          "base_dir='/tmp', files={'experiment.py': 'rr-never.py'}, "
                          "start_index=1)\nconfig.add_component(c)\n")
    out = cli("-F", str(config_file), "-c", str(experiment), "--dry-run")
    assert out.returncode == 3
    assert "deadhost  root@10.213.0.250:22  host key known" in out.stdout
    assert "  ! host deadhost: " in out.stdout
    assert "deadhost: could not check files" in out.stderr
