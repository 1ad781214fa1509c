"""Unit tests for config loading and validation (remote_runner.config, remote_runner.util).

No SSH: configs are written to a temporary directory and loaded with load_experiment.
Every error test checks the exact file:line, the component and the field.
"""

from __future__ import annotations

import argparse
import os
import time
import textwrap

import pytest

from remote_runner import util
from remote_runner.config import (LOCAL_HOST, Component, ComponentSpec, Config, Experiment,
                                  FileSpec, Origin, SourceError)
from remote_runner.errors import EXIT_CONFIG, EXIT_COPY, ConfigError, CopyError
from remote_runner.loader import load_experiment

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

BASE = """
c = Component()
c.name = "comp"
c.host = "h1"
c.executable = "/bin/true"
c.start_index = 1
"""


def write(directory, text: str, name: str = "exp.py") -> str:
    """Write a config file and return its real absolute path."""
    path = os.path.join(str(directory), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(textwrap.dedent(text).lstrip("\n"))
    return os.path.realpath(path)


def line_of(path: str, marker: str) -> int:
    """Return the 1-based line of the only line of *path* containing *marker*."""
    with open(path) as handle:
        hits = [n for n, line in enumerate(handle, 1) if marker in line]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def load(path: str, **kwargs) -> Experiment:
    return load_experiment(path, argparse.Namespace(ssh_user="alice"), **kwargs)


def config_error(path: str, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, **kwargs)
    return info.value


def assert_located(err, path: str, marker: str, component=None, field=None) -> None:
    line = line_of(path, marker)
    assert (err.file, err.line) == (path, line), str(err)
    assert str(err).startswith(f"{path}:{line}: "), str(err)
    assert err.component == component
    assert err.field == field


# ----------------------------------------------------------------------------- loading basics

def test_namespace_cwd_file_and_name(tmp_path):
    path = write(tmp_path / "cfgdir", BASE + """
import os
assert os.getcwd() == os.path.dirname(__file__), os.getcwd()
assert __name__ != "__main__" and __name__
assert localhost == "localhost" and config.LOCAL_HOST == "localhost"
assert options.ssh_user == "alice" and extra_options is None
assert callable(util.recursive_files_dict)
c.args = [__file__, __name__]
config.add_component(c)
""")
    before = os.getcwd()
    exp = load(path)
    assert os.getcwd() == before
    (spec,) = exp.components
    assert spec.args[0] == path
    assert spec.args[1] == "remote_runner_config"
    assert exp.config_file == path and exp.config_dir == os.path.dirname(path)


def test_extra_options_used_without_extra_args_says_why_it_is_none(tmp_path):
    path = write(tmp_path, "port = extra_options.port  # <err>\n")
    err = config_error(path)
    assert_located(err, path, "# <err>")
    assert "no -a/--extra-args was given" in str(err)


def test_cwd_restored_after_python_error(tmp_path):
    path = write(tmp_path, "x = 1\nundefined_name  # <err>\n")
    before = os.getcwd()
    err = config_error(path)
    assert os.getcwd() == before
    assert_located(err, path, "# <err>")
    assert "NameError" in str(err) and "undefined_name" in str(err)
    assert "undefined_name  # <err>" in str(err), "the offending source line is shown"


def test_cwd_restored_after_config_error(tmp_path):
    path = write(tmp_path, BASE + "c.colour = 'red'  # <err>\n")
    before = os.getcwd()
    config_error(path)
    assert os.getcwd() == before


def test_syntax_error_points_at_config_line(tmp_path):
    path = write(tmp_path, BASE + "c.args = [1, 2  # <err>\nconfig.add_component(c)\n")
    err = config_error(path)
    assert err.file == path
    assert err.line in (line_of(path, "# <err>"), line_of(path, "# <err>") + 1)
    assert "SyntaxError" in str(err)
    assert "remote_runner/config.py" not in str(err)


def test_error_inside_config_function_reports_innermost_config_frame(tmp_path):
    path = write(tmp_path, """
def compute():
    return 1 / 0  # <err>

value = compute()
""")
    err = config_error(path)
    assert_located(err, path, "# <err>")
    assert "ZeroDivisionError" in str(err)


def test_error_in_stdlib_call_reports_the_config_line(tmp_path):
    path = write(tmp_path, "import json\njson.loads('{')  # <err>\n")
    err = config_error(path)
    assert_located(err, path, "# <err>")
    assert "JSONDecodeError" in str(err)
    assert "raised in" in str(err)


def test_sys_exit_in_config_is_a_config_error(tmp_path):
    path = write(tmp_path, "import sys\nsys.exit(3)  # <err>\n")
    err = config_error(path)
    assert_located(err, path, "# <err>")
    assert "sys.exit(3)" in str(err)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "nope.py"))
    assert "does not exist" in str(info.value)
    assert info.value.file.endswith("nope.py")
    assert info.value.exit_code == EXIT_CONFIG


