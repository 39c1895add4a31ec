"""tunables: the kernel's names, ranges and refusals (mm/khugepaged.c and mm/huge_memory.c stores).

The integer knobs are parsed by kstrtoul/kstrtouint with base 10: an optional '+', one or more
decimal digits, at most one trailing newline, nothing else (no spaces, no '-', no 0x).
`enabled` is compared with sysfs_streq: the word, optionally followed by one newline.
"""

import errno
import os

import pytest

from hugepaged.errors import InvalidTunable
from hugepaged.kernel.geometry import DEFAULT_GEOMETRY
from hugepaged.tunables import (
    INHERITED,
    NAMES,
    SPECS,
    UINT_MAX,
    Tunables,
    parse,
    parse_assignments,
    resolve,
)

RANGES = {
    "pages_to_scan": (1, UINT_MAX),
    "scan_sleep_millisecs": (0, UINT_MAX),
    "alloc_sleep_millisecs": (0, UINT_MAX),
    "max_ptes_none": (0, 511),
    "max_ptes_swap": (0, 511),
    "max_ptes_shared": (0, 511),
    "defrag": (0, 1),
    "max_cpu_percent": (0, 100),
    "max_stall_ms": (0, 60000),
    "max_memory_pressure": (0, 100),
    "collapse_workers": (1, 16),
}
LISTS = {"collapse_cpus"}  # a CPU list of online CPUs (kernel/cpus.py)
WORDS = {
    "enabled": ("always", "madvise", "never"),
    "shmem_enabled": ("always", "within_size", "advise", "never", "deny", "force"),
    "kernel_khugepaged": ("leave", "quiet"),
    "on_split": ("back_off", "leave"),
}
# Refused by kstrtoul whatever the range.
MALFORMED = ["", "\n", "+", "-", "-1", "-0", " 5", "5 ", " 5\n", "5\t", "\t5", "0x5", "0X5",
             "5\n\n", "\n5", "5\r\n", "5\r", "1_0", "1e3", "5.0", "++5", "+-5", "abc", "5a",
             "five", "\u0665", "\uff15", "0b1", "0o7"]


def test_specs_cover_the_tunables():
    assert set(SPECS) == set(NAMES) == set(RANGES) | set(WORDS) | LISTS
    for name, (lo, hi) in RANGES.items():
        assert SPECS[name].bounds(DEFAULT_GEOMETRY) == (lo, hi), name
    for name, words in WORDS.items():
        assert SPECS[name].choices == words
    assert set(INHERITED) <= {n for n, s in SPECS.items() if s.kernel}
    assert not SPECS["max_cpu_percent"].kernel and not SPECS["kernel_khugepaged"].kernel
    assert not SPECS["collapse_workers"].kernel


def test_collapse_cpus_is_a_list_of_online_cpus():
    import os

    online = sorted(os.sched_getaffinity(0))
    assert parse("collapse_cpus", "") == ""
    assert parse("collapse_cpus", f"{online[-1]},{online[0]}\n") in (
        f"{online[0]}-{online[-1]}", f"{online[0]},{online[-1]}", f"{online[0]}")
    for bad in ("99999", "0-", "-1", "1-0", " 0", "0 ", "0,", "a", "0x1"):
        with pytest.raises(InvalidTunable, match="collapse_cpus: invalid value"):
            parse("collapse_cpus", bad)


# ---------------------------------------------------------------------------------------------
# Integers


@pytest.mark.parametrize("name", sorted(RANGES))
def test_integer_range_edges(name):
    lo, hi = RANGES[name]
    assert parse(name, str(lo)) == lo
    assert parse(name, str(hi)) == hi
    assert parse(name, f"{hi}\n") == hi
    assert parse(name, f"+{lo}") == lo
    assert parse(name, lo) == lo and parse(name, hi) == hi
    for bad in ([str(lo - 1)] if lo > 0 else []) + [str(hi + 1), str(2**64), "9" * 40]:
        with pytest.raises(InvalidTunable) as exc:
            parse(name, bad)
        msg = str(exc.value)
        assert name in msg and f"{lo}..{hi}" in msg, msg


@pytest.mark.parametrize("name", sorted(RANGES))
@pytest.mark.parametrize("text", MALFORMED)
def test_integer_malformed(name, text):
    with pytest.raises(InvalidTunable) as exc:
        parse(name, text)
    msg = str(exc.value)
    lo, hi = RANGES[name]
    assert name in msg and f"{lo}..{hi}" in msg, msg


@pytest.mark.parametrize(("text", "value"), [
    ("5", 5), ("+5", 5), ("05", 5), ("0005", 5), ("5\n", 5), ("+5\n", 5), ("+05\n", 5),
    ("0", 0), ("+0", 0), ("00", 0), ("511", 511), ("0511", 511),
])
def test_integer_accepted_forms(text, value):
    assert parse("max_ptes_none", text) == value
    assert isinstance(parse("max_ptes_none", text), int)


