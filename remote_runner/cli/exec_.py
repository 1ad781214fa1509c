"""``remote-runner exec``: run a local program on a remote host inside a mirror of this machine.

The program, its libraries, its inputs and its outputs stay on this machine;
the host lends its CPU, /dev, /proc, /sys, /run, network and clock. Nothing is
installed on the host. The exit status is the command's own (128+N when a
signal N killed it); 254 means the tool or the link failed, never the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional

from remote_runner.errors import EXIT_LINK, RunnerError

LOG = logging.getLogger("remote_runner.exec")


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``exec``."""
    parser = sub.add_parser(
        "exec", help="run a local program on a host inside a FUSE mirror of this machine",
        description="Run COMMAND on HOST with this machine's files: the program and its libraries "
                    "come from here, files are read from and written to the local disk, with the "
                    "local cwd and environment (minus SSH_AUTH_SOCK, DISPLAY, XDG_RUNTIME_DIR... "
                    "unless --forward-env). The host needs python3 >= 3.8, libfuse 3 or 2 and "
                    "/dev/fuse, nothing else. The SSH password, if any, is read from "
                    "$REMOTE_RUNNER_PASSWORD.",
        epilog="exit status: the command's (128+N if killed by signal N); 254 if the tool or "
               "the link failed.")
    parser.add_argument("-F", dest="ssh_config", metavar="FILE", help="ssh_config file to use")
    parser.add_argument("-u", "--user", help="log in as USER (default: ssh_config, then local user)")
    parser.add_argument("-P", "--port", type=int, help="SSH port")
    parser.add_argument("--accept-new-host-keys", action="store_true",
                        help="trust and record unknown host keys (changed keys are still refused)")
    parser.add_argument("--files-only", action="store_true",
                        help="run the host's own COMMAND, with only the local cwd and the local paths "
                             "named on the command line mounted at the same paths")
    parser.add_argument("--export", action="append", default=[], metavar="PATH[:ro]",
                        help="also serve PATH to the host, read-write (':ro': read-only); "
                             "repeatable. Served by default: /usr /bin /lib* /etc /opt read-only, "
                             "the program and its libraries read-only, the cwd, /tmp, /var/tmp and "
                             "paths named in the command read-write; never ~/.ssh, ~/.gnupg, "
                             "/etc/shadow and other secrets unless exported by name. "
                             "--export / serves everything")
    parser.add_argument("--read-only", action="store_true",
                        help="the host may change nothing it is served")
    parser.add_argument("--private-tmp", action="store_true",
                        help="give the command its own empty /tmp and /var/tmp on the host (a "
                             "tmpfs, gone when it ends) instead of this machine's: scratch files "
                             "(a test suite's, a compiler's) never cross the link. The cwd and "
                             "paths the command names under them are still this machine's; a "
                             "command run from /tmp itself, or naming a file directly in it, keeps "
                             "/tmp shared (no output is lost)")
    parser.add_argument("--local-tmpdir", action="store_true",
                        help="leave $TMPDIR alone: programs' anonymous temporary files (mkstemp, "
                             "mktemp, a compiler's) go to this machine's /tmp like any other path "
                             "(default: unless you set $TMPDIR to a place of your own, the command's "
                             "$TMPDIR is a fresh directory of the host, inside /tmp as the command "
                             "sees it, removed when the command ends; paths the command names in "
                             "/tmp are this machine's either way)")
    parser.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                        help="pass NAME through even though it is normally dropped (repeatable)")
    parser.add_argument("--no-compress", action="store_true", help="never compress file data (default: lz4 or zlib, "
                        "whichever both ends have, for data whose packing saves more link time "
                        "than it costs)")
    parser.add_argument("--no-cache", action="store_true",
                        help="read every file through the link; keep no copies on the host "
                             "(default: files opened read-only are fetched whole and kept in "
                             "~/.cache/remote-runner/files on the host, checked for changes "
                             "at every open)")
    parser.add_argument("--lanes", type=int, default=None, metavar="N",
                        help="extra SSH channels of the connection for large replies (file data), "
                             "past one channel's window (default 3; 0: everything on one channel)")
    parser.add_argument("--stats", metavar="FILE",
                        help="write the run's counters to FILE as JSON: requests served here per "
                             "operation, bytes each way, and the host's own counts (requests it "
                             "answered itself, from its caches)")
    parser.add_argument("--debug-rpc", action="store_true",
                        help="log every file-system request with its latency")
    parser.add_argument("-l", "--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("host", metavar="[USER@]HOST")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    parser.set_defaults(func=run)


class _Background(threading.Thread):
    """Run *func* in a thread; :meth:`result` waits and raises what it raised."""

    def __init__(self, func: Callable[[], Any]) -> None:
        super().__init__(daemon=True, name="connect")
        self._func = func
        self._error: Optional[BaseException] = None
        self.start()

    def run(self) -> None:
        try:
            self._func()
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc

    def result(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def run(args: argparse.Namespace) -> int:
    """Connect, run the command in the mirror, return its status."""
    if not args.command:
        LOG.error("exec: no command given (usage: remote-runner exec [options] HOST COMMAND [ARGS...])")
        return 2
    if args.debug_rpc and args.log_level not in ("DEBUG", "INFO"):
        logging.getLogger("remote_runner.mirror").setLevel(logging.INFO)
    from remote_runner.ssh import Connection, SSHOptions, resolve_password

    options = SSHOptions(ssh_config_file=args.ssh_config, user=args.user, port=args.port,
                         password=resolve_password(None, ask=False),
                         accept_new_host_keys=args.accept_new_host_keys)
    conn = Connection(args.host, options)
    # The handshake is mostly waiting for the host: the mirror's own imports and
    # what it works out here (the program's libraries, the profiles) go meanwhile.
    connecting = _Background(conn.connect)
    try:
        from remote_runner.mirror.session import MirrorOptions, plan_command, run_command
        mirror = MirrorOptions(files_only=args.files_only, forward_env=tuple(args.forward_env),
                               export=tuple(args.export), read_only=args.read_only,
                               debug_rpc=args.debug_rpc, compress=not args.no_compress,
                               file_cache=not args.no_cache, private_tmp=args.private_tmp,
                               host_tmpdir=not args.local_tmpdir)
        if args.lanes is not None:
            if not 0 <= args.lanes <= 8:
                LOG.error("exec: --lanes must be between 0 and 8 (OpenSSH allows 10 channels a connection)")
                return 2
            mirror.lanes = args.lanes
        plan = plan_command(conn, args.command, os.getcwd(), mirror)
        connecting.result()
        result = run_command(conn, args.command, options=mirror, plan=plan)
    except RunnerError as exc:
        LOG.error("exec: %s", exc)
        sys.stderr.write("remote-runner exec: the tool or the link failed (exit 254)\n")
        return EXIT_LINK
    finally:
        connecting.join(10)  # a handshake cut short (Ctrl-C while planning) ends with the process
        if not connecting.is_alive():
            conn.close()
    if result.message:
        LOG.error("exec: %s", result.message)
    if args.stats:
        try:
            with open(args.stats, "w") as handle:
                json.dump(result.stats, handle, indent=1, sort_keys=True)
        except OSError as exc:
            LOG.error("exec: cannot write the counters to %s: %s", args.stats, exc.strerror)
    return result.status