def test_config_without_components(tmp_path):
    path = write(tmp_path, "x = 1\n")
    err = config_error(path)
    assert err.file == path and "no components" in str(err)


def test_rebinding_config_is_an_error(tmp_path):
    path = write(tmp_path, "config = []\n")
    err = config_error(path)
    assert err.file == path and "rebound" in str(err)


# ----------------------------------------------------------------------------- Component

def test_unknown_attribute_fails_at_that_line_with_suggestion(tmp_path):
    path = write(tmp_path, BASE + "c.exectuable = '/bin/ls'  # <err>\nconfig.add_component(c)\n")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="exectuable")
    assert "did you mean 'executable'" in str(err)


def test_unknown_attribute_before_name_is_set(tmp_path):
    path = write(tmp_path, "c = Component()\nc.num_cpus = 4  # <err>\n")
    err = config_error(path)
    assert_located(err, path, "# <err>", component=None, field="num_cpus")
    assert "num_cores" in str(err)


def test_defaults():
    c = Component()
    assert (c.args, c.files, c.base_dir, c.wait, c.mirror, c.num_cores) == ([], {}, None, False,
                                                                           False, None)
    with pytest.raises(AttributeError, match="has not been set"):
        c.name  # noqa: B018
    assert not hasattr(c, "start_index")


def test_keyword_shorthand_and_positional_rejected():
    c = Component(name="a", host="h1")
    assert (c.name, c.host) == ("a", "h1")
    with pytest.raises(ConfigError, match="positional"):
        Component("a")
    with pytest.raises(ConfigError, match="did you mean 'host'"):
        Component(hots="h1")


def test_add_component_deep_copies(tmp_path):
    path = write(tmp_path, BASE + """
c.args = ["one"]
c.files = {}
config.add_component(c)
c.args.append("two")
c.name = "second"
config.add_component(c)
c.name = "never-added"
c.args.append("three")
""")
    exp = load(path)
    assert [s.name for s in exp.components] == ["comp", "second"]
    assert exp.components[0].args == ("one",)
    assert exp.components[1].args == ("one", "two")


def test_config_methods():
    config = Config()
    a = Component(name="a", host="h1", executable="x", start_index=1)
    b = Component(name="b", host=LOCAL_HOST, executable="/bin/true", start_index=1)
    config.add_component(a)
    config.add_component(b)
    assert len(config) == 2
    stored = list(config.all_components())
    assert stored[0] is not a and stored[0].name == "a"
    stored[0].args = ["live"]
    assert next(config.all_components()).args == ["live"], "all_components yields live objects"
    assert [c.name for c in config.all_remote_components()] == ["a"]
    assert [c.name for c in config.all_local_components()] == ["b"]
    assert config.all_hosts() == {"h1", "localhost"}
    config.remove_component(stored[0])
    assert [c.name for c in config.all_components()] == ["b"]
    config.clear_components()
    assert len(config) == 0
    with pytest.raises(ConfigError, match="needs a Component"):
        config.add_component({"name": "x"})


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("assignment, field, message", [
    ("c.name = ''", "name", "non-empty string"),
    ("c.name = 'a/b'", "name", "'/'"),
    ("c.host = ''", "host", "non-empty string"),
    ("c.host = '-oProxyCommand=x'", "host", "must not start with '-'"),
    ("c.executable = ''", "executable", "non-empty string"),
    ("c.executable = None", "executable", "non-empty string"),
    ("c.args = 'not a list'", "args", "list"),
    ("c.args = ['ok', None]", "args", "args[1]"),
    ("c.args = [True]", "args", "bool"),
    ("c.files = ['a']", "files", "dict"),
    ("c.base_dir = 'relative/dir'", "base_dir", "relative"),
    ("c.base_dir = 5", "base_dir", "absolute"),
    ("c.start_index = True", "start_index", "number"),
    ("c.start_index = '1'", "start_index", "number"),
    ("c.start_index = float('nan')", "start_index", "number"),
    ("c.wait = 1", "wait", "True or False"),
    ("c.mirror = 'yes'", "mirror", "True or False"),
    ("c.num_cores = 0", "num_cores", "positive int"),
    ("c.files = {'exp.py': '.'}", "files", "names a directory; give the file's own path, e.g. 'exp.py'"),
    ("c.files = {'exp.py': 'bin/'}", "files", "e.g. 'bin/exp.py'"),
    ("c.ready = 'log:listening (port'", "ready", "not an extended regex grep takes"),
    ("c.host = 'h[1-'", "host", "neither a host name nor a host set: unclosed '['"),
    ("c.executable = 'python3 prog.sh -v'", "executable",
     "write executable='python3' and put ['prog.sh', '-v'] in args"),
    ("c.start_index = float('inf')", "start_index", "number"),
    ("c.ready_timeout = float('inf')", "ready_timeout", "positive number of seconds"),
    ("c.settle = -1", "settle", "0 or more seconds"),
    ("c.settle = '2'", "settle", "0 or more seconds"),
    ("c.settle = True", "settle", "0 or more seconds"),
    ("c.settle = float('inf')", "settle", "0 or more seconds"),
])
def test_type_errors_point_at_the_assignment(tmp_path, assignment, field, message):
    path = write(tmp_path, BASE + f"{assignment}  # <err>\n\nconfig.add_component(c)\n")
    err = config_error(path)
    component = {"c.name = ''": None, "c.name = 'a/b'": "a/b"}.get(assignment, "comp")
    assert_located(err, path, "# <err>", component=component, field=field)
    assert message in str(err)


