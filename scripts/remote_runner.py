#!python
"""SPAR's classic command line: ``remote_runner.py -c experiment.py -m muddler.py``.

This is a plain script rather than a generated entry point because its name
ends in ``.py``: sitting in the same ``bin`` directory as ``remote-runner``, a
generated ``remote_runner.py`` would shadow the ``remote_runner`` package for
every script there (``sys.path[0]`` is the script's directory). When this file
is imported under that name by accident, it hands over to the real package.
"""

import importlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

if __name__ == "__main__":
    from remote_runner.standby import launch

    launch("classic")
else:
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)
