"""`--help` that teaches: the flags a newcomer needs, in named groups, and `--help-all` for every flag.

A command's arguments dataclass names its groups in a ``HELP_GROUPS`` class attribute ({group title: field
names}); :func:`concise` shows only those, each under its title, one spelling per flag (the dashed one), and
closes with the line that points to ``--help-all``. Every flag keeps working whether it is shown or not.
"""

from __future__ import annotations

import argparse

HELP_ALL = "--help-all"


class OneSpellingFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag once (``--top-k K``, not ``--top_k TOP_K, --top-k TOP_K``), its default, wide lines."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=118)

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help  # "(default: None)" says nothing
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        dashed = [o for o in action.option_strings if "_" not in o] or action.option_strings
        flag = min(dashed, key=len)  # --batch-size, not --per-device-train-batch-size
        if action.nargs == 0:
            return flag
        if action.nargs == "?" and action.const is True:  # HfArgumentParser's booleans: --flag [true|false]
            return flag
        if action.metavar:
            return f"{flag} {action.metavar}"
        word = {int: "N", float: "X"}.get(action.type, action.dest.split("_")[-1].upper())
        return f"{flag} {word}"


def concise(parser: argparse.ArgumentParser, groups: dict[str, tuple[str, ...]], prog: str,
            description: str | None = None) -> None:
    # ``description``: a shorter one than --help-all's (None: keep the parser's)
    """Show only the flags named in ``groups`` (in their order, under their titles) and point to --help-all."""
    by_dest = {}
    for action in parser._actions:  # a boolean's --no-x twin shares its dest: keep the flag itself
        by_dest.setdefault(action.dest, action)
    unknown = [d for names in groups.values() for d in names if d not in by_dest]
    if unknown:
        raise ValueError(f"HELP_GROUPS names no flag: {unknown}")
    shown = {d for names in groups.values() for d in names} | {"help"}
    parser.formatter_class = OneSpellingFormatter
    parser.usage = f"{prog} [flags]   ({HELP_ALL}: every flag)"
    if description is not None:
        parser.description = description
    hidden = 0
    for action in list(parser._actions):
        if (action.dest not in shown or by_dest[action.dest] is not action) and action.dest != "config":
            action.help = argparse.SUPPRESS
            hidden += 1
    for group in list(parser._action_groups):
        group._group_actions[:] = [a for a in group._group_actions if a.dest in ("help", "config")]
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        group._group_actions.extend(by_dest[d] for d in names)
    parser.epilog = f"{hidden} more flags: {prog} {HELP_ALL}"


def wants_everything(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --help-all was asked for, argv with it turned into --help)."""
    return HELP_ALL in argv, ["--help" if token == HELP_ALL else token for token in argv]
