"""`hugepaged status`: the daemon's state, tunables and counters."""

import argparse

from hugepaged.cli.common import add_socket, check_socket


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the running daemon's state and counters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_socket(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_socket(args.socket)
    from hugepaged import report
    from hugepaged.control.client import request

    status = request(args.socket, {"cmd": "status"})["status"]
    if args.json:
        report.print_json(status)
        return 0
    try:
        report.print_status(status)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        from hugepaged.errors import DaemonUnreachable

        raise DaemonUnreachable(f"{args.socket}: malformed status: {type(err).__name__}: "
                                f"{err}") from None
    return 0
