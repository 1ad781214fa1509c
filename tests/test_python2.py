"""Python 2 user files: which are read as Python 2, what they mean, and where errors point.

Unit tests on the loader (no hosts); the lab run of a whole Python 2 campaign
is in ``test_spar_compat.py``.
"""

from __future__ import annotations

import argparse
import logging
import textwrap

import pytest

from remote_runner.loader import load_experiment
from remote_runner.errors import ConfigError
from remote_runner.python2 import compile_file
from remote_runner.python2.source import line_map, python2_only_use


def write(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip("\n"))
    return str(path)


def line_of(path: str, marker: str) -> int:
    with open(path) as handle:
        return next(n for n, line in enumerate(handle, 1) if marker in line)


def run_config(tmp_path, body: str, python=None, caplog=None):
    """Load a config whose body records values in ``seen`` (a dict it adds to the component args)."""
    path = write(tmp_path, "config.py", textwrap.dedent(body).lstrip("\n") + textwrap.dedent("""
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.args = [repr(seen)]
        c.start_index = 1
        config.add_component(c)
    """))
    exp = load_experiment(path, argparse.Namespace(ssh_user="u", python=python))
    return eval(exp.components[0].args[0]), path


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize("source, found", [
    ("for i in xrange(3): pass\n", "xrange"),
    ("d = {}\nfor k, v in d.iteritems(): pass\n", ".iteritems"),
    ("d = {}\nd.has_key(1)\n", ".has_key"),
    ("x = raw_input\n", "raw_input"),
    ("isinstance('', basestring)\n", "basestring"),
    ("import string\nstring.join(['a'], '')\n", "string.join"),
    ("import sys\nsys.maxint\n", "sys.maxint"),
    ("import sys\nprint >>sys.stderr, 'x'\n", "print statement"),
    ("print\n", "print statement"),
])
def test_python2_only_use_is_found(source, found):
    import ast
    assert found in python2_only_use(ast.parse(source))


@pytest.mark.parametrize("source", [
    "print('hello')\n",
    "try:\n    unicode\nexcept NameError:\n    unicode = str\n",
    "def f(file):\n    return file\n",
    "from functools import reduce\nreduce(max, [1])\n",
    "string = 'abc'\nstring.join([])\n",
    "x = 7 / 2\n",
])
def test_python3_files_stay_python3(source):
    import ast
    assert python2_only_use(ast.parse(source)) == ""
    assert not compile_file(source.encode(), "f.py").python2


# --------------------------------------------------------------------------- meaning

