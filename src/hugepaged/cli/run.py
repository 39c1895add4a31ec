"""`hugepaged run`: the daemon."""

import argparse

from hugepaged.cli.common import add_common, check_pids, check_socket, kernel_of
from hugepaged.paths import CONFIG as DEFAULT_PATH
from hugepaged.paths import STATE_FILE
from hugepaged.tunables import parse_assignments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon (khugepaged's scan loop)",
                       description="Scan registered processes pass by pass, as khugepaged "
                                   "does, and collapse what its checks allow.")
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML configuration (default {DEFAULT_PATH}, may be absent)")
    p.add_argument("--socket", metavar="PATH", help="control socket path")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics (a bare PORT or :PORT binds 127.0.0.1)")
    p.add_argument("--metrics-top-processes", type=int, metavar="N",
                   help="per-process coverage metrics for the N largest registered "
                        "processes (default 20; 0: none)")
    p.add_argument("--log-format", choices=("text", "json"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="targeted mode: only these processes (repeatable); default: all")
    p.add_argument("--state-file", default=STATE_FILE, metavar="PATH",
                   help="where the kernel's khugepaged settings are saved while "
                        "kernel_khugepaged=quiet (default %(default)s)")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
    options = {"socket": args.socket, "metrics": args.metrics,
               "metrics_top_processes": args.metrics_top_processes,
               "log_format": args.log_format, "log_level": args.log_level}
    service = Service(kernel, args.config, overrides, options, pids=args.pid,
                      state_file=args.state_file)
    require_collapse_support(kernel)
    setup_logging(service.options.log_format, service.options.log_level)
    control = ControlServer(service.options.socket, service, service.options.socket_group)
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
