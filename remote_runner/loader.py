"""Loading an experiment: argument parser, config (Python or YAML), muddler, validation.

The order is SPAR's: the optional argument parser file defines ``extra_options``,
the config fills ``config``, the muddler rewrites it, and only then is every
component validated into the frozen :class:`~remote_runner.config.Experiment` the
runner uses. Everything here happens before any host is touched, so a mistake in
any of the files stops the run with nothing started.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, List, Optional, Union

from remote_runner import muddle, util
from remote_runner.config import CONFIG_MODULE_NAME, LOCAL_HOST, Component, Config, Experiment
from remote_runner.errors import ConfigError
from remote_runner.usercode import compile_user_file, resolve_user_file, user_code, user_namespace
from remote_runner.validation import build_experiment

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.inventory import HostGroups


def run_config(config_path: str, options: Any, extra_options: Any,
               dialect: Optional[str] = None) -> Config:
    """Execute the config file in its own directory and return the ``config`` it filled."""
    compiled = compile_user_file(config_path, "config", dialect)
    namespace = user_namespace(compiled, {
        "__file__": config_path,
        "__name__": CONFIG_MODULE_NAME,
        "config": Config(),
        "Component": Component,
        "util": util,
        "options": options,
        "extra_options": extra_options,
        "localhost": LOCAL_HOST,
        "hosts": _host_groups(options),
    })
    with user_code(config_path, "config", cwd=os.path.dirname(config_path), dialect=dialect):
        exec(compiled.code, namespace)
    config = namespace.get("config")
    if not isinstance(config, Config):
        raise ConfigError(f"the name 'config' was rebound to a {type(config).__name__}; "
                          "add components with config.add_component(...)", file=config_path)
    return config


def _host_groups(options: Any) -> "HostGroups":
    """The ``--hosts-from`` groups the command line read (empty without the flag)."""
    from remote_runner.inventory import HostGroups
    groups = getattr(options, "host_groups", None)
    return groups if isinstance(groups, HostGroups) else HostGroups()


def load_experiment(config_file: str, options: Optional[argparse.Namespace],
                    muddler_file: Optional[str] = None, arg_parser_file: Optional[str] = None,
                    extra_args: Union[str, List[str], None] = None) -> Experiment:
    """Run arg parser, config and muddler (in that order) and validate the result.

    Raises :class:`ConfigError` for mistakes in any of the files and
    :class:`CopyError` for a missing local source, before any host is touched.
    """
    if options is None:
        options = argparse.Namespace(ssh_user=None)
    config_path = resolve_user_file(config_file, "config")
    muddler_path = resolve_user_file(muddler_file, "muddler") if muddler_file else None
    dialect = getattr(options, "python", None)
    extra_options = muddle.load_extra_options(arg_parser_file, extra_args,
                                              getattr(options, "ssh_user", None), dialect)
    if config_path.lower().endswith((".yaml", ".yml")):
        from remote_runner import yamlconfig
        config = yamlconfig.load_config(config_path, extra_options,
                                        _host_groups(options).as_dict())
    else:
        config = run_config(config_path, options, extra_options, dialect)
    config_dir = os.path.dirname(config_path)
    if muddler_path:
        before = len(config)
        config = muddle.apply_muddler(muddler_path, config, options, extra_options, config_dir,
                                      dialect)
        if before and not len(config):  # (else "the config added none" blames the config)
            raise ConfigError(f"the muddler left no components (the config added {before})",
                              file=muddler_path)
    return build_experiment(config, config_path, extra_options)

