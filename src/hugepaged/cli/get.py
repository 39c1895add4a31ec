"""`hugepaged get KEY`: the value alone, as reading the sysfs file gives it."""

import argparse

from hugepaged.cli.common import add_socket, check_socket


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("get", help="print one tunable or counter of the running daemon")
    p.add_argument("key")
    add_socket(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_socket(args.socket)
    from hugepaged.control.client import request
    from hugepaged.names import printable

    # Data, not terminal input: whatever holds the socket may send control characters.
    print(printable(str(request(args.socket, {"cmd": "get", "key": args.key})["value"])))
    return 0
