"""kernel_khugepaged = "quiet": turn the kernel's own scanning down while hugepaged runs.

The kernel's values are saved to a state file before they change, so that even after a
SIGKILL the next start (or `hugepaged restore-kernel`) puts them back. The state file is
one daemon's: a lock next to it (flock, held while quiet) makes a second daemon refuse to
quiet over it, and keeps a starting daemon or `restore-kernel` from "recovering" the values
of a daemon that is alive. Only knobs still at the quiet values are put back, as tuned
restores only what it saved: a value an admin wrote meanwhile is theirs and stays.

The state file is root's data at a path an admin chose: its directory must be one no other
user can change (kernel.limits.check_private_dir), it must be a regular file of ours (a FIFO,
a directory or a symlink is refused with one line, never opened for a blocking read), it is
written by rename from a temporary file, and a value that is not one the kernel could have
had (`1e999`, a string) is never written back.
"""

import contextlib
import logging
import os

from hugepaged import paths
from hugepaged.errors import AlreadyRunning
from hugepaged.kernel.limits import (
    LockHeld,
    check_private_dir,
    read_own,
    try_lock,
    write_atomic,
)
from hugepaged.kernel.sysfs import ThpSysfs
from hugepaged.names import printable

log = logging.getLogger("hugepaged")
STATE_FILE = paths.STATE_FILE
# One window per pass, one pass per ~49 days: the thread stays, its scanning stops.
QUIET = {"pages_to_scan": 1, "scan_sleep_millisecs": 2**32 - 1}
# The values the kernel accepts for each saved knob (an unsigned int; pages_to_scan not 0).
VALID = {"pages_to_scan": (1, 2**32 - 1), "scan_sleep_millisecs": (0, 2**32 - 1)}


class KernelQuieter:
    def __init__(self, thp: ThpSysfs, state_file: str = STATE_FILE) -> None:
        self.thp, self.state_file = thp, state_file
        self.lock_file = f"{state_file}.lock"
        self.saved: dict | None = None
        self._lock_fd: int | None = None

    # --- the lock ------------------------------------------------------------------------
    def _acquire(self) -> bool:
        """True if we hold the lock now (already or newly); False if a live daemon does."""
        if self._lock_fd is not None:
            return True
        directory = os.path.dirname(self.state_file) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        check_private_dir(directory, "--state-file")
        try:
            self._lock_fd = try_lock(self.lock_file)
        except LockHeld as held:
            self.holder = held
            return False
        return True

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder_text(self) -> str:
        held = getattr(self, "holder", None)
        return held.describe() if held is not None else ""

    # --- saving and restoring --------------------------------------------------------------
    def recover(self) -> bool:
        """Restore values left behind by a run that could not restore them (never those of
        a daemon that is running: it holds the lock)."""
        if not self._acquire():
            return False
        try:
            return self._recover_locked()
        finally:
            if self.saved is None:
                self._release()

    def _recover_locked(self) -> bool:
        data = read_own(self.state_file)  # UnsafePath (exit 2) when not a file of ours
        if data is None:
            return False
        saved, bad = parse_state(data)
        if bad:
            log.warning("%s: not a value the kernel could have had, not written back: %s",
                        self.state_file, bad,
                        extra={"event": "kernel_restore_refused", "state_file": self.state_file})
        if not saved:  # nothing the kernel could have had: nothing to put back
            os.unlink(self.state_file)
            return False
        kept = self._put_back(saved)
        os.unlink(self.state_file)
        log.warning("restored the kernel's khugepaged settings left by an earlier run: %s%s",
                    saved, f" (kept values changed since: {kept})" if kept else "",
                    extra={"event": "kernel_restore", **saved})
        return True

    def _put_back(self, saved: dict) -> dict:
        """Write back each saved knob that is still at its quiet value; returns the ones left
        alone because someone set them since (name: value found)."""
        kept = {}
        for name, quiet in QUIET.items():
            if name not in saved:
                continue
            now = self.thp.read(name)
            if now == quiet:
                if now != saved[name]:
                    self.thp.write(name, saved[name])
            else:
                kept[name] = now
        return kept

    def quiet(self) -> None:
        if not self._acquire():
            raise AlreadyRunning(f"{self.state_file}: another hugepaged{self.holder_text()} "
                                 "has quieted the kernel's khugepaged; its saved values stay "
                                 "its own")
        try:
            self._recover_locked()
            self.saved = self.thp.snapshot(tuple(QUIET))
            import json

            write_atomic(self.state_file, json.dumps(self.saved).encode())
            for name, value in QUIET.items():
                self.thp.write(name, value)
        except BaseException:
            if self.saved is not None:
                self.restore()
            self._release()
            raise
        log.info("kernel khugepaged quieted (was %s)", self.saved,
                 extra={"event": "kernel_quiet", **self.saved})

    def restore(self) -> None:
        if self.saved is None:
            return
        try:
            kept = self._put_back(self.saved)
            self.saved = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_file)
            # Nothing is left to restore: the lock goes too, removed while held (as
            # limits.try_lock allows), so a normal stop leaves no file behind.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_file)
        finally:
            self._release()
        if kept:
            log.warning("kernel khugepaged settings restored, except values changed while "
                        "quiet, kept: %s", kept, extra={"event": "kernel_restore", "kept": kept})
        else:
            log.info("kernel khugepaged settings restored", extra={"event": "kernel_restore"})


def parse_state(data: bytes) -> tuple[dict[str, int], str]:
    """The saved knobs a state file holds, each an integer the kernel accepts; and, escaped
    and short, what was refused ("" when nothing was)."""
    import json

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}, printable(data[:80].decode("utf-8", "replace")) or "empty file"
    if not isinstance(doc, dict):
        return {}, printable(repr(doc)[:80])
    saved, bad = {}, {}
    for name, (lo, hi) in VALID.items():
        value = doc.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            saved[name] = value
        elif name in doc:
            bad[name] = value
    return saved, printable(repr(bad)[:120]) if bad else ""
