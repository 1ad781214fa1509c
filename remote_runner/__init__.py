"""remote_runner: start and watch multi-host experiments over SSH.

The package is a library first; the command lines live in :mod:`remote_runner.cli`
and are the only place that prints final reports or chooses exit codes.
"""

__version__ = "0.1.0"

from remote_runner import lazyimport as _lazyimport

_lazyimport.defer_all()
