"""The README is the front door: its test command is CI's, its tunables table is complete."""

import re
from pathlib import Path

from hugepaged.tunables import SPECS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_exactly():
    block = re.search(r"<!-- test-command -->\s*```sh\n(.+?)\n```", README, re.S)
    assert block, "README has no marked test command block"
    command = block.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines(), f".ci/run does not run {command!r}"


def test_tunables_table_lists_every_tunable_with_its_range():
    for name, spec in SPECS.items():
        row = re.search(rf"^\| `{name}` \|(.+)$", README, re.M)
        assert row, f"README tunables table lacks {name}"
        if spec.choices:
            assert all(c in row.group(1) for c in spec.choices), name
        elif spec.lo is not None:
            assert f"{spec.lo}" in row.group(1), name
