"""SPAR users' files and habits, run unchanged on lab hosts.

Each test plays a user moving over from SPAR: their config, muddler and arg
parser as SPAR's campaigns wrote them, their command lines (``-a`` without
``--extra-args``, ``script -c "… -l WARNING"``, the password handed on to a
sudo helper), judged by exit code, ``LEVEL: message`` lines and what the
system OpenSSH client finds on the hosts afterwards.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from remote_runner import console, secrets
from remote_runner import screen as scr
from tests.conftest import quit_screen, ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")


def run_cli(*args, env=None, cwd=REPO, timeout=300):
    """Run remote_runner.py with *args* in *cwd*; return the CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("REMOTE_RUNNER_PASSWORD", "NO_COLOR")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def write(directory, name: str, body: str) -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as handle:
        handle.write(textwrap.dedent(body).lstrip("\n"))
    return path


def line_of(path: str, marker: str) -> int:
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if marker in line:
                return number
    raise AssertionError(f"{marker} not in {path}")


@pytest.fixture
def run_env(lab, screen_name, tmp_path):
    """Unique screen/state/base names on h1..h3; removed afterwards."""
    names = {"screen": screen_name, "state": f"/tmp/{screen_name}-state",
             "base": f"/tmp/{screen_name}-base", "tmp": tmp_path}
    yield names
    for host in ("h1", "h2", "h3"):
        quit_screen(lab, host, screen_name, names["state"], names["base"])
    subprocess.run(["sh", "-c", scr.quit_sessions_script(screen_name, 0) +
                    f"rm -rf {names['state']} {names['base']}"], check=False)


def lab_args(lab, names):
    return ["-F", lab.ssh_config, "--screen", names["screen"], "--remote-done-dir",
            names["state"]]


# --------------------------------------------------------------------------- -a without --extra-args

def test_arg_parser_without_extra_args_warns_and_runs_it(lab, run_env):
    parser = write(run_env["tmp"], "arg_parser.py", """
        import argparse
        def parse_args(extra_args, ssh_user):
            parser = argparse.ArgumentParser('campaign options')
            parser.add_argument('--mark', default='from-defaults')
            return parser.parse_args(extra_args.split())
    """)
    config = write(run_env["tmp"], "config.py", f"""
        c = Component()
        c.name = 'marker'
        c.host = 'h1'
        c.executable = '/bin/sh'
        c.args = ['-c', 'echo "$1" > {run_env["base"]}/mark', 'sh', extra_options.mark]
        c.base_dir = '{run_env["base"]}'
        c.start_index = 1
        c.wait = True
        config.add_component(c)
    """)
    out = run_cli("-c", config, "-a", parser, *lab_args(lab, run_env))
    assert out.returncode == 0, out.stderr
    assert f"WARNING: {parser}: an arg parser (-a) was given without --extra-args" in out.stderr
    assert ssh(lab, "h1", f"cat {run_env['base']}/mark").stdout.strip() == "from-defaults"


# --------------------------------------------------------------------------- recursive_files_dict

def test_recursive_files_dict_on_a_missing_directory_warns_and_copies_the_rest(lab, run_env):
    tmp = run_env["tmp"]
    os.makedirs(tmp / "queries")
    (tmp / "queries" / "q1").write_text("select 1\n")
    config = write(tmp, "config.py", f"""
        c = Component()
        c.name = 'client'
        c.host = 'h2'
        c.executable = '/bin/true'
        c.base_dir = '{run_env["base"]}'
        c.start_index = 1
        config.add_component(c)
    """)
    muddler = write(tmp, "muddler.py", """
        def muddle(config):
            for c in config.all_components():
                c.files.update(util.recursive_files_dict('queries', 'queries'))
                c.files.update(util.recursive_files_dict('mods', 'mods'))  # <missing>
    """)
    out = run_cli("-c", config, "-m", muddler, *lab_args(lab, run_env))
    assert out.returncode == 0, out.stderr
    line = line_of(muddler, "# <missing>")
    assert f"WARNING: {muddler}:{line}: recursive_files_dict: mods ({tmp / 'mods'}) does not exist" \
        in out.stderr
    assert ssh(lab, "h2", f"cat {run_env['base']}/queries/q1").stdout == "select 1\n"
    assert ssh(lab, "h2", f"test -e {run_env['base']}/mods", check=False).returncode != 0


# --------------------------------------------------------------------------- localhost's directory