def test_missing_required_field_points_at_add_component(tmp_path):
    path = write(tmp_path, """
c = Component()
c.name = "lonely"
c.host = "h1"
c.executable = "/bin/true"
config.add_component(c)  # <err>
""")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="lonely", field="start_index")
    assert "start_index is required" in str(err)


def test_error_in_template_field_points_at_template_line(tmp_path):
    path = write(tmp_path, BASE + """
c.args = {"not": "a list"}  # <err>
for n in range(3):
    c.name = "comp-%d" % n
    config.add_component(c)
""")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp-0", field="args")


def test_files_on_localhost_component(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    path = write(tmp_path, BASE + """
c.host = localhost
c.files = {"data.txt": "data.txt"}  # <err>
config.add_component(c)
""")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="files")
    assert "localhost" in str(err)


def test_mirror_on_localhost_is_an_error(tmp_path):
    path = write(tmp_path, BASE + "c.host = localhost\nc.mirror = True  # <err>\n"
                 "config.add_component(c)\n")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="mirror")


def test_private_tmp_needs_a_mirror_and_one_answer_per_host(tmp_path):
    path = write(tmp_path, BASE + "c.private_tmp = True  # <err>\nconfig.add_component(c)\n")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="private_tmp")
    assert "mirror=True" in str(err)
    path = write(tmp_path, BASE + """
c.mirror = True
c.private_tmp = True
config.add_component(c)
c.name = "other"
c.private_tmp = False  # <err>
config.add_component(c)
c.name = "elsewhere"
c.host = "h2"
config.add_component(c)
""")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="other", field="private_tmp")
    assert "'comp'" in str(err) and "share one mirror" in str(err)
    path = write(tmp_path, BASE + "c.mirror = True\nc.private_tmp = True\nconfig.add_component(c)\n")
    assert load_experiment(path, None).components[0].private_tmp is True


def test_names_unique_per_host(tmp_path):
    path = write(tmp_path, BASE + """
config.add_component(c)  # <first>
c.host = "h2"
config.add_component(c)
c.host = "h1"
config.add_component(c)  # <err>
""")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="name")
    assert f"{path}:{line_of(path, '# <first>')}" in str(err), "names the first definition"


def test_same_name_on_different_hosts_is_fine(tmp_path):
    path = write(tmp_path, BASE + "config.add_component(c)\nc.host = 'h2'\nconfig.add_component(c)\n")
    assert [s.key for s in load(path).components] == [("h1", "comp"), ("h2", "comp")]


