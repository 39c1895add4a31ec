#!/usr/bin/env python3
"""The slowest comm pattern the configuration accepts: how long one match takes (issue 21 f).

Usage: python bench/bench_regex_bound.py [--patterns 4000] [--seed 1] [--name NAME]

`comm` and `exclude_comm` are refused at load when hugepaged.regex_bound's bound on the steps
of one search of a 15-character name passes MAX_STEPS. This measures what that leaves: random
patterns from a grammar made to backtrack (nested and stacked quantifiers, overlapping
alternatives, lazy repeats, classes, backreferences, anchors), plus hand-made ones at the
bound; each accepted pattern is searched on names built to make it fail late ('a' * k + a
last character that fails, for every k up to 15, and random names over its alphabet); the
worst time over 3 repetitions is kept. Refused patterns are never run (some would take
hours). Prints and writes bench/results/NAME.md: the slowest accepted patterns, the time of
the refused reference pattern `^(((a+)+)+)+$` as a check that the inputs are hard, and the
bound's own cost at load for the longest pattern allowed (4096 characters).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from hugepaged.regex_bound import COMM_CHARS, MAX_STEPS, compile_bounded, steps  # noqa: E402

ATOMS = ["a", "b", ".", "[ab]", r"\w", "a", "a", "(a)"]
QUANTS = ["*", "+", "?", "{0,3}", "{1,15}", "*?", "+?", "", "", ""]


def pattern(rng: random.Random, depth: int = 0) -> str:
    """A random pattern over a tiny alphabet, built to backtrack."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if depth < 3 and roll < 0.3:
            inner = pattern(rng, depth + 1)
            if rng.random() < 0.4:
                inner += "|" + pattern(rng, depth + 1)
            atom = f"(?:{inner})" if rng.random() < 0.5 else f"({inner})"
        elif roll < 0.35:
            atom = r"\1" if "(" in "".join(parts) else "a"
        else:
            atom = rng.choice(ATOMS)
        parts.append(atom + rng.choice(QUANTS))
    text = "".join(parts)
    if depth == 0:
        text = rng.choice(["", "^"]) + text + rng.choice(["", "$", "!", "b"])
    return text


def names(rng: random.Random) -> list[str]:
    out = []
    for k in range(COMM_CHARS + 1):
        for last in ("!", "b", "-", ""):
            out.append(("a" * k + last)[:COMM_CHARS])
    for _ in range(20):
        out.append("".join(rng.choice("ab!-") for _ in range(rng.randint(1, COMM_CHARS))))
    return out


def worst(compiled: re.Pattern, inputs: list[str]) -> tuple[float, str]:
    best = (0.0, "")
    for text in inputs:
        t = min(_time(compiled, text) for _ in range(3))
        best = max(best, (t, text))
    return best


def _time(compiled: re.Pattern, text: str) -> float:
    t0 = time.perf_counter()
    compiled.search(text)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="regex_bound")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    inputs = names(rng)
    handmade = ["a*" * 4 + "$", "(?:)" + "{62000}", "^(a|a?)+$", "(a|aa)+$",
                r"^(\w+-)*\w+$", ".*" * 4 + "b", "(a|b|ab|ba|aa|bb)*!", "(a?){3}" * 3 + "!"]
    rows, refused, tried = [], 0, 0
    candidates = handmade + [pattern(rng) for _ in range(args.patterns)]
    for text in candidates:
        try:
            compiled = compile_bounded(text)
        except re.error:
            continue
        except ValueError:
            refused += 1
            continue
        tried += 1
        seconds, name = worst(compiled, inputs)
        rows.append((seconds, text, name, steps(text)))
    rows.sort(reverse=True)
    ref = re.compile(r"^(((a+)+)+)+$")
    t_ref = _time(ref, "a" * 14 + "!")
    t0 = time.perf_counter()
    long = "(?:a|b)*x" * 455  # 4095 characters
    with contextlib.suppress(ValueError):
        compile_bounded(long)
    t_load = time.perf_counter() - t0
    lines = [
        f"# {args.name}: the slowest accepted comm patterns ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python bench/bench_regex_bound.py --patterns {args.patterns} --seed {args.seed}`: "
        f"{len(candidates)} patterns, {tried} accepted and timed, {refused} refused "
        f"(bound {MAX_STEPS:,} steps); {len(inputs)} names each, best of 3 per name.",
        "",
        "| worst search | pattern | name | bound (steps) |",
        "|---:|---|---|---:|",
    ]
    for seconds, text, name, n in rows[:10]:
        lines.append(f"| {seconds * 1e3:.2f} ms | `{text}` | `{name}` | {n:,} |")
    lines += ["", f"Refused reference `^(((a+)+)+)+$` on `{'a' * 14}!`: {t_ref:.1f} s.",
              f"Bound computed at load for a 4096-character pattern: {t_load * 1e3:.0f} ms."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / f"{args.name}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
