"""How long a comm pattern can take: a bound on the backtracking of Python's `re`, refused
at configuration load when it is too large.

A process names itself (prctl PR_SET_NAME), so a target's `comm` or `exclude_comm` is matched
against input any user chooses. Python's engine backtracks: `^(((a+)+)+)+$` took 11.9 s on the
name `aaaaaaaaaaaaaa!` with the GIL held (33 s without a watchdog ping), and twenty `a*` in a row
take a minute. What bounds it is the input: a comm is at most TASK_COMM_LEN - 1 = 15 bytes, so
at most 15 characters. For every part of the pattern this module counts, by the number of
characters consumed (0..15), how many ways it can match, assuming the worst input (every
character class matches); a sequence multiplies them, an alternation adds them, a repeat sums
its powers. The work of a search is then at most: start positions x the partial paths the
engine may walk. It over-counts (it ignores what characters actually are), never under-counts
what backtracking can explore; `re`'s own shortcuts only make the real work smaller.
"""

from __future__ import annotations

import re
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]

COMM_CHARS = 15  # TASK_COMM_LEN - 1: the longest name the kernel keeps
# Steps a pattern may need at worst. Measured (bench/bench_regex_bound.py): the slowest
# patterns accepted at this bound take under 10 ms per name.
MAX_STEPS = 1_000_000
_CAP = 1 << 62  # counts past this are "too many"; keeps the integers small
_N = COMM_CHARS + 1

_CONSUMES = {C.LITERAL, C.NOT_LITERAL, C.ANY}
_ZERO_WIDTH = {C.AT}
_REPEATS = {C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT}


class TooCostly(ValueError):
    """The pattern may backtrack past MAX_STEPS on some 15-character name."""


def _conv(a: list[int], b: list[int]) -> list[int]:
    out = [0] * _N
    for i, x in enumerate(a):
        if x:
            for j in range(_N - i):
                if b[j]:
                    out[i + j] = min(_CAP, out[i + j] + x * b[j])
    return out


def _add(a: list[int], b: list[int]) -> list[int]:
    return [min(_CAP, x + y) for x, y in zip(a, b, strict=True)]


def _unit(length: int) -> list[int]:
    out = [0] * _N
    out[length] = 1
    return out


class _Bound:
    """(ways by length, work) of each node of re's parse tree; stops once work is too large."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def seq(self, items) -> tuple[list[int], int]:
        ways, work = _unit(0), 0
        for op, av in items:
            w_item, k_item = self.node(op, av)
            work = min(_CAP, work + sum(ways) * k_item)  # each partial path tries the item
            ways = _conv(ways, w_item)
            self._check(work)
        return ways, work

    def node(self, op, av) -> tuple[list[int], int]:
        if op is C.IN:  # a class is tested item by item: its size is its cost
            return _unit(1), len(av)
        if op in _CONSUMES:
            return _unit(1), 1
        if op in _ZERO_WIDTH:
            return _unit(0), 1
        if op is C.GROUPREF:  # what its group matched: any length, one way each, compared
            return [1] * _N, _N
        if op is C.SUBPATTERN:
            return self.seq(av[-1])
        if op is C.BRANCH:
            ways, work = [0] * _N, 0
            for branch in av[1]:
                w, k = self.seq(branch)
                ways, work = _add(ways, w), min(_CAP, work + k)
            return ways, work
        if op is C.GROUPREF_EXISTS:
            w_yes, k_yes = self.seq(av[1])
            w_no, k_no = self.seq(av[2]) if av[2] is not None else (_unit(0), 0)
            return _add(w_yes, w_no), min(_CAP, k_yes + k_no + 1)
        if op in (C.ASSERT, C.ASSERT_NOT):  # atomic, zero-width
            return _unit(0), min(_CAP, self.seq(av[1])[1] + 1)
        if op is C.ATOMIC_GROUP:  # one way out, of a length not known here
            w, k = self.seq(av)
            return [1 if x else 0 for x in w], k
        if op in _REPEATS:
            ways, work = self.repeat(*av)
            if op is C.POSSESSIVE_REPEAT:
                ways = [1 if x else 0 for x in ways]
            return ways, work
        return _unit(0), 1  # FAILURE and the like: no input, no choice

    def repeat(self, lo: int, hi: int, body) -> tuple[list[int], int]:
        w_body, k_body = self.seq(body)
        k_body = max(1, k_body)  # even an empty body is a step per iteration
        if not any(w_body[1:]) and w_body[0] <= 1:  # zero-width, one way: a step each
            return (_unit(0) if w_body[0] or lo == 0 else [0] * _N), \
                min(_CAP, max(lo, 1) * k_body)
        # Past `lo`, an iteration that matches nothing ends the loop: it must consume.
        consuming = [0, *w_body[1:]]
        top = hi if hi != C.MAXREPEAT else lo + COMM_CHARS
        prev = _unit(0)
        ways = _unit(0) if lo == 0 else [0] * _N
        work = 0
        for i in range(1, min(top, lo + COMM_CHARS) + 1):
            work = min(_CAP, work + sum(prev) * k_body)
            self._check(work)
            prev = _conv(prev, w_body if i <= lo else consuming)
            if not any(prev):
                break
            if i >= lo:
                ways = _add(ways, prev)
        return ways, work

    def _check(self, work: int) -> None:
        if work > self.limit:
            raise TooCostly(work)


def steps(pattern: str | re.Pattern, limit: int = _CAP) -> int:
    """An upper bound on the steps one `search` of `pattern` takes on any name of at most
    COMM_CHARS characters (each start position, every partial path). Raises TooCostly as
    soon as it passes `limit`; re.error on a pattern re refuses."""
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    flags = pattern.flags if isinstance(pattern, re.Pattern) else 0
    tree = _parser.parse(text, flags)
    per_start = _Bound(max(1, limit // _N)).seq(tree)[1]
    return min(_CAP, per_start * _N)


def _children(op, av) -> list:
    """The sub-sequences of one node of re's parse tree."""
    if op is C.SUBPATTERN:
        return [av[-1]]
    if op is C.BRANCH:
        return list(av[1])
    if op in (C.ASSERT, C.ASSERT_NOT):
        return [av[1]]
    if op is C.ATOMIC_GROUP:
        return [av]
    if op is C.GROUPREF_EXISTS:
        return [b for b in av[1:] if b is not None]
    return []


def nested(pattern: str) -> bool:
    """A repeat of more than one inside another repeat: (a+)+, (a*b?)*, the usual cause."""
    def walk(items, inside: bool) -> bool:
        for op, av in items:
            if op in _REPEATS:
                many = av[1] > 1
                if (many and inside) or walk(av[2], inside or many):
                    return True
            elif any(walk(child, inside) for child in _children(op, av)):
                return True
        return False

    return walk(_parser.parse(pattern), False)


def compile_bounded(pattern: str) -> re.Pattern:
    """re.compile(pattern), refused (ValueError, one line) when one search of a comm could
    take more than MAX_STEPS; re.error when it is not a regular expression."""
    compiled = re.compile(pattern)
    try:
        steps(pattern, MAX_STEPS)
    except RecursionError:
        raise ValueError(f"regular expression {pattern!r}: groups nested too deeply") from None
    except TooCostly:
        why = ("nested quantifiers, e.g. (a+)+" if nested(pattern) else
               "quantifiers or alternatives that can match the same characters")
        raise ValueError(f"regular expression {pattern!r} could backtrack more than "
                         f"{MAX_STEPS:,} steps on a {COMM_CHARS}-character name ({why}); "
                         "simplify it") from None
    return compiled
