#!/usr/bin/env bash
# Install everything, bring up 3 throwaway lab hosts and run the example
# experiment on them with the TA3 muddler; then show how to watch it.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
remote-runner lab up 3
cfg=$(remote-runner lab ssh-config)
# Lab hosts know each other by name (h1, h2, ...), so the clients reach the server as "h1".
remote_runner.py -F "$cfg" -c examples/experiment.py -m muddlers/ta3_muddler.py --screen runner
cat <<MSG

The experiment is running on lab hosts h1..h3, one screen window per component.
Watch it:      ssh -F $cfg -t h1 screen -r runner      (detach: Ctrl-a d)
List windows:  ssh -F $cfg h2 screen -S runner -Q windows
Stop the lab:  $PWD/.venv/bin/remote-runner lab down
A standby (the runner, already loaded) serves the next commands, e.g. remote-runner status, and
exits after 10 idle minutes; REMOTE_RUNNER_STANDBY=0 runs each command in its own process.
MSG