def test_pages_to_scan_refuses_zero():
    for text in ("0", "00", "+0", "0\n"):
        with pytest.raises(InvalidTunable, match="pages_to_scan"):
            parse("pages_to_scan", text)
    assert parse("pages_to_scan", "1") == 1


def test_uint_max_boundary():
    for name in ("pages_to_scan", "scan_sleep_millisecs", "alloc_sleep_millisecs"):
        assert parse(name, "4294967295") == UINT_MAX
        with pytest.raises(InvalidTunable):
            parse(name, "4294967296")


@pytest.mark.parametrize("value", [True, False, 5.0, None, -1])
def test_non_string_values(value):
    with pytest.raises(InvalidTunable):
        parse("max_ptes_none", value)


# ---------------------------------------------------------------------------------------------
# Words


@pytest.mark.parametrize("name", sorted(WORDS))
def test_words(name):
    for word in WORDS[name]:
        assert parse(name, word) == word
        assert parse(name, word + "\n") == word
        for bad in (f" {word}", f"{word} ", f"{word}\n\n", f"[{word}]", word.upper(),
                    word[:-1], f"{word}\t", f"\n{word}"):
            with pytest.raises(InvalidTunable) as exc:
                parse(name, bad)
            assert name in str(exc.value)
            assert ", ".join(WORDS[name]) in str(exc.value)
    for bad in ("", "\n", "1", "inherit", "always madvise", "defer+madvise"):
        with pytest.raises(InvalidTunable):
            parse(name, bad)
    with pytest.raises(InvalidTunable):
        parse(name, 1)


def test_unknown_key_refused():
    for key in ("max_ptes_nonee", "", "MAX_PTES_NONE", "pages_collapsed", "full_scans",
                " max_ptes_none", "khugepaged/max_ptes_none"):
        with pytest.raises(InvalidTunable) as exc:
            parse(key, "1")
        assert "unknown tunable" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Tunables, resolve, parse_assignments


def test_defaults():
    t = Tunables()
    assert (t.max_ptes_none, t.max_ptes_swap, t.max_ptes_shared, t.defrag) == (511, 64, 256, 1)
    for name, value in t.as_dict().items():
        assert parse(name, str(value)) == value  # every default is itself valid


def test_with_values_parses_and_copies():
    t = Tunables()
    u = t.with_values({"max_ptes_none": "0", "enabled": "always\n", "pages_to_scan": 4096})
    assert (u.max_ptes_none, u.enabled, u.pages_to_scan) == (0, "always", 4096)
    assert t == Tunables()


@pytest.mark.parametrize("bad", [
    {"max_ptes_none": "7", "max_ptes_swap": "512"},
    {"max_ptes_swap": "512", "max_ptes_none": "7"},
    {"max_ptes_none": "7", "no_such_knob": "1"},
    {"enabled": "always", "defrag": "2"},
])
def test_with_values_refuses_all_or_nothing(bad):
    t = Tunables(max_ptes_none=100)
    before = t.as_dict()
    with pytest.raises(InvalidTunable):
        t.with_values(bad)
    assert t.as_dict() == before


KERNEL = {  # what ThpSysfs.snapshot() plus the counters look like on a stock kernel
    "enabled": "always", "shmem_enabled": "advise", "defrag": 0, "max_ptes_none": 100,
    "max_ptes_swap": 32,
    "max_ptes_shared": 128, "pages_to_scan": 4096, "scan_sleep_millisecs": 10000,
    "alloc_sleep_millisecs": 30000, "pages_collapsed": 17, "full_scans": 3,
}


def test_resolve_defaults_only():
    assert resolve({}) == Tunables()


def test_resolve_inherits_only_inherited_kernel_values():
    t = resolve(KERNEL)
    d = Tunables()
    for name in NAMES:
        if name in INHERITED:
            assert getattr(t, name) == KERNEL[name], name
        else:
            assert getattr(t, name) == getattr(d, name), name
    # hugepaged keeps its own pace, not the kernel's 4096 pages per 10 s.
    assert (t.pages_to_scan, t.scan_sleep_millisecs) == (d.pages_to_scan, d.scan_sleep_millisecs)


def test_resolve_layers_in_order():
    config = {"max_ptes_none": "10", "pages_to_scan": "8192", "enabled": "madvise"}
    cli = {"max_ptes_none": "20"}
    live = {"enabled": "never\n"}
    t = resolve(KERNEL, config, cli, live)
    assert t.max_ptes_none == 20
    assert t.pages_to_scan == 8192
    assert t.enabled == "never"
    assert t.max_ptes_swap == 32  # from the kernel, no layer set it
    assert t.scan_sleep_millisecs == Tunables().scan_sleep_millisecs
    # A layer can set what the kernel does not have.
    assert resolve(KERNEL, {"max_cpu_percent": "0"}).max_cpu_percent == 0


