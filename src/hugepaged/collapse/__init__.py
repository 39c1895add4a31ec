"""The collapse layer: process_madvise(MADV_COLLAPSE) calls, their outcomes, and the one
collapse path the daemon and the one-shot command share (path.py), with its CPU limiters
(limiter.py) and its bloat ledger (ledger.py)."""

from .calls import (
    TRANSIENT_BACKOFF,
    CollapseOutcome,
    collapse_run,
    collapse_window,
    collapse_windows,
    result_of_errno,
    retry_transient,
    window_now,
)
from .ledger import BloatLedger
from .limiter import Limiter, Pace, Pacer, ThreadMeter
from .path import COMMAND, DAEMON, MAX_BATCH, CollapseRules, ProcessCollapse, take_run

__all__ = ["COMMAND", "DAEMON", "MAX_BATCH", "TRANSIENT_BACKOFF", "BloatLedger",
           "CollapseOutcome", "CollapseRules", "Limiter", "Pace", "Pacer",
           "ProcessCollapse", "ThreadMeter", "collapse_run", "collapse_window",
           "collapse_windows", "result_of_errno", "retry_transient", "take_run", "window_now"]
