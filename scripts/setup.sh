#!/usr/bin/env bash
# Install what remote_runner, its demo and its tests need on Debian 12, as root.
# Safe to re-run: apt-get runs only when something is missing, the venv is reused.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."

PACKAGES=(openssh-server openssh-client screen fuse3 libfuse3-3 openssl iproute2 util-linux
          procps psmisc python3 python3-venv gcc libc6-dev ffmpeg rsync sshfs git debootstrap libfuse2
          libpython3.11-testsuite tmux tcsh csh zsh fish)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    # Keep the packages' services (sshd on port 22 of this machine) from starting:
    # the lab runs its own sshd per host and this machine needs no listener.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: ready ($(.venv/bin/remote-runner --version))"
