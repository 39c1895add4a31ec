"""The file ranges this daemon collapsed, so that a range is collapsed once, not once per
process that maps it (hugepaged's own: the kernel's khugepaged has the page cache to ask)."""

from collections import OrderedDict

MAX_RANGES = 65536  # 128 GiB of 2 MiB ranges; the oldest are forgotten first


class RangeMemo:
    """A bounded set of (device, inode, file offset), least recently seen dropped first.

    A forgotten range costs one more MADV_COLLAPSE, which only installs the PMD; a stale one
    (the file freed and its inode number reused) skips one collapse until it is forgotten.
    """

    def __init__(self, limit: int = MAX_RANGES) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[int, int, int], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: tuple[int, int, int]) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def seen(self, key: tuple[int, int, int]) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False
