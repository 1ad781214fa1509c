"""Allow ``python -m remote_runner``."""

import sys

from remote_runner.cli import main

sys.exit(main())