def test_valid_spec_values(tmp_path):
    path = write(tmp_path, BASE + """
c.args = ["-x", 3, 2.5, "with space"]
c.base_dir = "/srv/exp"
c.start_index = 2.5
c.wait = True
c.mirror = True
c.num_cores = 4
config.add_component(c)  # <add>
""")
    (spec,) = load(path).components
    assert isinstance(spec, ComponentSpec)
    assert spec.args == ("-x", "3", "2.5", "with space")
    assert (spec.base_dir, spec.start_index, spec.wait, spec.mirror, spec.num_cores) == (
        "/srv/exp", 2.5, True, True, 4)
    assert spec.origin == Origin(path, line_of(path, "# <add>"))
    assert spec.origin_of("base_dir") == Origin(path, line_of(path, 'c.base_dir ='))
    assert not spec.is_local
    with pytest.raises(Exception):
        spec.name = "frozen"  # type: ignore[misc]


def test_experiment_hosts_exclude_localhost(tmp_path):
    path = write(tmp_path, BASE + """
for host in ["h3", "h1", localhost, "h1"]:
    c.host = host
    c.name = "n-" + str(len(list(config.all_components())))
    if host == localhost:
        c.executable = "/bin/true"
    config.add_component(c)
""")
    exp = load(path)
    assert exp.hosts() == ["h1", "h3"]
    assert [s.is_local for s in exp.components] == [False, False, True, False]


# ----------------------------------------------------------------------------- paths and files

