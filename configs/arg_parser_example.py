"""Arg-parser example (SPAR's apple/bread/cheese), used with configs/extra_args_config.py:

    remote_runner.py -c configs/extra_args_config.py -a configs/arg_parser_example.py \
        --extra-args "--apple 3 --bread rye --cheese '-very old-'"

``parse_args(extra_args, ssh_user)`` gets the extra arguments as ONE string; split it with
shell rules (``shlex.split``) so quoting works and values may start with ``-``.
"""

import argparse
import shlex


def parse_args(extra_args, ssh_user):
    """Return the extra options the config and muddler see as ``extra_options``."""
    parser = argparse.ArgumentParser(prog="--extra-args")
    parser.add_argument("--apple", type=int, default=1)
    parser.add_argument("--bread", default="white")
    parser.add_argument("--cheese", default="cheddar")
    options = parser.parse_args(shlex.split(extra_args))
    options.user = ssh_user if ssh_user is not None else "unspecified"
    return options
