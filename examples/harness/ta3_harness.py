#!/usr/bin/env python3
"""A small test harness the TA3 muddler wraps ``publisher*`` components in.

It runs the wrapped program, prefixes every line the program writes with a UTC
timestamp, the component name and the stream (``out``/``err``), writes a JSON
summary (command, exit status, start/end time, duration, line counts) when the
program ends, and exits with the program's status (128+N if a signal N killed
it, 127 if it could not be found, 126 if it could not be run).

It must run on bare hosts that have nothing but a python3, so it uses only the
standard library and syntax that Python 3.6 understands. SIGTERM, SIGINT and
SIGHUP are passed on to the program, so stopping the harness stops the program
and still leaves a summary behind.

Usage: ta3_harness.py [--name NAME] [--summary FILE] [--log FILE] [--] PROGRAM [ARG...]
"""

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time


def utc_stamp():
    """Return the current UTC time as an ISO-8601 string with milliseconds."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


class Output(object):
    """Write prefixed lines to stdout (and an optional log file), one whole line at a time."""

    def __init__(self, name, log_path):
        self.name = name
        self.lock = threading.Lock()
        self.counts = {"out": 0, "err": 0}
        self.log = open(log_path, "a") if log_path else None

    def line(self, stream, text):
        """Emit one prefixed line of *stream* (``out``, ``err`` or ``harness``)."""
        text = "%s [%s] %s| %s\n" % (utc_stamp(), self.name, stream, text)
        with self.lock:
            if stream in self.counts:
                self.counts[stream] += 1
            sys.stdout.write(text)
            sys.stdout.flush()
            if self.log:
                self.log.write(text)
                self.log.flush()

    def pump(self, pipe, stream):
        """Copy *pipe* line by line to the output until it closes."""
        for raw in iter(pipe.readline, b""):
            self.line(stream, raw.rstrip(b"\r\n").decode("utf-8", "replace"))
        pipe.close()


def parse(argv):
    """Parse the harness options; everything from PROGRAM on belongs to the program."""
    parser = argparse.ArgumentParser(prog="ta3_harness.py",
                                     description="Run PROGRAM under the TA3 test harness.")
    parser.add_argument("--name", default=None, help="name shown in each line (default: PROGRAM)")
    parser.add_argument("--summary", default=None, help="write a JSON result summary here")
    parser.add_argument("--log", default=None, help="also append the prefixed lines to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="PROGRAM [ARG...]")
    # Split at the first "--" ourselves: argparse's handling of "--" before a
    # REMAINDER differs between Python versions.
    if "--" in argv:
        cut = argv.index("--")
        options = parser.parse_args(argv[:cut])
        options.command = argv[cut + 1:]
    else:
        options = parser.parse_args(argv)
    if not options.command:
        parser.error("no PROGRAM given")
    return options


def write_summary(path, summary):
    """Write *summary* as JSON to *path* atomically (readers never see half a file)."""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.rename(tmp, path)


def start(command, output):
    """Start *command* with piped output; return (process, None) or (None, (status, error))."""
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        status = 127 if isinstance(exc, FileNotFoundError) else 126
        output.line("harness", "cannot run %s: %s" % (command[0], exc.strerror or exc))
        return None, (status, "%s: %s" % (type(exc).__name__, exc.strerror or exc))
    return process, None


def forward_signals(process):
    """Pass SIGTERM, SIGINT and SIGHUP on to *process*; remember which one arrived."""
    received = []

    def handler(signum, _frame):
        received.append(signum)
        try:
            process.send_signal(signum)
        except OSError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)
    return received


def main(argv=None):
    """Run the wrapped program and return the status the harness should exit with."""
    options = parse(sys.argv[1:] if argv is None else argv)
    name = options.name or os.path.basename(options.command[0])
    output = Output(name, options.log)
    output.line("harness", "starting: %s" % " ".join(shlex.quote(a) for a in options.command))
    started_wall, started = utc_stamp(), time.monotonic()
    process, failure = start(options.command, output)
    received, signal_number = [], None
    if process is not None:
        received = forward_signals(process)
        pumps = [threading.Thread(target=output.pump, args=(process.stdout, "out")),
                 threading.Thread(target=output.pump, args=(process.stderr, "err"))]
        for pump in pumps:
            pump.start()
        returncode = process.wait()
        for pump in pumps:
            pump.join()
        if returncode < 0:
            signal_number = -returncode
            status = 128 + signal_number
        else:
            status = returncode
        error = None
    else:
        status, error = failure
    duration = time.monotonic() - started
    output.line("harness", "finished: exit status %d after %.3f s" % (status, duration))
    if options.summary:
        write_summary(options.summary, {
            "name": name,
            "command": options.command,
            "exit_status": status,
            "signal": signal_number,
            "signals_forwarded": received,
            "error": error,
            "started": started_wall,
            "ended": utc_stamp(),
            "duration_s": round(duration, 6),
            "lines": dict(output.counts),
            "host": os.uname()[1],
            "cwd": os.getcwd(),
        })
    return status


if __name__ == "__main__":
    sys.exit(main())
