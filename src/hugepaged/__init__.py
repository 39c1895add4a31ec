"""hugepaged: khugepaged in userspace, collapsing with process_madvise(MADV_COLLAPSE)."""

__version__ = "0.1.0"
