"""`hugepaged set KEY VALUE`: refused exactly like the kernel's sysfs; the old value stays."""

import argparse

from hugepaged.cli.common import add_socket, check_socket


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("set", help="change one tunable of the running daemon, live")
    p.add_argument("key")
    p.add_argument("value")
    add_socket(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_socket(args.socket)
    from hugepaged.control.client import request

    request(args.socket, {"cmd": "set", "key": args.key, "value": args.value})
    return 0
