"""`hugepaged run`: the daemon."""

import argparse

from hugepaged.cli.common import add_common, check_pids, check_socket, kernel_of
from hugepaged.options import OPTIONS
from hugepaged.paths import CONFIG as DEFAULT_PATH
from hugepaged.paths import STATE_FILE
from hugepaged.tunables import parse_assignments

FLAGS = [o for o in OPTIONS.values() if o.flag]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon (khugepaged's scan loop)",
                       description="Scan registered processes pass by pass, as khugepaged "
                                   "does, and collapse what its checks allow.")
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML configuration (default {DEFAULT_PATH}, may be absent)")
    for opt in FLAGS:  # the daemon options a command line may give (options.OPTIONS)
        default = f" (default {opt.default})" if opt.default is not None else ""
        p.add_argument(opt.cli, dest=opt.name, type=opt.type, metavar=opt.metavar,
                       choices=opt.choices or None, help=opt.doc + default)
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="targeted mode: only these processes (repeatable); default: all")
    p.add_argument("--state-file", default=STATE_FILE, metavar="PATH",
                   help="where the kernel's khugepaged settings are saved while "
                        "kernel_khugepaged=quiet (default %(default)s)")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hugepaged.preflight import require_root

    require_root()  # first: before the daemon's modules load (and anything is created)
    from hugepaged.control.server import ControlServer
    from hugepaged.daemon.service import Service
    from hugepaged.kernel.limits import raise_nofile
    from hugepaged.logs import setup_logging
    from hugepaged.preflight import require_collapse_support
    from hugepaged.sdnotify import SdNotify, attach

    kernel = kernel_of(args)
    check_pids(kernel, args.pid)
    raise_nofile()  # one pidfd per registered process
    if args.socket is not None:
        check_socket(args.socket)
    overrides = parse_assignments(args.assignments)
    options = {opt.name: getattr(args, opt.name) for opt in FLAGS}
    service = Service(kernel, args.config, overrides, options, pids=args.pid,
                      state_file=args.state_file)
    require_collapse_support(kernel)
    setup_logging(service.options.log_format, service.options.log_level)
    control = ControlServer(service.options.socket, service, service.options.socket_group,
                            group_may_set=service.options.socket_group_may_set)
    metrics = None
    notifier = SdNotify.from_environ()
    try:
        if service.options.metrics:
            from hugepaged.metrics import MetricsServer

            metrics = MetricsServer(service, service.options.metrics)
        attach(service, notifier)  # READY=1 once the loop starts; WATCHDOG=1; STOPPING=1
        return service.run(control)
    finally:
        if metrics is not None:
            metrics.close()
        control.close()
        notifier.close()
