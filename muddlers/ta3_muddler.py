"""TA3 muddler: run every ``publisher*`` component under the TA3 test harness.

Use: ``remote_runner.py -c CONFIG -m muddlers/ta3_muddler.py``.

For each component whose name starts with ``publisher`` the harness becomes the
executable and the original executable and arguments follow it after ``--``::

    ta3_harness.py --name NAME --summary NAME.summary.json --log NAME.harness.log -- EXE ARG...

so the program's output lines are timestamped and prefixed, and a JSON summary
with its exit status and duration lands in the component's working directory
(``base_dir``). The harness (python3, standard library only) is shipped to the
host through ``files``; on ``localhost`` it runs from this checkout. Every other
component passes through unchanged.

The harness is found relative to *this file* (``../examples/harness``), not the
cwd, so the muddler works from any directory. ``extra_options.harness`` (from an
arg parser) or the environment variable ``RR_TA3_HARNESS`` may name another one.

A relative executable keeps its meaning: on a remote host it is relative to
``base_dir`` (the harness runs there, so it is passed as ``./EXE``); on
``localhost`` it is relative to the config's directory, which is the cwd while
the muddler runs, so it is made absolute here.
"""

import os

PREFIX = "publisher"
HARNESS_DEST = "rr-ta3/ta3_harness.py"
DEFAULT_HARNESS = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "examples", "harness", "ta3_harness.py"))


def harness_path():
    """Return the local path of the harness to ship."""
    chosen = getattr(extra_options, "harness", None) or os.environ.get("RR_TA3_HARNESS")
    return os.path.abspath(chosen) if chosen else DEFAULT_HARNESS


def wrapped_executable(component):
    """Return the original executable as the harness (running in base_dir) must call it."""
    exe = component.executable
    if os.path.isabs(exe):
        return exe
    if component.host == localhost:
        return os.path.abspath(exe)  # the muddler runs in the config's directory
    return exe if exe.startswith("./") else "./" + exe


def wrap(component, harness):
    """Make *component* run its program under the harness."""
    name = component.name
    original = [wrapped_executable(component)] + [str(a) for a in component.args]
    component.args = ["--name", name, "--summary", name + ".summary.json",
                      "--log", name + ".harness.log", "--"] + original
    if component.host == localhost:
        component.executable = harness
    else:
        component.files[harness] = HARNESS_DEST
        component.executable = HARNESS_DEST


def muddle(config, options):
    """Wrap every component whose name starts with ``publisher`` in the TA3 harness."""
    harness = harness_path()
    if not os.path.isfile(harness):
        raise FileNotFoundError("TA3 harness not found: %s" % harness)
    for component in config.all_components():
        if component.name.startswith(PREFIX):
            wrap(component, harness)
