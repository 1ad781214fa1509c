# Sourced by the set-up scripts: make sure the rest of the calling script runs as root.
# Root (the usual case in containers, where sudo is often not installed) goes straight on;
# anyone else re-runs the script through sudo, or learns clearly why that is not possible.
# The lab needs root for network namespaces, apt-get for the packages.
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo bash "$(readlink -f "$0")" "$@"
    fi
    echo "$(basename "$0"): must run as root (apt-get, network namespaces); sudo is not" \
         "installed here, so run it from a root shell" >&2
    exit 1
fi
