"""pytest marks shared by the tests that run against the real kernel."""

import os

import pytest
from helpers import KHUGEPAGED_DIR, THP_DIR

ROOT_REASON = "needs root: PFNs in pagemap, /proc/kpageflags, MADV_COLLAPSE, THP knobs"

KERNEL = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    pytest.mark.skipif(not (THP_DIR / "enabled").exists(), reason="kernel without THP"),
]
ORACLE = [pytest.mark.oracle, *KERNEL,
          pytest.mark.skipif(not (KHUGEPAGED_DIR / "full_scans").exists(),
                             reason="kernel without THP / khugepaged")]
