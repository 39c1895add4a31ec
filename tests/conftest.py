"""Shared pytest set-up: kernel tests hold the machine lock; fixtures more than one file uses."""

import os
import subprocess

import pytest

from kit.helpers import knob_snapshot, machine_lock, restore_knobs, saved_thp


@pytest.fixture(scope="session", autouse=True)
def _session_lock():
    """HUGEPAGED_TEST_LOCK=session: the machine lock is taken once for the whole run (and
    every test's own lock is then free), so a full run on a machine others share waits for
    its turn once, not once per test."""
    if os.environ.get("HUGEPAGED_TEST_LOCK") != "session":
        yield
        return
    with machine_lock():
        yield


@pytest.fixture(autouse=True)
def _kernel_lock(request):
    """A test marked `kernel` sees THP state no other test or benchmark is changing, and
    leaves it as it found it: a knob it left changed (a daemon killed before it could
    restore what it quieted, say) is put back and the test fails, naming the knob."""
    if request.node.get_closest_marker("kernel") is None:
        yield
        return
    with machine_lock():
        before = knob_snapshot() if os.geteuid() == 0 else None
        yield
        if before is None:
            return
        after = knob_snapshot()
        if after != before:
            restore_knobs(before)
            changed = {k: f"{before[k]} -> {after.get(k)}" for k in before
                       if after.get(k) != before[k]}
            pytest.fail(f"the test left kernel state changed (knobs restored): {changed}")


TRACEFS = "/sys/kernel/tracing"


@pytest.fixture(scope="session", autouse=True)
def _tracefs_as_found():
    """The daemons mount tracefs when it is absent (for the syscall tracepoints) and unmount
    what they mounted, but a daemon a test kills with SIGKILL cannot: leave it as found."""
    mounted = os.path.ismount(TRACEFS)
    yield
    if not mounted and os.path.ismount(TRACEFS) and os.geteuid() == 0:
        subprocess.run(["umount", TRACEFS], check=False, capture_output=True)


@pytest.fixture
def thp_never():
    """Kernel THP at never for the test: the kernel's khugepaged stays out."""
    with saved_thp(enabled="never"):
        yield
