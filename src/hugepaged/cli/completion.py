"""`hugepaged completion SHELL`: a completion script generated from the argparse definitions."""

import argparse
import sys

SHELLS = ("bash", "zsh", "tcsh")

# Process ids for --pid: bash gets a function in the preamble, zsh has _pids built in.
PIDS = {"bash": "_shtab_hugepaged_compgen_pids", "zsh": "_pids", "tcsh": "p"}
PREAMBLE = {"bash": """
_shtab_hugepaged_compgen_pids() {
  compgen -W "$(cd /proc 2>/dev/null && printf '%s ' [0-9]*)" -- "$1"
}
"""}
FILE_DESTS = {"config", "socket", "state_file"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print the completion script for SHELL, generated from "
                                   "hugepaged's own command definitions. For bash: "
                                   "hugepaged completion bash > "
                                   "/etc/bash_completion.d/hugepaged; for zsh: "
                                   "hugepaged completion zsh > \"${fpath[1]}/_hugepaged\".")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(run=run)


def subparsers(parser: argparse.ArgumentParser):
    """(name, subparser) for every subcommand of `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def annotate(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Hints for shtab: file paths complete as files, --pid as running process ids."""
    import shtab

    for _, sub in subparsers(parser):
        for action in sub._actions:
            if action.dest in FILE_DESTS:
                action.complete = shtab.FILE
            elif action.dest == "pid":
                action.complete = PIDS
    return parser


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script of `parser` (the whole command's, handed down by main())."""
    import shtab

    return shtab.complete(annotate(parser), shell=shell, preamble=PREAMBLE.get(shell, ""))


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(script(args.shell, args.parser))
    return 0
