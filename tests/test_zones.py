"""Free huge pages per NUMA node and zone watermarks (kernel/zones.py).

This VM has one NUMA node, so two-node states are fixture files laid out like /proc/zoneinfo
and /proc/buddyinfo of a two-node machine; the one-node reading is checked on the real files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hugepaged.kernel import Kernel
from hugepaged.kernel.zones import (
    Zones,
    parse_buddyinfo,
    parse_zoneinfo,
    target_nodes,
    usable_huge_blocks,
)


def _zone(node: int, name: str, free: int, wmin: int, start: int, spanned: int,
          prot: str) -> str:
    return f"""Node {node}, zone {name:>8}
  per-node stats
      nr_inactive_anon 5
  pages free     {free}
        min      {wmin}
        low      {wmin + 10}
        high     {wmin + 20}
        spanned  {spanned}
        present  {spanned}
        managed  {spanned}
        protection: ({prot})
      nr_free_pages {free}
  pagesets
    cpu: 0
              count: 10
              high:  378
              batch: 63
  start_pfn:           {start}
"""


# Node 0: DMA (its protection keeps huge pages out), DMA32, Normal low on free pages (below the
# watermark once a block is taken). Node 1: Normal with plenty free.
ZONEINFO = "".join([
    _zone(0, "DMA", 3840, 45, 1, 4095, "0, 3018, 5578, 5578, 5578"),
    _zone(0, "DMA32", 700000, 9118, 4096, 1044480, "0, 0, 2560, 2560, 2560"),
    _zone(0, "Normal", 8000, 7732, 1048576, 1048576, "0, 0, 0, 0, 0"),
    _zone(0, "Movable", 0, 32, 0, 0, "0, 0, 0, 0, 0"),
    _zone(1, "DMA", 0, 0, 0, 0, "0, 0, 0, 0, 0"),
    _zone(1, "DMA32", 0, 0, 0, 0, "0, 0, 0, 0, 0"),
    _zone(1, "Normal", 900000, 7732, 2097152, 1048576, "0, 0, 0, 0, 0"),
    _zone(1, "Movable", 0, 32, 0, 0, "0, 0, 0, 0, 0"),
])
BUDDYINFO = "".join(f"Node {n}, zone {z:>8} " + " ".join(f"{c:6d}" for c in counts) + "\n"
                    for n, z, counts in [
                        (0, "DMA", [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 3]),
                        (0, "DMA32", [4, 1, 2, 2, 2, 2, 1, 4, 4, 2, 10]),
                        (0, "Normal", [501, 4355, 6002, 4735, 1051, 1411, 940, 271, 183, 1, 1]),
                        (1, "Normal", [1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 7])])


@pytest.fixture
def proc(tmp_path):
    (tmp_path / "zoneinfo").write_text(ZONEINFO)
    (tmp_path / "buddyinfo").write_text(BUDDYINFO)
    return tmp_path


def test_parse_zoneinfo_two_nodes():
    zones = parse_zoneinfo(ZONEINFO)
    assert [(z.node, z.name, z.index) for z in zones] == [
        (0, "DMA", 0), (0, "DMA32", 1), (0, "Normal", 2), (0, "Movable", 3),
        (1, "DMA", 0), (1, "DMA32", 1), (1, "Normal", 2), (1, "Movable", 3)]
    normal0 = zones[2]
    assert (normal0.free, normal0.min, normal0.start_pfn, normal0.spanned) == \
        (8000, 7732, 1048576, 1048576)  # the pagesets' "high:" lines are not the watermark
    assert zones[0].protection == (0, 3018, 5578, 5578, 5578)


def test_usable_blocks_per_node_and_watermark():
    zones, buddy = parse_zoneinfo(ZONEINFO), parse_buddyinfo(BUDDYINFO)
    # Node 0: DMA has 1 + 2*3 blocks but its protection for movable allocations (5578) is more
    # than it has free; Normal has 1 + 2 but 8000 - 511 is not above min 7732; DMA32: 2 + 20.
    assert usable_huge_blocks(zones, buddy, node=0) == 22
    assert usable_huge_blocks(zones, buddy, node=1) == 19
    assert usable_huge_blocks(zones, buddy) == 41
    assert usable_huge_blocks(zones, buddy, node=2) == 0


def test_target_nodes_majority_of_the_window():
    zones = parse_zoneinfo(ZONEINFO)
    node0 = np.arange(1048576, 1048576 + 300, dtype=np.uint64)
    node1 = np.arange(2097152, 2097152 + 212, dtype=np.uint64)
    assert target_nodes(zones, np.concatenate([node0, node1])) == {0}
    assert target_nodes(zones, np.concatenate([node0[:100], node1])) == {1}
    assert target_nodes(zones, np.concatenate([node0[:212], node1])) == {0, 1}  # a tie: both
    assert target_nodes(zones, np.array([5 << 30], dtype=np.uint64)) == set()  # no zone


def test_mmstats_reads_zoneinfo_and_falls_back_to_buddyinfo(proc):
    kernel = Kernel(proc_root=str(proc))
    assert kernel.mm.free_huge_blocks() == 41
    assert kernel.mm.free_huge_blocks({1}) == 19
    assert Zones(str(proc)).nodes() == {0, 1}
    (proc / "zoneinfo").unlink()  # an old kernel or a fixture without it: buddyinfo alone
    assert kernel.mm.free_huge_blocks() == 22 + 3 + 19  # DMA left out, no watermark check


def test_this_machine_nodes_from_zoneinfo():
    online = {int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*")}
    assert Zones().nodes() == online  # this VM: {0}
