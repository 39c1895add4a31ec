"""hugepaged: khugepaged in userspace, collapsing with process_madvise(MADV_COLLAPSE)."""

import os

# numpy's OpenBLAS would start a thread per core at import (~0.1 s of CPU); hugepaged does
# no linear algebra.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
