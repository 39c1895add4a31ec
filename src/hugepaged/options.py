"""The daemon's own options (not tunables: they cannot change live): one table, from which
the DaemonOptions dataclass, the configuration file's checks and `hugepaged run`'s
command-line options are derived.

A module of the table only (no configuration parser, no kernel layer), so that building the
command line costs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from hugepaged import paths


@dataclass(frozen=True)
class Option:
    """One option: its TOML type, default, the words it takes or the integer range, and
    whether `hugepaged run` takes it on the command line too (`--name-with-dashes`)."""

    name: str
    type: type
    default: object = None
    choices: tuple[str, ...] = ()
    range: tuple[int, int] | None = None
    flag: bool = False
    metavar: str | None = None
    doc: str = field(default="", compare=False)

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("socket", str, paths.SOCKET, flag=True, metavar="PATH",
           doc="control socket path"),
    Option("socket_group", str, doc="a group whose members may use the control socket "
                                    "(mode 0660); default: root only (0600)"),
    Option("socket_group_may_set", bool, False,
           doc="members of socket_group may also set tunables (default: they may read: "
               "status, get; only root sets)"),
    Option("metrics", str, flag=True, metavar="HOST:PORT",
           doc="serve Prometheus metrics (a bare PORT or :PORT binds 127.0.0.1)"),
    Option("metrics_top_processes", int, 0, range=(0, 100000), flag=True, metavar="N",
           doc="per-process coverage metrics (pid, comm, memory) for the N largest "
               "registered processes; anyone who can reach --metrics reads them (0: none)"),
    Option("log_format", str, "text", choices=("text", "json"), flag=True,
           doc="human lines, or one JSON object per line"),
    Option("log_level", str, "info", choices=("debug", "info", "warning", "error"),
           flag=True, doc="the least severe level logged"),
    Option("exclude_comm", str, doc="a regular expression: processes whose whole comm "
                                    "matches are never registered"),
)}

# The options of one daemon run: a field per OPTIONS row.
DaemonOptions = make_dataclass(
    "DaemonOptions",
    [(o.name, o.type if o.default is not None else o.type | None,  # type: ignore[operator]
      field(default=o.default)) for o in OPTIONS.values()])
DaemonOptions.__module__ = __name__