def test_localhost_component_without_base_dir_runs_where_remote_runner_was_started(lab, run_env):
    """SPAR's configs give localhost components paths like ../../config/x.csv, relative to
    the directory remote_runner was started from (not the config's, not a temporary one)."""
    tmp = run_env["tmp"]
    os.makedirs(tmp / "cfg")
    os.makedirs(tmp / "campaign" / "scripts")
    (tmp / "campaign" / "metadata_schema.csv").write_text("fname,lname\n")
    config = write(tmp / "cfg", "config.py", f"""
        server = Component()
        server.name = 'server'
        server.host = 'localhost'
        server.executable = '/bin/sh'
        server.args = ['-c', 'cat "$1" > server-saw.txt; pwd >> server-saw.txt', 'sh',
                       '../metadata_schema.csv']
        server.start_index = 1
        server.wait = True
        config.add_component(server)
        client = Component()
        client.name = 'client'
        client.host = 'h1'
        client.executable = '/bin/sh'
        client.args = ['-c', 'pwd > {run_env["base"]}-client-dir']
        client.start_index = 2
        client.wait = True
        config.add_component(client)
    """)
    start = tmp / "campaign" / "scripts"
    dry = run_cli("-c", config, *lab_args(lab, run_env), "--dry-run", cwd=str(start))
    assert f"(in {start} (where remote_runner was started))" in [  # the plan, on stdout
        line.split(": ", 1)[-1].split("  ")[-1] for line in dry.stdout.splitlines()
        if line.startswith("  window server  index 1")]
    out = run_cli("-c", config, *lab_args(lab, run_env), cwd=str(start))
    assert out.returncode == 0, out.stderr
    assert (start / "server-saw.txt").read_text() == f"fname,lname\n{start}\n"
    assert not (tmp / "cfg" / "server-saw.txt").exists()
    client_dir = ssh(lab, "h1", f"cat {run_env['base']}-client-dir; rm -f {run_env['base']}-client-dir")
    assert client_dir.stdout.startswith("/tmp/"), "remote components still get a fresh directory"


# --------------------------------------------------------------------------- the password

SUDO_HELPER_CONFIG = """
    c = Component()
    c.name = 'sudo-bash-task-runner'
    c.host = 'h1'
    c.executable = '/bin/sh'
    c.args = ['-c', 'printf %s "$1" > {base}/seen', 'sh', options.ssh_pass]
    c.base_dir = '{base}'
    c.start_index = 1
    c.wait = True
    config.add_component(c)
"""


def test_password_from_the_environment_reaches_options_and_is_masked(lab, run_env):
    """SPAR's sudo_bash config hands options.ssh_pass to its helper; the tool never shows it."""
    password = "pw-S3cret 'quoted' $x"
    config = write(run_env["tmp"], "config.py", SUDO_HELPER_CONFIG.format(base=run_env["base"]))
    out = run_cli("-c", config, *lab_args(lab, run_env), "-l", "DEBUG",
                  env={"REMOTE_RUNNER_PASSWORD": password})
    assert out.returncode == 0, out.stderr
    assert ssh(lab, "h1", f"cat {run_env['base']}/seen").stdout == password
    for text in (password, shlex.quote(password), "pw-S3cret"):
        assert text not in out.stderr and text not in out.stdout
    dry = run_cli("-c", config, *lab_args(lab, run_env), "--dry-run", "-p", password)
    assert dry.returncode == 0, dry.stderr
    assert "pw-S3cret" not in dry.stderr + dry.stdout
    plan = [line for line in dry.stdout.splitlines() if line.startswith("  window sudo-bash")]
    assert plan and all("***" in line for line in plan), dry.stdout


def test_password_asked_for_reaches_options(tmp_path, monkeypatch):
    from remote_runner.cli import classic

    seen = tmp_path / "seen"
    config = write(tmp_path, "config.py", f"""
        open({str(seen)!r}, 'w').write(options.ssh_pass)
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 1
        config.add_component(c)
    """)
    monkeypatch.delenv("REMOTE_RUNNER_PASSWORD", raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "typed-pw")
    args = classic.build_parser().parse_args(["-c", config, "--ask-pass", "--dry-run"])
    try:
        assert classic.run_command(args) == 0
    finally:
        secrets.forget_all()
    assert seen.read_text() == "typed-pw"


def test_mask_covers_quoted_and_repr_forms():
    try:
        secrets.register("a'b c")
        assert secrets.mask(f"argv {shlex.quote('a' + chr(39) + 'b c')} and {['a' + chr(39) + 'b c']!r}") \
            == "argv *** and [***]"
        secrets.register("")
        secrets.register(None)
        assert secrets.mask("plain") == "plain"
    finally:
        secrets.forget_all()


# --------------------------------------------------------------------------- progress display

class _Tty:
    def isatty(self):
        return True


