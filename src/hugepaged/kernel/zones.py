"""Free huge pages per NUMA node, as the allocator would grant them: /proc/zoneinfo + buddyinfo.

A collapse allocates its huge page on the node holding most of the window's pages
(hpage_collapse_find_target_node; the allocation is limited to those nodes), with
GFP_TRANSHUGE: highest zone ZONE_MOVABLE, and __zone_watermark_ok refuses a zone whose free
pages, less the block, are not above its min watermark plus the lowmem protection it keeps for
such allocations. So a free order-9 block counts only on the window's node and in a zone that
passes that check. kpageflags gives no node: a PFN's node is the node whose zone spans it
(zoneinfo's start_pfn and spanned).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hugepaged.kernel.geometry import DEFAULT_GEOMETRY

HUGE_ORDER = DEFAULT_GEOMETRY.pmd_order  # the fixtures' (4 KiB pages); a run passes its own
_ZONE = re.compile(r"^Node (\d+), zone\s+(\w+)")
_NUM = re.compile(r"^\s+(pages free|min|low|high|spanned|present|managed)\s+(\d+)\s*$")
_PROT = re.compile(r"^\s+protection: \(([\d, ]*)\)")
_START = re.compile(r"^\s+start_pfn:\s+(\d+)")


@dataclass(frozen=True)
class Zone:
    """One zone of one node, with what the watermark check and the PFN lookup need."""

    node: int
    name: str
    index: int  # position among its node's zones: ZONE_DMA 0, ... as the protection array
    free: int = 0
    min: int = 0
    spanned: int = 0
    start_pfn: int = 0
    protection: tuple[int, ...] = ()


def parse_zoneinfo(text: str) -> list[Zone]:
    zones: list[Zone] = []
    cur: dict | None = None
    per_node: dict[int, int] = {}

    def flush() -> None:
        if cur is not None:
            zones.append(Zone(**cur))

    for line in text.splitlines():
        m = _ZONE.match(line)
        if m:
            flush()
            node = int(m.group(1))
            cur = {"node": node, "name": m.group(2), "index": per_node.get(node, 0)}
            per_node[node] = cur["index"] + 1
            continue
        if cur is None:
            continue
        if (m := _NUM.match(line)) is not None:
            key = "free" if m.group(1) == "pages free" else m.group(1)
            if key in ("free", "min", "spanned"):
                cur[key] = int(m.group(2))
        elif (m := _PROT.match(line)) is not None:
            cur["protection"] = tuple(int(x) for x in m.group(1).replace(",", " ").split())
        elif (m := _START.match(line)) is not None:
            cur["start_pfn"] = int(m.group(1))
    flush()
    return zones


def parse_buddyinfo(text: str) -> dict[tuple[int, str], list[int]]:
    """(node, zone) -> free blocks per order."""
    out = {}
    for line in text.splitlines():
        m = _ZONE.match(line)
        if m:
            out[(int(m.group(1)), m.group(2))] = [int(c) for c in line[m.end():].split()]
    return out


def _movable_index(zones: list[Zone], node: int) -> int:
    names = [z.name for z in zones if z.node == node]
    return names.index("Movable") if "Movable" in names else len(names) - 1


def zone_usable(zone: Zone, movable: int, order: int = HUGE_ORDER) -> bool:
    """__zone_watermark_ok at the min watermark for one block of `order`."""
    reserve = zone.protection[movable] if movable < len(zone.protection) else 0
    return zone.free - ((1 << order) - 1) > zone.min + reserve


def usable_huge_blocks(zones: list[Zone], buddy: dict[tuple[int, str], list[int]],
                       node: int | None = None, order: int = HUGE_ORDER) -> int:
    """Free blocks of `order` or larger (in order-`order` units) that an allocation for a
    huge page could take: on `node` (None: any), in zones above their watermark."""
    total = 0
    for z in zones:
        if node is not None and z.node != node:
            continue
        counts = buddy.get((z.node, z.name), [])
        blocks = sum(c << (o - order) for o, c in enumerate(counts) if o >= order)
        if blocks and zone_usable(z, _movable_index(zones, z.node), order):
            total += blocks
    return total


def target_nodes(zones: list[Zone], pfns: np.ndarray) -> set[int]:
    """hpage_collapse_find_target_node: the node(s) holding most of these PFNs (ties: all)."""
    spans = sorted((z.start_pfn, z.start_pfn + z.spanned, z.node) for z in zones if z.spanned)
    if len(pfns) == 0 or not spans:
        return set()
    starts = np.array([s for s, _, _ in spans], dtype=np.uint64)
    ends = np.array([e for _, e, _ in spans], dtype=np.uint64)
    nodes = np.array([n for _, _, n in spans])
    pfns = np.asarray(pfns, dtype=np.uint64)
    i = np.searchsorted(starts, pfns, side="right") - 1
    ok = (i >= 0) & (pfns < ends[np.clip(i, 0, None)])
    if not ok.any():
        return set()
    counts = np.bincount(nodes[i[ok]])
    return {int(n) for n in np.flatnonzero(counts == counts.max())}


class Zones:
    """/proc/zoneinfo and /proc/buddyinfo under a proc root."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root

    def _read(self, name: str) -> str:
        with open(f"{self.proc_root}/{name}") as f:
            return f.read()

    def zones(self) -> list[Zone]:
        return parse_zoneinfo(self._read("zoneinfo"))

    def nodes(self) -> set[int]:
        return {z.node for z in self.zones() if z.spanned}

    def usable_huge_blocks(self, nodes: set[int] | None = None,
                           order: int = HUGE_ORDER) -> int:
        zones, buddy = self.zones(), parse_buddyinfo(self._read("buddyinfo"))
        if nodes is None:
            return usable_huge_blocks(zones, buddy, order=order)
        return sum(usable_huge_blocks(zones, buddy, n, order) for n in nodes)
