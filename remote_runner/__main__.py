"""Allow ``python -m remote_runner``."""

from remote_runner.cli import finish, main

finish(main())
