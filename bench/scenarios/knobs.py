"""The kernel's THP knobs and counters, and its free memory by block size.

Knobs are written with kit/helpers (saved and restored by compare.py with
helpers.saved_thp around the whole run); counters and free blocks are read here from /proc.
"""

from __future__ import annotations

from pathlib import Path

from kit.helpers import read_counter, write_knob

__all__ = ["buddyinfo", "free_huge_blocks", "meminfo_kb", "read_counter", "vmstat",
           "write_knob"]


def vmstat(*names: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k in names:
            out[k] = int(v)
    return out


def buddyinfo() -> dict[str, list[int]]:
    """Free blocks per order, per zone ("DMA", "DMA32", "Normal", ...)."""
    zones = {}
    for line in Path("/proc/buddyinfo").read_text().splitlines():
        parts = line.split()
        zones[f"{parts[1].rstrip(',')}:{parts[3]}"] = [int(x) for x in parts[4:]]
    return zones


def free_huge_blocks(zones: dict[str, list[int]] | None = None, usable_only: bool = True) -> int:
    """Free order>=9 blocks in order-9 units. usable_only leaves out ZONE_DMA: its 16 MiB are
    kept from user allocations by lowmem_reserve, so its blocks can never back a THP."""
    zones = buddyinfo() if zones is None else zones
    total = 0
    for name, counts in zones.items():
        if usable_only and name.endswith(":DMA"):
            continue
        total += sum(c << (o - 9) for o, c in enumerate(counts) if o >= 9)
    return total


def meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)
