"""Who competes: the kernel's khugepaged and `hugepaged run`, each at defaults and tuned."""

from __future__ import annotations

from dataclasses import dataclass, field

# The kernel's documented khugepaged defaults (transhuge.rst); the whole run starts from them.
KERNEL_DEFAULTS: dict[str, int] = {
    "pages_to_scan": 4096, "scan_sleep_millisecs": 10000, "alloc_sleep_millisecs": 60000,
    "defrag": 1, "max_ptes_none": 511, "max_ptes_swap": 64, "max_ptes_shared": 256,
}
FAST = {"pages_to_scan": 65536, "scan_sleep_millisecs": 0}


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # "kernel" | "hugepaged"
    settings: dict = field(default_factory=dict)  # kernel knobs, or hugepaged --set values
    bounded: bool = False  # measured over a bounded window, the rest projected

    @property
    def is_kernel(self) -> bool:
        return self.kind == "kernel"


CONTENDERS = (
    Contender("kernel-defaults", "kernel khugepaged, defaults", "kernel",
              {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000}, bounded=True),
    Contender("kernel-tuned", "kernel khugepaged, 65536 pages / 0 ms", "kernel", dict(FAST)),
    Contender("hugepaged-defaults", "hugepaged, defaults", "hugepaged", {}),
    Contender("hugepaged-tuned", "hugepaged, 65536 pages / 0 ms / no CPU cap", "hugepaged",
              {**FAST, "max_cpu_percent": 0}),
)
