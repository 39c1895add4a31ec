"""A cheap look at every process: how much anonymous memory each has, how much of it is huge,
and why the rest is or is not a candidate under the policy it would get.

For the daemon's first words (firstrun) and `hugepaged suggest`: no page walk of our own (no
pagemap, no kpageflags, no numpy). /proc/PID/status (counters the kernel keeps) picks the
processes with at least one huge page's worth of anonymous memory, and only those have their
smaps read (the kernel sums each VMA for us, which is what tells MADV_HUGEPAGE and
MADV_NOHUGEPAGE apart: smaps_rollup has no VmFlags). Each VMA is judged by the scan's own
eligibility rules (scan.eligibility.ineligible), under the process's own policy (its target's
or the global one). Private anonymous memory is what is summed; shared memory counts only as
something a policy can take (the same segment mapped by many processes would otherwise be
counted many times).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from hugepaged.errors import HugepagedError
from hugepaged.kernel import Kernel
from hugepaged.kernel.geometry import Geometry
from hugepaged.kernel.procfs import Vma
from hugepaged.policy import CollapseControl
from hugepaged.scan.eligibility import collapsible, ineligible
from hugepaged.scan.shmem import ShmemModes

# smaps is read for at most this many processes, the largest first: a machine with ten
# thousand small processes still costs a fraction of a second.
MAX_LOOKED_AT = 256


@dataclass
class Look:
    """One process: its anonymous memory, huge and not, the part a policy can take, and the
    rest by the reason it cannot (hugepaged's Ineligible names), all in kB."""

    pid: int
    comm: str
    anon_kb: int = 0
    huge_kb: int = 0
    takeable_kb: int = 0  # not yet huge, in candidate VMAs (shared memory included)
    candidate_huge_kb: int = 0  # huge already, in candidate VMAs
    not_taken_kb: dict[str, int] = field(default_factory=dict)
    target: str | None = None

    @property
    def small_kb(self) -> int:
        """Anonymous memory not mapped huge."""
        return max(0, self.anon_kb - self.huge_kb)


def candidates(kernel: Kernel, pids: list[int] | None = None) -> list[tuple[int, str, int]]:
    """(pid, comm, RssAnon kB) of the user processes (no kernel thread, not ourselves) with
    at least one huge page of anonymous memory, largest first, at most MAX_LOOKED_AT."""
    pmd_kb = kernel.geometry.pmd_size >> 10
    me = os.getpid()
    out = []
    for pid in kernel.procfs.pids() if pids is None else pids:
        if pid == me:
            continue
        try:
            st = kernel.procfs.stat(pid)
            if st.is_kernel_thread:
                continue
            status = kernel.procfs.status(pid)
        except (HugepagedError, OSError, ValueError, IndexError):
            continue  # gone, or not ours to read: nothing to say about it
        if status.rss_anon_kb >= pmd_kb:
            out.append((pid, st.comm, status.rss_anon_kb))
    out.sort(key=lambda c: -c[2])
    return out[:MAX_LOOKED_AT]


def look(kernel: Kernel, pid: int, comm: str, control: CollapseControl,
         shmem: ShmemModes) -> Look | None:
    """One process judged VMA by VMA from its smaps; None if it is gone or unreadable."""
    read = read_vmas(kernel, pid)
    return None if read is None else judge(pid, comm, *read, control, shmem, kernel.geometry)


def read_vmas(kernel: Kernel, pid: int) -> tuple[list[Vma], bool] | None:
    """(its VMAs, THP disabled for it) or None if it is gone or unreadable."""
    try:
        thp_disabled = not kernel.procfs.status(pid).thp_enabled
        return kernel.procfs.smaps(pid), thp_disabled
    except (HugepagedError, OSError):
        return None


def judge(pid: int, comm: str, vmas: list[Vma], thp_disabled: bool,
          control: CollapseControl, shmem: ShmemModes, geometry: Geometry) -> Look:
    """What `control` would take of these VMAs, and why not the rest."""
    out = Look(pid, comm, target=control.target)
    for vma in vmas:
        facts = collapsible(vma)
        if facts is None:
            continue
        why = ineligible(vma, control, thp_disabled, geometry,
                         shmem if facts.shared else None)
        huge = facts.huge_kb(vma)
        small = max(0, facts.resident_kb(vma) - huge)
        if not facts.shared:
            out.anon_kb += vma.anonymous_kb
            out.huge_kb += huge
        if why is None:
            out.takeable_kb += small
            out.candidate_huge_kb += huge
        elif not facts.shared and small:
            out.not_taken_kb[str(why)] = out.not_taken_kb.get(str(why), 0) + small
    return out


def shmem_modes(kernel: Kernel) -> ShmemModes:
    """The kernel's shmem controls, read once per survey."""
    try:
        return ShmemModes(str(kernel.thp.read("shmem_enabled")),
                          kernel.thp.shmem_enabled_pmd())
    except (OSError, ValueError):
        return ShmemModes()


def survey(kernel: Kernel, control_for: Callable[[int, str], CollapseControl],
           pids: list[int] | None = None) -> list[Look]:
    """Every candidate process looked at under `control_for(pid, comm)`, largest first."""
    modes = shmem_modes(kernel)
    looks = []
    for pid, comm, _ in candidates(kernel, pids):
        one = look(kernel, pid, comm, control_for(pid, comm), modes)
        if one is not None:
            looks.append(one)
    return looks
