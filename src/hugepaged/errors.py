"""The project's errors; each carries the exit status the command line gives it."""


class HugepagedError(Exception):
    """Base: a clear one-line message, never a traceback."""

    exit_status = 1


class InvalidTunable(HugepagedError):
    """Refused like the kernel's sysfs refuses a write (EINVAL)."""

    exit_status = 2


class UsageError(HugepagedError):
    """Bad command-line input other than a tunable."""

    exit_status = 2


class AccessDenied(HugepagedError):
    """EPERM/EACCES: not root, or the target refuses ptrace-read access."""

    exit_status = 3


class Unsupported(HugepagedError):
    """The kernel lacks what is needed (THP compiled out, no MADV_COLLAPSE, ...)."""

    exit_status = 4


class ProcessGone(HugepagedError):
    """The process exited (ESRCH, or its /proc directory vanished)."""

    exit_status = 5


class DaemonUnreachable(HugepagedError):
    """The control socket is absent or refuses us."""

    exit_status = 6


class AlreadyRunning(HugepagedError):
    """Another daemon holds this control socket or state file: a second one refuses to start."""

    exit_status = 6
