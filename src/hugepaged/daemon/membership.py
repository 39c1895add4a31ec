"""Membership: which processes the daemon scans, and by which policy (the kernel's
__khugepaged_enter, __khugepaged_exit and collect_mm_slot, with hugepaged's targets).

It owns the registry (the mm_slot list), the targets and their per-target states, the
exclusions, the fork events waiting for their settle delay, and what is known not to be
ours (kernel threads, unreadable processes). Whoever keeps something per process (the pass
its read chunk, the collapser its lanes) listens for exits through `on_exit`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable

from hugepaged.errors import HugepagedError
from hugepaged.kernel.madvise import pidfd_open
from hugepaged.kernel.procfs import PF_KTHREAD
from hugepaged.policy import CollapseControl
from hugepaged.targets import ProcessFacts, Target, control_under, first_match

from .counters import Counters
from .promise import BOOST
from .registry import MmSlot, Registry
from .targets import TargetState, TargetStates, target_changes

log = logging.getLogger("hugepaged")
ADMIT_BATCH = 256  # deferred fork events turned into slots per wake-up of the loop
# An exec or a rename is acted on this long after it is seen, once however many came: a
# process that execs itself thousands of times a second costs ten resolutions a second.
CHANGE_SETTLE = 0.1
NEW_PROCESS_SETTLE = 1.0  # "insert behind the cursor, to let the area settle down"


class Membership:
    """The registry and everything that decides who is in it, and under which target."""

    def __init__(self, kernel, control: CollapseControl, counters: Counters,
                 clock: Callable[[], float]) -> None:
        self.kernel, self.control, self.counters, self.clock = kernel, control, counters, clock
        self.registry = Registry()
        self.targets: list[Target] = []
        self.identities: dict[int, int] = {}  # pid -> start time, of the targets' pid keys
        self.target_states = TargetStates()
        self.kthreads: set[int] = set()
        self.unreadable: set[int] = set()  # alive but not ours to read: dropped, not re-entered
        self.only_pids: set[int] | None = None  # targeted mode: these processes only
        self.exclude_comm: re.Pattern | None = None
        # Fork events wait here for their settle delay before they cost a pidfd or a /proc
        # read: a process that exits first never does. Insertion order is due order.
        self.pending: dict[int, float] = {}
        # Execs and renames of registered processes waiting for CHANGE_SETTLE: pid -> (when
        # due, an exec among them).
        self.changed: dict[int, tuple[float, bool]] = {}
        self.on_exit: list[Callable[[int], None]] = []  # called before a slot goes
        self.lost_records, self.lost_woken = 0, float("-inf")  # daemon/advice.py on_lost

    # --- policy ----------------------------------------------------------------------
    def control_for(self, slot: MmSlot) -> CollapseControl:
        """The policy this slot's process is decided and collapsed by (the kernel passes a
        struct collapse_control down the same way): its target's, resolved at registration,
        on exec and on reload, or the global one."""
        return slot.control if slot.control is not None else self.control

    def state_of(self, slot: MmSlot) -> TargetState | None:
        return self.target_states.get(self.control_for(slot).target)

    def set_control(self, control: CollapseControl) -> None:
        """New global tunables: every slot's policy is its target's over the new ones."""
        self.control = control
        # list(): this runs on the control thread (`hugepaged set`) while the loop may drop
        # slots; a slot woken mid-visit is not settled by that visit (see the pass).
        for slot in list(self.registry.slots.values()):
            self._apply_target(slot, slot.target)

    def wake_all(self) -> None:
        for slot in list(self.registry.slots.values()):
            slot.wake()

    def set_targets(self, targets: list[Target], source: str | None = None) -> None:
        """A new list of targets (start-up; a reload names its `source` and has each change
        of a target logged): every slot is matched again."""
        if source is not None:
            for change in target_changes(self.targets, targets):
                log.info("%s (%s)", change, source,
                         extra={"event": "target_changed", "change": change, "source": source})
        self.targets = list(targets)
        self.identities = self._identities(targets)
        self.target_states.configure(
            [(t.name, t.max_cpu_percent, t.max_bloat_kb) for t in targets], self.clock)
        moved: Counter = Counter()
        for slot in list(self.registry.slots.values()):
            old = slot.control.target if slot.control is not None else None
            if self.resolve(slot, level=logging.DEBUG):
                slot.wake()
            if slot.control.target != old:
                moved[(old, slot.control.target)] += 1
        for (old, new), n in sorted(moved.items(), key=lambda i: -i[1]):
            # One line per change of target, not per process: a fleet reload can move
            # thousands (each one is logged at debug).
            log.info("targets reloaded: %d process(es) %s -> %s", n, old, new,
                     extra={"event": "targets_reloaded", "processes": n, "target": new,
                            "old": old})

    def _identities(self, targets: list[Target]) -> dict[int, int]:
        """pid -> start time of each process a target's pid key names now: that process,
        not one that gets the same pid after it exits (a pid alone would follow the number)."""
        out: dict[int, int] = {}
        for pid in sorted({p for t in targets if t.pid for p in t.pid}):
            try:
                out[pid] = self.kernel.procfs.stat(pid).starttime
            except (HugepagedError, OSError):
                log.info("target pid %d: no such process now; it will match none", pid,
                         extra={"event": "target_pid_absent", "pid": pid})
        return out

    def resolve(self, slot: MmSlot, level: int = logging.INFO) -> bool:
        """Match the slot's process against the targets (first match wins); True if its
        policy changed. A change of target is logged at `level`."""
        facts = ProcessFacts(self.kernel.procfs, slot.pid, slot.comm, self.identities)
        target = first_match(self.targets, facts) if self.targets else None
        old = slot.control
        self._apply_target(slot, target)
        new = target.name if target is not None else None
        if old is not None and old.target != new:  # at registration the register line says
            log.log(level, "pid %d (%s): target %s -> %s", slot.pid, slot.comm, old.target,
                    new, extra={"event": "target", "pid": slot.pid, "comm": slot.comm,
                                "target": new, "old": old.target})
        return slot.control != old

    def _apply_target(self, slot: MmSlot, target: Target | None) -> None:
        old = getattr(slot.target, "name", None)
        new = getattr(target, "name", None)
        if old != new:  # its added RSS counts against the target it has now
            self.target_states.forget(slot.pid)
            state = self.target_states.get(new)
            if state is not None:
                state.ledger.adopt(slot.pid, slot.bloat_kb)
        slot.target = target
        control = control_under(self.control, target)
        slot.control = control
        self._rank(slot)

    def _rank(self, slot: MmSlot) -> None:
        """Its place in the pass: its policy's priority, above every priority while its
        target is short of its coverage promise (daemon/promise.py)."""
        state = self.state_of(slot)
        rank = slot.control.priority + (BOOST if state is not None and state.short else 0)
        if slot.priority != rank:
            slot.priority = rank
            self.registry.reorder()

    def rerank(self, target: str) -> None:
        for slot in list(self.registry.slots.values()):
            if getattr(slot.target, "name", None) == target:
                self._rank(slot)

    # --- the registry's feeds --------------------------------------------------------
    def enter(self, pid: int, settle: float = 0.0) -> MmSlot | None:
        """__khugepaged_enter: register a user process (never kernel threads, never
        ourselves)."""
        if pid in self.registry or pid in self.kthreads or pid in self.unreadable:
            return None
        if self.only_pids is not None and pid not in self.only_pids:
            return None
        try:
            st = self.kernel.procfs.stat(pid)
        except (HugepagedError, OSError):
            return None
        if st.flags & PF_KTHREAD:
            self.kthreads.add(pid)
            return None
        if self.exclude_comm is not None and self.exclude_comm.fullmatch(st.comm):
            return None
        slot = self.registry.enter(pid, st.comm)
        if slot is not None:
            slot.due = self.clock() + settle
            self.resolve(slot)
            target = self.control_for(slot).target
            self.counters.registered += 1
            log.debug("registered pid %d (%s)%s", pid, st.comm,
                      f", target {target}" if target else "",
                      extra={"event": "register", "pid": pid, "comm": st.comm,
                             "target": target})
        return slot

    def exit(self, pid: int, why: str = "gone") -> None:
        """__khugepaged_exit: the slot goes, and everything kept for it."""
        self.kthreads.discard(pid)
        self.pending.pop(pid, None)
        self.changed.pop(pid, None)
        if why == "gone":
            self.unreadable.discard(pid)
        if pid in self.registry:
            for forget in self.on_exit:
                forget(pid)
        self.target_states.forget(pid)  # its bloat no longer counts against its target
        if self.registry.exit(pid):
            self.counters.gone += 1
            log.debug("pid %d %s", pid, why, extra={"event": "unregister", "pid": pid,
                                                    "reason": why})

    def drop_unreadable(self, slot: MmSlot) -> None:
        """Alive, but not ours to read: said once, and not entered again."""
        self.unreadable.add(slot.pid)
        log.warning("pid %d (%s): dropped: not readable", slot.pid, slot.comm,
                    extra={"event": "dropped", "pid": slot.pid, "comm": slot.comm})
        self.exit(slot.pid, "dropped: not readable")

    def discover(self) -> None:
        """The periodic /proc walk: catches what the connector missed, and exits."""
        pids = set(self.kernel.procfs.pids())
        self.kthreads &= pids
        self.unreadable &= pids
        for pid in list(self.registry.slots):
            if pid not in pids or self.registry.slots[pid].exited():
                self.exit(pid)
        candidates = pids if self.only_pids is None else pids & self.only_pids
        for pid in sorted(candidates - self.registry.slots.keys() - self.kthreads):
            self.enter(pid)

    def pin(self, pids: list[int]) -> None:
        """Targeted mode follows the processes named now, not their pid numbers: each is
        pinned by a pidfd, and a later process given the same pid is not it."""
        self.only_pids = set(pids) if pids else None
        for pid in pids:
            if pid not in self.registry.pinned:
                self.registry.pinned[pid] = pidfd_open(pid)

    # --- fork, exec, exit events -----------------------------------------------------
    def forked(self, pid: int, due: float) -> None:
        """A fork event: registered once its settle delay has passed (admit)."""
        if pid not in self.pending and (self.only_pids is None or pid in self.only_pids):
            self.pending[pid] = due

    def next_admit(self) -> float | None:
        """When the first fork event, exec or rename is due."""
        first = next(iter(self.pending.values()), None)
        change = next(iter(self.changed.values()), None)
        return min((t for t in (first, change[0] if change else None) if t is not None),
                   default=None)

    def changed_event(self, pid: int, now: float, exec_: bool) -> None:
        """An exec or a rename (the connector's exec and comm events) of a registered
        process: acted on once, CHANGE_SETTLE later (insertion order is due order)."""
        if pid not in self.registry:
            return
        due, was_exec = self.changed.get(pid, (now + CHANGE_SETTLE, False))
        self.changed[pid] = (due, was_exec or exec_)

    def admit(self, now: float) -> int:
        """Execs and renames that have settled are resolved; fork events whose settle delay
        has passed become slots, a batch at a time."""
        for pid, (due, exec_) in list(self.changed.items()):
            if due > now:
                break
            del self.changed[pid]
            (self.on_exec if exec_ else self.on_rename)(pid)
        admitted = 0
        for pid, due in list(self.pending.items())[:ADMIT_BATCH]:
            if due > now:
                break
            del self.pending[pid]
            if self.enter(pid):
                admitted += 1
        return admitted

    def exited(self, pid: int) -> None:
        """The connector's exit event. It is the leader thread's: the process lives on while
        any of its threads does, and its pidfd polls readable only once all have exited."""
        self.pending.pop(pid, None)
        slot = self.registry.slots.get(pid)
        if slot is None or slot.exited():
            self.exit(pid)

    def on_exec(self, pid: int) -> MmSlot | None:
        """An exec: a new program, a new comm, maybe a new target, and a new memory image:
        nothing kept of the old one counts (its bloat, its collapsed windows, its map)."""
        slot = self._renamed(pid, "exec")
        if slot is None:
            return None
        self.target_states.forget(pid)
        slot.bloat_kb = 0
        slot.collapsed.clear()
        slot.visit = slot.kept = None
        slot.cgroup2 = None
        slot.forget_map()
        slot.wake()
        slot.due = self.clock() + NEW_PROCESS_SETTLE
        return slot

    def on_rename(self, pid: int) -> MmSlot | None:
        """A rename (PR_SET_NAME, /proc/PID/comm): exclusions and targets that match by
        name are resolved again. Name matching is advisory: a process names itself."""
        return self._renamed(pid, "rename")

    def _renamed(self, pid: int, why: str) -> MmSlot | None:
        slot = self.registry.slots.get(pid)
        if slot is None:
            return None
        try:
            comm = self.kernel.procfs.stat(pid).comm
        except (HugepagedError, OSError):
            return None
        if comm != slot.comm:
            log.info("pid %d: %s -> %s (%s)", pid, slot.comm, comm, why,
                     extra={"event": why, "pid": pid, "old_comm": slot.comm, "comm": comm})
        slot.comm = comm
        if self.exclude_comm is not None and self.exclude_comm.fullmatch(comm):
            # A fork child had its parent's name until now: exclusions are resolved here too.
            log.info("pid %d (%s): excluded by exclude_comm; dropped", pid, comm,
                     extra={"event": "excluded", "pid": pid, "comm": comm})
            self.exit(pid)
            return None
        if self.resolve(slot):
            slot.wake()
        return slot
