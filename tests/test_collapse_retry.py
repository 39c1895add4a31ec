"""The one-shot collapse's retries of EAGAIN windows, as logic (tests/test_kernel_collapse.py
drives them on real pinned pages): which windows are asked again, when it stops."""

from __future__ import annotations

import errno

from hugepaged.collapse import CollapseOutcome, retry_transient
from hugepaged.errors import ProcessGone
from hugepaged.results import ScanResult as R

EAGAIN = CollapseOutcome(0x200000, R.COLLAPSE_EAGAIN, errno.EAGAIN, 0.001, 2)
LOCKED = CollapseOutcome(0x400000, R.PAGE_LOCK, errno.EAGAIN, 0.001, 2)  # named by a re-read
BUSY = CollapseOutcome(0x600000, R.COLLAPSE_EBUSY, errno.EBUSY, 0.001, 1)
DONE = CollapseOutcome(0x800000, R.SUCCEED, 0, 0.001, 1)


def test_only_eagain_windows_are_asked_again_until_they_succeed():
    asked: list[list[int]] = []
    waits: list[float] = []

    def again(todo):
        asked.append(todo)
        ok = len(asked) == 2  # the second retry succeeds
        return [CollapseOutcome(a, R.SUCCEED if ok else R.COLLAPSE_EAGAIN,
                                0 if ok else errno.EAGAIN, 0.001, 1) for a in todo]

    out = retry_transient([EAGAIN, BUSY, LOCKED, DONE], again, (0.1, 0.2, 0.3), waits.append)
    assert asked == [[EAGAIN.address, LOCKED.address]] * 2
    assert waits == [0.1, 0.2]
    assert [o.address for o in out] == [EAGAIN.address, BUSY.address, LOCKED.address,
                                        DONE.address]
    assert [o.result for o in out] == [R.SUCCEED, R.COLLAPSE_EBUSY, R.SUCCEED, R.SUCCEED]
    assert [o.attempts for o in out] == [4, 1, 4, 1]


def test_still_eagain_after_every_backoff_is_reported_so():
    out = retry_transient([EAGAIN], lambda todo: [EAGAIN], (0.0, 0.0), lambda d: None)
    assert out[0].result == R.COLLAPSE_EAGAIN and out[0].attempts == 6


def test_a_process_gone_meanwhile_keeps_its_first_outcomes():
    def gone(todo):
        raise ProcessGone("pid 1: process has exited")

    assert retry_transient([EAGAIN, DONE], gone, (0.0,), lambda d: None) == [EAGAIN, DONE]


def test_nothing_transient_means_no_wait():
    waits: list[float] = []
    assert retry_transient([BUSY, DONE], lambda t: [], (1.0,), waits.append) == [BUSY, DONE]
    assert waits == []
