"""pytest marks and skips shared by the tests: the real kernel, root, the tools a test drives."""

import os
import shutil

import pytest

from kit.helpers import KHUGEPAGED_DIR, THP_DIR

ROOT_REASON = "needs root: PFNs in pagemap, /proc/kpageflags, MADV_COLLAPSE, THP knobs"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)
needs_thp = pytest.mark.skipif(not (THP_DIR / "enabled").exists(), reason="kernel without THP")
KERNEL = [pytest.mark.kernel, needs_root, needs_thp]
ORACLE = [pytest.mark.oracle, *KERNEL,
          pytest.mark.skipif(not (KHUGEPAGED_DIR / "full_scans").exists(),
                             reason="kernel without THP / khugepaged")]


def kernel_test(fn):
    """A test on a real workload: the machine lock (conftest's, by the mark), root, THP."""
    for mark in KERNEL:
        fn = mark(fn)
    return fn


def require_tool(name: str, install: str) -> str:
    """The tool's path; a skip with the reason where it is missing, but a failure under CI."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path