def test_path_rules(tmp_path, monkeypatch):
    cfgdir = tmp_path / "cfg"
    (cfgdir / "bin").mkdir(parents=True)
    (cfgdir / "bin" / "tool").write_text("#!/bin/sh\n")
    (cfgdir / "data").mkdir()
    (cfgdir / "data" / "f.txt").write_text("f")
    path = write(cfgdir, BASE + """
c.executable = "bin/tool"
c.files = {"bin/tool": "bin/tool", "./bin/tool": "bin/tool", "data": "/abs/data",
           "data/f.txt": "in/base/f.txt"}
config.add_component(c)
c.name = "local"
c.host = localhost
c.files = {}
config.add_component(c)
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    remote, local = load(path).components
    base = os.path.dirname(path)
    assert remote.executable == "bin/tool", "remote relative executable stays relative to base_dir"
    assert local.executable == os.path.join(base, "bin", "tool"), "local one resolves to config dir"
    assert remote.files == (
        FileSpec(os.path.join(base, "bin", "tool"), "bin/tool", False),
        FileSpec(os.path.join(base, "data"), "/abs/data", True),
        FileSpec(os.path.join(base, "data", "f.txt"), "in/base/f.txt", False),
    ), "duplicate (src, dest) kept once; dest as given; is_dir for directories"


def test_missing_source_is_a_copy_error_with_location(tmp_path):
    path = write(tmp_path, BASE + """
c.files = {"missing.bin": "missing.bin"}  # <err>
config.add_component(c)
""")
    with pytest.raises(CopyError) as info:
        load(path)
    err = info.value
    assert isinstance(err, SourceError)
    assert err.exit_code == EXIT_COPY
    assert (err.file, err.line) == (path, line_of(path, "# <err>"))
    assert err.component == "comp"
    assert err.path == os.path.join(os.path.dirname(path), "missing.bin")
    text = str(err)
    assert text.startswith(f"{path}:{line_of(path, '# <err>')}: component 'comp'")
    assert "missing.bin" in text


def test_missing_source_added_by_item_assignment_points_at_add(tmp_path):
    path = write(tmp_path, BASE + """
c.files["nope.txt"] = "nope.txt"
config.add_component(c)  # <err>
""")
    with pytest.raises(SourceError) as info:
        load(path)
    assert info.value.line == line_of(path, "# <err>")


def test_two_sources_to_one_destination(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    path = write(tmp_path, BASE + "c.files = {'a': 'x', 'b': './x'}  # <err>\n"
                 "config.add_component(c)\n")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="files")
    assert "two sources" in str(err)


def test_files_must_map_strings(tmp_path):
    path = write(tmp_path, BASE + "c.files = {'a': 3}  # <err>\nconfig.add_component(c)\n")
    err = config_error(path)
    assert_located(err, path, "# <err>", component="comp", field="files")


def test_a_files_dict_shared_by_many_components_is_checked_once(tmp_path, monkeypatch):
    """Twenty clients copying one tree: its files are checked (and stat'ed) once, not twenty times."""
    from remote_runner import validation
    for i in range(5):
        (tmp_path / f"f{i}").write_text(str(i))
    path = write(tmp_path, "files = {f'f{i}': f'f{i}' for i in range(5)}\n"
                           "for n in range(20):\n"
                           "    c = Component()\n    c.name = f'client{n}'\n    c.host = 'h1'\n"
                           "    c.executable = '/bin/true'\n    c.start_index = 1\n    c.files = dict(files)\n"
                           "    config.add_component(c)\n")
    checked = []
    real = validation._Validator._file_spec
    monkeypatch.setattr(validation._Validator, "_file_spec",
                        lambda self, src, dest: checked.append(src) or real(self, src, dest))
    experiment = load(path)
    assert len(checked) == 5 and len(experiment.components) == 20
    assert len({c.files for c in experiment.components}) == 1
    assert experiment.components[0].files[0].src == str(tmp_path / "f0")


# ----------------------------------------------------------------------------- util

def make_tree(root) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "sub" / "emptier").mkdir()
    (root / "top.txt").write_text("t")
    (root / ".hidden").write_text("h")
    (root / "sub" / "s.txt").write_text("s")
    (root / "sub" / "deeper" / ".dot").write_text("d")


def test_recursive_files_dict_absolute(tmp_path):
    make_tree(tmp_path / "tree")
    src = str(tmp_path / "tree")
    assert util.recursive_files_dict(src, "/remote/t") == {
        f"{src}/top.txt": "/remote/t/top.txt",
        f"{src}/.hidden": "/remote/t/.hidden",
        f"{src}/sub/s.txt": "/remote/t/sub/s.txt",
        f"{src}/sub/deeper/.dot": "/remote/t/sub/deeper/.dot",
        f"{src}/empty": "/remote/t/empty",
        f"{src}/sub/emptier": "/remote/t/sub/emptier",
    }


@pytest.mark.parametrize("dest", [".", "/", "/opt/x", "rel/dir", "./q/", "/opt/../p"])
def test_recursive_files_dict_places_each_file_as_its_own_normalised_path_would(tmp_path, dest):
    import posixpath
    for d in ("a/b", "c", "empty/deeper"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("x", "a/y", "a/b/z", "c/w"):
        (tmp_path / f).write_text(f)
    got = util.recursive_files_dict(str(tmp_path), dest)
    files = {str(p): posixpath.normpath(posixpath.join(dest, str(p.relative_to(tmp_path))))
             for p in tmp_path.rglob("*") if p.is_file()}
    assert {k: v for k, v in got.items() if k in files} == files
    assert got[str(tmp_path / "empty" / "deeper")] == posixpath.normpath(posixpath.join(dest, "empty/deeper"))


def test_recursive_files_dict_relative_into_base_dir(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    mapping = util.recursive_files_dict("tree", ".")
    assert mapping["tree/sub/s.txt"] == "sub/s.txt"
    assert mapping["tree/.hidden"] == ".hidden"
    assert mapping["tree/empty"] == "empty"


def test_recursive_files_dict_empty_root_and_symlinked_dir(tmp_path, caplog):
    (tmp_path / "lonely").mkdir()
    assert util.recursive_files_dict(str(tmp_path / "lonely"), "d") == {str(tmp_path / "lonely"): "d"}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_text("f")
    os.symlink(str(tmp_path / "lonely"), str(tmp_path / "t" / "link"))
    assert util.recursive_files_dict(str(tmp_path / "t"), "d") == {str(tmp_path / "t" / "f"): "d/f"}
    assert "not following symlinked directory" in caplog.text


def _age(tree, seconds=60):
    """Set every directory's mtime below *tree* (included) *seconds* into the past."""
    past = time.time_ns() - seconds * 10**9
    for folder in [tree, *(p for p in tree.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.utime(folder, ns=(past, past))


def test_recursive_files_dict_lists_a_tree_again_only_when_a_directory_changed(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(util.os, "walk", lambda top, *a, **k: walks.append(top) or real_walk(top, *a, **k))
    first = util.recursive_files_dict(str(tmp_path / "tree"), "d")  # just made: not remembered
    assert util.recursive_files_dict(str(tmp_path / "tree"), "d") == first and len(walks) == 2
    _age(tmp_path / "tree")
    util.recursive_files_dict(str(tmp_path / "tree"), "d")
    again = util.recursive_files_dict(str(tmp_path / "tree"), "d")
    assert again == first and len(walks) == 3  # the fourth call walked nothing
    again["x"] = "y"  # each call gets its own dict
    assert util.recursive_files_dict(str(tmp_path / "tree"), "d") == first and len(walks) == 3
    assert util.recursive_files_dict(str(tmp_path / "tree"), "e") != first and len(walks) == 4
    subdir = next(p for p in (tmp_path / "tree").iterdir() if p.is_dir() and not p.is_symlink())
    (subdir / "new.txt").write_text("new")  # a new entry deep down: its directory's mtime moves
    grown = util.recursive_files_dict(str(tmp_path / "tree"), "d")
    assert len(walks) == 5 and set(grown) - set(first) == {str(subdir / "new.txt")}
    _age(tmp_path / "tree")
    util.recursive_files_dict(str(tmp_path / "tree"), "d")
    (subdir / "new.txt").unlink()
    assert util.recursive_files_dict(str(tmp_path / "tree"), "d") == first and len(walks) == 7


def test_recursive_files_dict_in_config_becomes_file_specs(tmp_path):
    make_tree(tmp_path / "tree")
    path = write(tmp_path, BASE + """
c.files = util.recursive_files_dict("tree", ".")
c.files.update(util.recursive_files_dict("tree/sub", "/abs/sub"))
config.add_component(c)
""")
    (spec,) = load(path).components
    got = {(f.dest, f.is_dir) for f in spec.files}
    assert ("top.txt", False) in got and (".hidden", False) in got
    assert ("empty", True) in got and ("/abs/sub/emptier", True) in got
    assert ("/abs/sub/deeper/.dot", False) in got
    assert ("sub/s.txt", False) not in got, "update() re-mapped the same sources (dict semantics)"
    assert all(os.path.isabs(f.src) and os.path.exists(f.src) for f in spec.files)


def test_recursive_files_dict_missing_directory_gives_empty_dict_and_warns(tmp_path, caplog):
    """SPAR returned {} for a missing directory (optional mods/ or queries/); so do we, loudly."""
    (tmp_path / "afile").write_text("x")
    path = write(tmp_path, BASE + """
c.files = util.recursive_files_dict('nodir', '.')  # <err>
c.files.update(util.recursive_files_dict('afile', 'd'))  # <file>
config.add_component(c)
""")
    with caplog.at_level("WARNING"):
        (spec,) = load(path).components
    assert spec.files == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{path}:{line_of(path, '# <err>')}:" in w and "nodir" in w
               and str(tmp_path / "nodir") in w and "does not exist" in w for w in warnings), warnings
    assert any(f"{path}:{line_of(path, '# <file>')}:" in w and "is not a directory" in w
               for w in warnings), warnings


# ----------------------------------------------------------------------------- legacy SPAR config

def test_legacy_spar_config():
    path = os.path.realpath(os.path.join(DATA, "legacy_spar", "config.py"))
    exp = load(path)
    names = [(s.name, s.host) for s in exp.components]
    assert ("server", "10.0.0.1") in names
    assert [n for n, _ in names].count("client") == 3, "one name reused across hosts is fine"
    server = exp.components[0]
    assert server.num_cores == 4 and server.wait is False
    assert server.base_dir == "/home/me/subdir"
    data_dir = os.path.join(DATA, "legacy_spar", "dir1")
    assert FileSpec(os.path.realpath(os.path.join(data_dir, "sub", "file3")), "sub/file3",
                    False) in server.files
    local = [s for s in exp.components if s.is_local][0]
    assert local.executable == os.path.realpath(os.path.join(DATA, "legacy_spar", "script.sh"))
    assert local.files == ()
    assert exp.hosts() == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def test_config_imports_helper_next_to_it_and_errors_there_are_located(tmp_path):
    helper = tmp_path / "rr_test_helper_mod.py"
    helper.write_text("HOST = 'h7'\n\ndef broken():\n    raise KeyError('inner')\n")
    path = write(tmp_path, BASE + """
import rr_test_helper_mod
c.host = rr_test_helper_mod.HOST
config.add_component(c)
rr_test_helper_mod.broken()  # <err>
""")
    import sys
    try:
        err = config_error(path)
        assert_located(err, path, "# <err>")
        assert "KeyError" in str(err) and f"raised in {helper}:4" in str(err)
        assert str(tmp_path) not in sys.path, "sys.path restored"
    finally:
        sys.modules.pop("rr_test_helper_mod", None)


def test_an_ipv6_host_in_brackets_is_a_host_not_a_host_set(tmp_path):
    for host in ("[::1]", "root@[::1]:2222", "[fe80::1%eth0]"):
        path = write(tmp_path, BASE.replace('c.host = "h1"', f"c.host = {host!r}") +
                     "config.add_component(c)\n", name=f"v6-{abs(hash(host))}.py")
        assert load(path).components[0].host == host
