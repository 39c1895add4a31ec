"""Scenarios of `bench/compare.py`: hugepaged against the kernel's khugepaged, side by side.

contenders.py  who competes: the kernel's khugepaged and hugepaged, at defaults and tuned
knobs.py       the kernel's THP knobs and counters, free huge blocks
cpu.py         the one CPU probe: /proc/PID/stat and schedstat, the [khugepaged] thread
coverage.py    PMD-mapped bytes of a target (PAGEMAP_SCAN), its anonymous RSS
collapser.py   one contender at work on a target
timeline.py    samples over time: times to coverage, projections, CPU per huge page
machine.py     the machine: its description, letting it settle before a time zero
context.py     one run's settings, work directory and hugepaged's start-up CPU
heap.py        1. fragmented heap
comeback.py    2. huge pages come back (filler.py fragments physical memory)
tlb.py         3. does it pay (tlbreader.py reads at random and reports its throughput)
watch.py       4. cost of watching (scan throughput; idle daemon with 500 processes)
report.py      Markdown, JSON and the PNG plot

The benchmarks run as `python bench/NAME.py`: their own directory is on sys.path, the
repository's root, where the `kit` package (workloads, independent checks, the daemon
runner) lives, is not. Importing this package puts it there: the one place that does.
"""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def require(*modules: str, extra: str = "bench") -> None:
    """Exit with one line that says what to install when a package the benchmark needs is
    missing: checked at its start, not met as a traceback after minutes of running."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name}: needs {', '.join(missing)}, which "
                 f"{'is' if len(missing) == 1 else 'are'} not installed: "
                 f"pip install -e '.[{extra}]' (in the repository's root)")


def write_results(name: str, doc: dict, lines: list[str], quiet: bool = False) -> None:
    """bench/results/NAME.json (the figures) and NAME.md (the table), and the table printed
    (unless quiet: the partial results a long benchmark keeps after each run)."""
    out = ROOT / "bench" / "results"
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