def test_python2_meaning_of_a_config(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        seen, path = run_config(tmp_path, """
            import string
            seen = {}
            seen['div'] = 7 / 2
            seen['fdiv'] = 7 / 2.0
            n = 10
            n /= 4
            seen['aug'] = n
            seen['range'] = range(9 / 2)
            seen['keys'] = sorted({'b': 1, 'a': 2}.keys())
            seen['items'] = [k for k, v in sorted({'a': 1}.iteritems())]
            seen['has'] = {'a': 1}.has_key('a')
            seen['join'] = string.join(['x', 'y'], '-')
            seen['upper'] = string.upper('q') + string.letters[:2]
            seen['octal'] = 0755
            seen['long'] = 10L
            seen['map'] = map(str, xrange(2))
            seen['text'] = isinstance(u'x', basestring) and unicode(3)
            try:
                raise ValueError, 'old raise'
            except ValueError, e:
                seen['exc'] = str(e)
            print 'printed', '%d%%' % 5
            print >>open('/dev/null', 'w'), 'to a file'
        """)
    assert seen == {
        "div": 3, "fdiv": 3.5, "aug": 2, "range": [0, 1, 2, 3], "keys": ["a", "b"],
        "items": ["a"], "has": True, "join": "x-y", "upper": "Qab", "octal": 0o755, "long": 10,
        "map": ["0", "1"], "text": "3", "exc": "old raise",
    }
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert sum("read as Python 2" in m and path in m for m in infos) == 1, infos


def test_future_division_keeps_true_division(tmp_path):
    seen, _ = run_config(tmp_path, """
        from __future__ import division
        seen = {'div': 7 / 2, 'floor': 7 // 2}
        print 'still Python 2'
    """)
    assert seen == {"div": 3.5, "floor": 3}


def test_forcing_either_dialect(tmp_path):
    body = "seen = {'div': 7 / 2}\n"
    assert run_config(tmp_path, body)[0] == {"div": 3.5}
    assert run_config(tmp_path, body, python="2")[0] == {"div": 3}
    with pytest.raises(ConfigError) as info:
        run_config(tmp_path, "print 'x'\nseen = {}\n", python="3")
    assert "SyntaxError" in str(info.value) and info.value.line == 1


def test_helper_modules_next_to_the_config_are_read_the_same_way(tmp_path, caplog):
    """A Python 2 helper module beside the config is translated too; a Python 3 one is not."""
    (tmp_path / "py3_helper_for_config.py").write_text("VALUE = 7 / 2\n")
    (tmp_path / "py2_helper_for_config.py").write_text(
        "def hosts(d):\n    print 'hosts', d\n    return [k for k, v in d.iteritems()]\n"
        "HALF = 7 / 2\n")
    with caplog.at_level(logging.INFO):
        seen, _ = run_config(tmp_path, """
            import py3_helper_for_config, py2_helper_for_config
            seen = {'py3': py3_helper_for_config.VALUE, 'py2': py2_helper_for_config.HALF,
                    'hosts': py2_helper_for_config.hosts({'h1': 1})}
        """)
    assert seen == {"py3": 3.5, "py2": 3, "hosts": ["h1"]}
    assert any("py2_helper_for_config.py" in r.getMessage() and "read as Python 2" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / "__pycache__").exists(), "nothing is written next to the user's files"
    import sys
    for name in ("py3_helper_for_config", "py2_helper_for_config"):
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- where errors point

def test_runtime_error_points_at_the_original_line_after_lines_were_added(tmp_path):
    """fissix adds an import line for reduce() and unpacks tuple parameters: lines still match."""
    with pytest.raises(ConfigError) as info:
        run_config(tmp_path, """
            import os
            def pair((a, b)):
                return a + b
            total = reduce(lambda x, y: x + y, [1, 2, 3])
            print 'total', total
            seen = {'pair': pair((1, 2))}
            missing_name  # <err>
        """)
    path = str(tmp_path / "config.py")
    assert info.value.file == path and info.value.line == line_of(path, "# <err>")
    assert "NameError" in str(info.value) and "missing_name  # <err>" in str(info.value)


def test_error_inside_a_function_of_a_python2_muddler(tmp_path):
    config = write(tmp_path, "config.py", """
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 1
        config.add_component(c)
    """)
    muddler = write(tmp_path, "muddler.py", """
        def helper(d):
            for k, v in d.iteritems():
                print k, v
            return d['nope']  # <err>

        def muddle(config, options):
            print "muddling"
            helper({'a': 1})
    """)
    with pytest.raises(ConfigError) as info:
        load_experiment(config, argparse.Namespace(ssh_user="u"), muddler_file=muddler)
    assert (info.value.file, info.value.line) == (muddler, line_of(muddler, "# <err>"))
    assert "KeyError" in str(info.value)


def test_neither_python3_nor_python2_keeps_the_python3_syntax_error(tmp_path):
    path = write(tmp_path, "config.py", """
        x = 1
        def broken(:
            pass
    """)
    with pytest.raises(ConfigError) as info:
        load_experiment(path, argparse.Namespace(ssh_user="u"))
    assert (info.value.file, info.value.line) == (path, 2)
    assert "SyntaxError in config: invalid syntax" in str(info.value)
    assert "def broken(:" in str(info.value)


def test_python2_syntax_error_in_a_forced_file_points_at_its_line(tmp_path):
    path = write(tmp_path, "config.py", "x = 1\ny = (\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path, argparse.Namespace(ssh_user="u", python="2"))
    assert info.value.file == path and info.value.line in (2, 3)


def test_line_map_aligns_inserted_lines():
    original = "a\nb\nc\n"
    assert line_map(original, "a\nb\nc\n") == {1: 1, 2: 2, 3: 3}
    mapped = line_map(original, "a\nimport x\nb\nc\n")
    assert (mapped[1], mapped[3], mapped[4]) == (1, 2, 3)


def test_nothing_is_written_next_to_the_user_file(tmp_path):
    run_config(tmp_path, "seen = {}\nprint 'x'\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.py"]


def test_translation_works_where_the_cache_directory_cannot_be_made(tmp_path):
    """fissix keeps its grammar tables in ~/.cache; a read-only home must not break loading."""
    import os
    import subprocess
    import sys
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, HOME=str(blocker), XDG_CACHE_HOME=str(blocker / "cache"), TMPDIR=str(scratch))
    probe = ("import os; from remote_runner.python2 import compile_file; "
             "c = compile_file(b'print 7 / 2\\n', 'x.py'); exec(c.code, {'__builtins__': "
             "__import__('remote_runner.python2.runtime', fromlist=['x']).python2_builtins()}); "
             "print(c.python2, os.environ['XDG_CACHE_HOME'] == %r)" % str(blocker / "cache"))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "True", "True"]
    assert list(scratch.iterdir()) == []  # the private cache went with the process


def test_a_syntax_error_is_reported_where_the_cache_directory_cannot_be_made(tmp_path):
    """The first translation imports fissix twice (see above): its parse error is still a SyntaxError.

    As in a mirror, where the local home is not served to the host.
    """
    import os
    import subprocess
    import sys
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = dict(os.environ, HOME=str(blocker), XDG_CACHE_HOME=str(blocker / "cache"))
    probe = ("from remote_runner.python2 import compile_file\n"
             "try:\n    compile_file(b'x = [1, 2\\nprint x\\n', 'x.py')\n"
             "except SyntaxError as exc:\n    print('SyntaxError', exc.lineno)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "SyntaxError", out.stdout


def test_a_broken_helper_module_is_named_with_its_line(tmp_path):
    (tmp_path / "broken_helper_for_config.py").write_text("x = 1\ndef f(:\n    pass\n")
    with pytest.raises(ConfigError) as info:
        run_config(tmp_path, "import broken_helper_for_config  # <err>\nseen = {}\n")
    path = str(tmp_path / "config.py")
    assert (info.value.file, info.value.line) == (path, line_of(path, "# <err>"))
    assert f"(raised in {tmp_path / 'broken_helper_for_config.py'}:2)" in str(info.value)
