"""Scenarios of `bench/compare.py`: hugepaged against the kernel's khugepaged, side by side.

common.py    contenders, kernel knobs, CPU and coverage probes, timelines
heap.py      1. fragmented heap
comeback.py  2. huge pages come back (filler.py fragments physical memory)
tlb.py       3. does it pay (tlbreader.py reads at random and reports its throughput)
watch.py     4. cost of watching (scan throughput; idle daemon with 500 processes)
report.py    Markdown, JSON and the PNG plot
"""