def test_resolve_refuses_a_bad_layer():
    with pytest.raises(InvalidTunable, match="max_ptes_shared"):
        resolve(KERNEL, {"max_ptes_none": "1"}, {"max_ptes_shared": "-1"})


def test_parse_assignments():
    got = parse_assignments(["max_ptes_none=0", "enabled=always", "pages_to_scan=8"])
    assert got == {"max_ptes_none": "0", "enabled": "always", "pages_to_scan": "8"}
    assert Tunables().with_values(got).pages_to_scan == 8
    assert parse_assignments([]) == {}
    # Later wins, as on a command line.
    assert parse_assignments(["defrag=0", "defrag=1"]) == {"defrag": "1"}


@pytest.mark.parametrize("item", [
    "max_ptes_none",  # no '='
    " pages_to_scan=8",  # the key exactly as written: sysfs has no file ' pages_to_scan'
    "pages_to_scan =8",
    "max_ptes_none:5",
    "max_ptes_none=512",
    "max_ptes_none= 5",  # the value is not stripped, like a sysfs write
    "max_ptes_none=5 ",
    "max_ptes_none=",
    "=5",
    "nope=1",
    "enabled=always=1",
    "pages_to_scan=0",
])
def test_parse_assignments_refuses(item):
    with pytest.raises(InvalidTunable):
        parse_assignments(["defrag=1", item])


def test_parse_assignments_message_names_the_item():
    with pytest.raises(InvalidTunable, match="KEY=VALUE.*max_ptes_none"):
        parse_assignments(["max_ptes_none"])


# ---------------------------------------------------------------------------------------------
# Against the real kernel


KHUGEPAGED = "/sys/kernel/mm/transparent_hugepage/khugepaged"
THP = "/sys/kernel/mm/transparent_hugepage"
CANDIDATES = ["+5", " 5", "5 ", "0x5", "05", "5\n", "512", "-1", "\n", "4294967296", "0",
              "511", "+0", "4294967295", "5\n\n", "\n5", "+", "+-5", "5\t", "1_0", "5.0",
              "18446744073709551615", "18446744073709551616", "1", "2", "+1\n"]


def _kernel_accepts(path: str, text: str) -> tuple[bool, str]:
    """Write `text` in one write(2); (accepted, value read back)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
        ok = True
    except OSError as err:
        assert err.errno in (errno.EINVAL, errno.ERANGE), err
        ok = False
    finally:
        os.close(fd)
    with open(path) as f:
        return ok, f.read().strip()


def _parse_accepts(name: str, text: str) -> bool:
    try:
        parse(name, text)
    except InvalidTunable:
        return False
    return True


@pytest.mark.kernel
def test_parse_matches_the_kernel():
    if os.geteuid() != 0:
        pytest.skip("needs root to write /sys/kernel/mm/transparent_hugepage/khugepaged")
    if not os.path.isdir(KHUGEPAGED):
        pytest.skip(f"{KHUGEPAGED} is missing: no THP in this kernel")
    cases = {
        "max_ptes_none": (f"{KHUGEPAGED}/max_ptes_none", CANDIDATES),
        "pages_to_scan": (f"{KHUGEPAGED}/pages_to_scan", CANDIDATES),
        "defrag": (f"{KHUGEPAGED}/defrag", CANDIDATES),
    }
    with open(f"{THP}/enabled") as f:
        mode = f.read().split("[")[1].split("]")[0]
    # Only spellings of the current mode, so an accepted write changes nothing.
    cases["enabled"] = (f"{THP}/enabled", [mode, mode + "\n", f" {mode}", f"{mode} ",
                                           f"[{mode}]", mode.upper(), f"{mode}\n\n", "\n",
                                           "bogus"])
    mismatches = []
    for name, (path, candidates) in cases.items():
        with open(path) as f:
            original = f.read().strip()
        if name == "enabled":
            original = mode
        try:
            for text in candidates:
                ok, stored = _kernel_accepts(path, text)
                mine = _parse_accepts(name, text)
                if ok != mine:
                    mismatches.append((name, text, ok, mine))
                elif ok and name != "enabled":
                    assert int(stored) == parse(name, text), (name, text, stored)
                # Each candidate starts from the original value.
                _kernel_accepts(path, original)
            # An empty write(2) is no store at all (sysfs returns 0 for count 0, nothing
            # changes); as a value, parse refuses ''.
            ok, stored = _kernel_accepts(path, "")
            assert ok and (name == "enabled" or stored == original)
            assert not _parse_accepts(name, "")
        finally:
            with open(path, "w") as f:
                f.write(original + "\n")
            with open(path) as f:
                now = f.read()
            if name == "enabled":
                assert now.split("[")[1].split("]")[0] == mode
            else:
                assert now.strip() == original
    assert not mismatches, f"(name, text, kernel accepts, parse accepts): {mismatches}"
