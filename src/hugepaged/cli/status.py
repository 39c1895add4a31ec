"""`hugepaged status`: the daemon's state, tunables and counters."""

import argparse

from hugepaged import report
from hugepaged.cli.common import check_socket
from hugepaged.config import DEFAULT_SOCKET
from hugepaged.control.client import request


def add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"control socket (default {DEFAULT_SOCKET})")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the running daemon's state and counters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_socket(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_socket(args.socket)
    status = request(args.socket, {"cmd": "status"})["status"]
    if args.json:
        report.print_json(status)
    else:
        report.print_status(status)
    return 0
