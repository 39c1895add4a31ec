"""Where an installation keeps its files: the one place these paths are written.

A module of constants only, so that the command line can name them in its --help without
importing the modules that use them (a CLI must start fast)."""

CONFIG = "/etc/hugepaged/hugepaged.toml"  # the configuration file (may be absent)
SOCKET = "/run/hugepaged/hugepaged.sock"  # the daemon's control socket
STATE_FILE = "/run/hugepaged/kernel-khugepaged.json"  # the kernel's khugepaged, saved while quiet
