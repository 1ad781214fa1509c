"""Example muddler (SPAR's arg_muddler): append "muddled" to every component's arguments.

    remote_runner.py -c configs/localhost.py -m configs/example_muddler.py

A muddler defines ``muddle(config)`` or ``muddle(config, options)`` and changes the config
in place; it runs after the config and before validation.
"""


def muddle(config, options):
    """Append 'muddled' (and the SSH user, if any) to every component's args."""
    for component in config.all_components():
        component.args = list(component.args) + ["muddled"]
        if getattr(options, "ssh_user", None):
            component.args.append("user=" + options.ssh_user)
