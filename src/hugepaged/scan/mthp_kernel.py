"""What the kernel's own khugepaged takes at sizes below a PMD, where it does (Linux 7.2's
mTHP collapse), so that `status` and `scan` can say which memory it is and that hugepaged
leaves it to the kernel: MADV_COLLAPSE makes PMD-size pages only, so userspace cannot
collapse to those sizes. The rule 7.2 adds is mirrored: for mTHP, khugepaged honours only
`max_ptes_none` 0 or HPAGE_PMD_NR - 1 and collapses nothing to mTHP with any other value.
(Should MADV_COLLAPSE take an order one day, collapse/path.py's window size is the seam.)
"""

from __future__ import annotations

from hugepaged.kernel import Kernel


def kernel_mthp_collapse(kernel: Kernel, max_ptes_none: int | None = None) -> dict:
    """{"supported": bool, "sizes": {"64kB": mode}, "max_ptes_none": n, "refused": bool}:
    whether the kernel's khugepaged collapses to mTHP sizes at all, the sizes it would
    (enabled, not never), and whether its max_ptes_none is one 7.2 refuses for them."""
    supported = kernel.thp.khugepaged_collapses_mthp()
    out: dict = {"supported": supported}
    if not supported:
        return out
    sizes = {f"{kb}kB": mode for kb, mode in kernel.thp.mthp_sizes().items() if mode != "never"}
    if max_ptes_none is None:
        max_ptes_none = int(kernel.thp.read("max_ptes_none"))
    out.update(sizes=sizes, max_ptes_none=max_ptes_none,
               refused=max_ptes_none not in (0, kernel.geometry.pmd_nr - 1))
    return out


def describe(view: dict) -> str | None:
    """One line for `scan` and `status`; None where there is nothing to say."""
    if not view.get("supported") or not view.get("sizes"):
        return None
    sizes = ", ".join(f"{s} ({m})" for s, m in view["sizes"].items())
    if view["refused"]:
        return (f"the kernel's khugepaged would collapse to {sizes}, but its max_ptes_none "
                f"{view['max_ptes_none']} is neither 0 nor the most: it collapses nothing to "
                "those sizes (and hugepaged cannot: MADV_COLLAPSE makes PMD-size pages only)")
    return (f"the kernel's khugepaged collapses to {sizes} itself; hugepaged leaves those "
            "sizes to it (MADV_COLLAPSE makes PMD-size pages only)")
