"""Allow ``python -m remote_runner`` (a standby may run the command: :mod:`remote_runner.standby`)."""

from remote_runner.standby import launch

launch("tool")