@pytest.mark.parametrize("level, no_progress, env, wanted", [
    ("INFO", False, {"TERM": "xterm"}, True),
    ("DEBUG", False, {}, True),
    ("WARNING", False, {"TERM": "xterm"}, False),
    ("ERROR", False, {"TERM": "xterm"}, False),
    ("INFO", True, {"TERM": "xterm"}, False),
    ("INFO", False, {"TERM": "dumb"}, False),
    ("INFO", False, {"TERM": "xterm", "NO_COLOR": "1"}, False),
    ("INFO", False, {"TERM": "xterm", "NO_COLOR": ""}, True),
])
def test_progress_rule(level, no_progress, env, wanted):
    assert console.progress_wanted(level, no_progress, env, _Tty()) is wanted
    assert console.progress_wanted(level, no_progress, env, open(os.devnull, "w")) is False


def test_quiet_under_script_with_warning_level(lab, run_env):
    """SPAR's campaigns record runs with script -c "... -l WARNING": no escape codes in that log."""
    tmp = run_env["tmp"]
    (tmp / "payload.bin").write_bytes(os.urandom(1 << 20))
    config = write(tmp, "config.py", f"""
        c = Component()
        c.name = 'receiver'
        c.host = 'h3'
        c.executable = '/bin/true'
        c.files = {{'payload.bin': 'payload.bin'}}
        c.base_dir = '{run_env["base"]}'
        c.start_index = 1
        c.wait = True
        config.add_component(c)
    """)

    def recorded(level: str, *extra: str) -> str:
        log = tmp / f"rr_log_{level}.txt"
        command = shlex.join([sys.executable, SCRIPT, "-c", config, *lab_args(lab, run_env),
                              "--always-copy", "-l", level, *extra])
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR",)}
        env["TERM"] = "xterm-256color"
        done = subprocess.run(["script", "-q", "-e", "-c", command, str(log)], env=env,
                              capture_output=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, log.read_text(errors="replace")
        return log.read_text(errors="replace")

    quiet = recorded("WARNING")
    assert "\x1b[" not in quiet, repr(quiet)
    assert ssh(lab, "h3", f"stat -c %s {run_env['base']}/payload.bin").stdout.strip() == str(1 << 20)
    assert "\x1b[" not in recorded("INFO", "--no-progress")
    # the same run at INFO on that terminal does draw (so the check above can fail)
    assert "\x1b[" in recorded("INFO")


# --------------------------------------------------------------------------- Python 2 campaign

CAMPAIGN = os.path.join(REPO, "tests", "data", "spar_py2_campaign")


def test_python2_config_muddler_and_arg_parser_run_unchanged(lab, run_env):
    """A Python 2 campaign (print statements, iteritems, has_key, string.join, xrange,
    integer division feeding range()) runs as SPAR ran it: 5 clients become 3 on h2, 2 on h3."""
    base = run_env["base"]
    out = run_cli("-c", os.path.join(CAMPAIGN, "config.py"),
                  "-m", os.path.join(CAMPAIGN, "muddler.py"),
                  "-a", os.path.join(CAMPAIGN, "arg_parser.py"),
                  f"--extra-args=-t case7 --remote-base {base} --clients 5",
                  "-u", "root", *lab_args(lab, run_env))
    assert out.returncode == 0, out.stderr
    for role in ("config", "muddler", "arg parser"):
        assert f"{role} read as Python 2" in out.stderr, out.stderr
    assert "Test case case7 for user root" in out.stdout
    assert "   5 clients on 2 hosts" in out.stdout
    assert f"INFO: Remote results will be stored in {base}" in out.stderr
    assert ssh(lab, "h1", f"cat {base}/bin/server.out").stdout == "server case7 on h1\n"
    assert ssh(lab, "h1", f"cat {base}/bin/queries/q1").stdout.startswith("SELECT")
    placed = {"h2": ["client-0", "client-1", "client-2"], "h3": ["client-3", "client-4"]}
    for host, clients in placed.items():
        listing = ssh(lab, host, f"cd {base}/bin && ls *.out").stdout.split()
        assert listing == [f"{name}.out" for name in clients], (host, listing)
        for name in clients:
            assert ssh(lab, host, f"cat {base}/bin/{name}.out").stdout == \
                f"{name} case7-x on {host}\n"
        assert f"INFO: {host}: client-" in out.stderr


def test_python2_campaign_on_a_foreign_distribution(lab, run_env, foreign_host):
    """The translated files run here; the Debian 11 host only runs the components."""
    tmp = run_env["tmp"]
    for name in ("config.py", "muddler.py", "arg_parser.py", "report.sh"):
        with open(os.path.join(CAMPAIGN, name), "rb") as src:
            data = src.read()
        (tmp / name).write_bytes(data)
        os.chmod(tmp / name, 0o755 if name.endswith(".sh") else 0o644)
    os.makedirs(tmp / "queries")
    (tmp / "host_info.txt").write_text(f"h1 2 R210 n\n{foreign_host} 2 R210 n\n")
    base = run_env["base"]
    try:
        out = run_cli("-c", str(tmp / "config.py"), "-m", str(tmp / "muddler.py"),
                      "-a", str(tmp / "arg_parser.py"),
                      f"--extra-args=-t f1 --remote-base {base} --clients 2",
                      "-u", "root", *lab_args(lab, run_env))
        assert out.returncode == 0, out.stderr
        listing = ssh(lab, foreign_host, f"cd {base}/bin && cat client-0.out client-1.out").stdout
        assert listing == f"client-0 f1-x on {foreign_host}\nclient-1 f1-x on {foreign_host}\n"
    finally:
        quit_screen(lab, foreign_host, run_env["screen"], run_env["state"], base)


# --------------------------------------------------------------------------- names for one login

def aliased_ssh_config(lab, tmp, *names: str) -> str:
    """An ssh_config where *names* are extra aliases of h1 (TBD placeholders, IP aliases)."""
    import paramiko
    with open(lab.ssh_config) as handle:
        text = handle.read()
    h1 = paramiko.SSHConfig.from_text(text).lookup("h1")
    block = f"Host {' '.join(names)}\n" + "".join(
        f"    {key} {value}\n" for key, value in (
            ("HostName", h1["hostname"]), ("User", h1["user"]),
            ("IdentityFile", h1["identityfile"][0]), ("IdentitiesOnly", "yes"),
            ("UserKnownHostsFile", h1["userknownhostsfile"]), ("GlobalKnownHostsFile", "/dev/null"),
            ("StrictHostKeyChecking", "yes")))
    path = tmp / "ssh_config"
    path.write_text(block + "\n" + text)
    return str(path)


def test_names_reaching_one_login_share_one_connection_and_session(lab, run_env):
    """TBD placeholder, ssh_config alias and IP address of h1: one screen session on h1."""
    tmp = run_env["tmp"]
    ssh_config = aliased_ssh_config(lab, tmp, "TBD", "campaign-server")
    config = write(tmp, "config.py", f"""
        for index, (name, host) in enumerate((('server', 'campaign-server'), ('client-0', 'TBD'),
                                               ('client-1', 'h1'), ('client-2', '10.213.0.11'))):
            c = Component()
            c.name = name
            c.host = host
            c.executable = '/bin/sh'
            c.args = ['-c', 'echo "$0 ran" > {run_env["base"]}/$0.out; exec sleep 600', name]
            c.base_dir = '{run_env["base"]}'
            c.start_index = index
            config.add_component(c)
    """)
    args = ["-F", ssh_config, "--screen", run_env["screen"], "--remote-done-dir", run_env["state"]]
    out = run_cli("-c", config, *args)
    assert out.returncode == 0, out.stderr
    for alias in ("TBD", "h1", "10.213.0.11"):
        assert f"INFO: campaign-server and {alias} reach the same login (root@10.213.0.11:22)" \
            in out.stderr, out.stderr
    sessions = scr.parse_sessions(ssh(lab, "h1", "screen -ls", check=False).stdout,
                                  run_env["screen"])
    assert len(sessions) == 1, sessions
    windows = ssh(lab, "h1", f"screen -S {sessions[0]} -Q windows", check=False).stdout
    for name in ("server", "client-0", "client-1", "client-2"):
        assert name in windows, windows
        assert ssh(lab, "h1", f"cat {run_env['base']}/{name}.out").stdout == f"{name} ran\n"
    again = run_cli("-c", config, *args)  # replaces that one session, as for any host
    assert again.returncode == 0, again.stderr
    assert len(scr.parse_sessions(ssh(lab, "h1", "screen -ls", check=False).stdout,
                                  run_env["screen"])) == 1


def test_same_name_on_two_names_of_one_login_is_a_config_error(lab, run_env):
    tmp = run_env["tmp"]
    ssh_config = aliased_ssh_config(lab, tmp, "TBD")
    config = write(tmp, "config.py", """
        a = Component()
        a.name = 'harness'
        a.host = 'h1'
        a.executable = '/bin/true'
        a.start_index = 1
        config.add_component(a)  # <first>
        b = Component()
        b.name = 'harness'
        b.host = 'TBD'
        b.executable = '/bin/true'
        b.start_index = 1
        config.add_component(b)  # <second>
    """)
    for extra in (["--dry-run"], []):
        out = run_cli("-c", config, "-F", ssh_config, "--screen", run_env["screen"],
                      "--remote-done-dir", run_env["state"], *extra)
        assert out.returncode == 2, out.stderr
        first, second = line_of(config, "# <first>"), line_of(config, "# <second>")
        assert f"{config}:{second}: component 'harness'" in out.stderr
        assert f"added at {config}:{first}" in out.stderr and f"added at {config}:{second}" in out.stderr
        assert "'TBD' and 'h1' reach the same login" in out.stderr
        assert "Traceback" not in out.stderr
    assert scr.parse_sessions(ssh(lab, "h1", "screen -ls", check=False).stdout,
                              run_env["screen"]) == []
