"""Physical memory with no free 2 MiB block in it, and none that compaction can assemble, made
in seconds and given back at once: the state an allocation back-off is about.

1. The hugetlb pool takes all free memory but about `keep_mib` (a pool page is never touched,
   so this is fast where filling memory with 4 KiB pages would take minutes on a host that
   backs fresh memory lazily).
2. The filler (bench/scenarios/filler.py) fragments most of the rest: one page pinned in every
   2 MiB block it held (a pipe's reference: compaction can neither move it nor empty its
   block), the rest freed as 4 KiB pages.
3. The pool takes every block left, compacting the machine's movable memory into more.
What stays free (a few hundred MiB) is in pieces no huge page fits; MADV_COLLAPSE fails with
ENOMEM (ALLOC_HUGE_PAGE_FAIL). release() ends the filler and empties the pool: the memory comes
back as whole blocks, as when a virtual machine quits.

Run as root, under the machine lock (the pool, THP `enabled` while the filler runs: both
saved and restored whatever happens). Never imports hugepaged.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from kit.helpers import hugetlb_pool, meminfo_kb, saved_thp

FILLER = Path(__file__).resolve().parent.parent / "bench" / "scenarios" / "filler.py"
KEEP_MIB = 1536  # free memory the pool leaves at first: the filler's to fragment


@contextlib.contextmanager
def fragmented_memory(keep_mib: int = KEEP_MIB) -> Iterator[Callable[[], None]]:
    """Memory as the module's docstring says, for the block; yields release()."""
    with saved_thp(enabled="madvise"), hugetlb_pool(keep_free_mib=256) as pool:
        pool.grow((meminfo_kb("MemFree") // 1024 - keep_mib) // 2)
        filler = subprocess.Popen([sys.executable, str(FILLER),
                                   json.dumps({"headroom_mib": 384, "floor_mib": 256})],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def release() -> None:
            if filler.poll() is None:
                filler.stdin.write(b"exit\n")
                filler.stdin.flush()
                filler.wait(60)
            pool.release()

        try:
            ready = select.select([filler.stdout], [], [], 120)[0]
            info = json.loads(filler.stdout.readline()) if ready else {}
            if info.get("pid") != filler.pid:
                raise RuntimeError("the filler did not fragment memory")
            pool.grow(1 << 20)  # every block left, and what compaction can still assemble
            yield release
        finally:
            if filler.poll() is None:
                filler.kill()
                filler.wait()
