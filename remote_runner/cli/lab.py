"""``remote-runner lab``: throwaway test hosts on this machine (root only)."""

from __future__ import annotations

import argparse
import time

from remote_runner.errors import ConfigError
from remote_runner.lab import LOCAL_ONLY, Lab


def add_parser(sub: "argparse._SubParsersAction") -> None:
    parser = sub.add_parser(
        "lab", help="throwaway local test hosts (network namespaces with their own sshd)",
        description="Throwaway test hosts h1..hN on this machine, each a network namespace "
                    f"with its own sshd and filesystem view. Needs root. {LOCAL_ONLY} is "
                    "local-only: hosts never see it.")
    parser.add_argument("-l", "--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    lab_sub = parser.add_subparsers(dest="lab_command", metavar="ACTION")
    lab_sub.required = True
    up = lab_sub.add_parser("up", help="start hosts h1..hN (idempotent)")
    up.add_argument("count", type=int, nargs="?", default=3, help="number of hosts (default 3)")
    up.add_argument("--foreign", action="append", default=[], metavar="HOST=RELEASE",
                    help="give HOST a Debian RELEASE root of its own (built once with debootstrap), "
                         "e.g. --foreign h4=bullseye; repeatable")
    up.set_defaults(func=_up)
    lab_sub.add_parser("down", help="stop every host and remove what the lab created").set_defaults(func=_down)
    lab_sub.add_parser("status", help="list hosts and whether their sshd answers").set_defaults(func=_status)
    lab_sub.add_parser("ssh-config", help="print the path of the lab's ssh_config").set_defaults(func=_ssh_config)


def _up(args: argparse.Namespace) -> int:
    lab = Lab()
    started = time.monotonic()
    foreign = {}
    for item in args.foreign:
        host, sep, release = item.partition("=")
        if not sep or not host or not release:
            raise ConfigError(f"--foreign expects HOST=RELEASE, got {item!r}")
        foreign[host] = release
    hosts = lab.up(args.count, foreign)
    print(f"lab: {len(hosts)} host(s) up in {time.monotonic() - started:.2f} s: "
          + " ".join(f"{h.name}={h.address}" for h in hosts))
    print(f"lab: ssh -F {lab.ssh_config} h1")
    return 0


def _down(args: argparse.Namespace) -> int:
    Lab().down()
    print("lab: down")
    return 0


def _status(args: argparse.Namespace) -> int:
    rows = Lab().status()
    if not rows:
        print("lab: no hosts")
        return 0
    for row in rows:
        print(f"{row['host']:<5} {row['address']:<15} pid {row['pid']!s:<8} {row['state']:<9} "
              f"{row['release'] or 'local overlay'}")
    return 0 if all(r["state"] == "up" for r in rows) else 1


def _ssh_config(args: argparse.Namespace) -> int:
    print(Lab().ssh_config)
    return 0
