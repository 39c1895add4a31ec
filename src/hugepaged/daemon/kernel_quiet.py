"""kernel_khugepaged = "quiet": turn the kernel's own scanning down while hugepaged runs.

The kernel's values are saved to a state file before they change, so that even after a
SIGKILL the next start (or `hugepaged restore-kernel`) puts them back.
"""

import logging
import os

from hugepaged.kernel.sysfs import ThpSysfs

log = logging.getLogger("hugepaged")
STATE_FILE = "/run/hugepaged/kernel-khugepaged.json"
# One window per pass, one pass per ~49 days: the thread stays, its scanning stops.
QUIET = {"pages_to_scan": 1, "scan_sleep_millisecs": 2**32 - 1}


class KernelQuieter:
    def __init__(self, thp: ThpSysfs, state_file: str = STATE_FILE) -> None:
        self.thp, self.state_file = thp, state_file
        self.saved: dict | None = None

    def recover(self) -> bool:
        """Restore values left behind by a run that could not restore them."""
        try:
            with open(self.state_file) as f:
                import json

                saved = json.load(f)
        except (FileNotFoundError, ValueError):
            return False
        self.thp.restore(saved)
        os.unlink(self.state_file)
        log.warning("restored the kernel's khugepaged settings left by an earlier run: %s",
                    saved, extra={"event": "kernel_restore", **saved})
        return True

    def quiet(self) -> None:
        self.recover()
        self.saved = self.thp.snapshot(tuple(QUIET))
        os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
        with open(self.state_file, "w") as f:
            import json

            json.dump(self.saved, f)
        for name, value in QUIET.items():
            self.thp.write(name, value)
        log.info("kernel khugepaged quieted (was %s)", self.saved,
                 extra={"event": "kernel_quiet", **self.saved})

    def restore(self) -> None:
        if self.saved is None:
            return
        self.thp.restore(self.saved)
        self.saved = None
        if os.path.exists(self.state_file):
            os.unlink(self.state_file)
        log.info("kernel khugepaged settings restored", extra={"event": "kernel_restore"})
