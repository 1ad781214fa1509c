"""Arg parser for examples/experiment.py: ``-a examples/demo_arg_parser.py --extra-args "..."``.

``parse_args`` receives the extra arguments as one string (as SPAR passed them) and splits it
with shell rules, so quoted values with spaces and values starting with ``-`` work.
"""

import argparse
import getpass
import shlex


def parse_args(extra_args, ssh_user):
    """Parse the demo's settings; the result is the config's ``extra_options``."""
    parser = argparse.ArgumentParser(prog="--extra-args", description="example experiment settings")
    parser.add_argument("--hosts", help="comma-separated hosts; the first runs the broker")
    parser.add_argument("--server-addr", help="address the clients use to reach the broker")
    parser.add_argument("--port", type=int, help="broker TCP port")
    parser.add_argument("--messages", type=int, help="messages per publisher")
    options = parser.parse_args(shlex.split(extra_args))
    options.user = ssh_user or getpass.getuser()
    return options
