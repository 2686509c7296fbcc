"""The `specreason` argument parser: argparse with a did-you-mean (difflib; argparse before 3.14 has none) for a
mistyped flag, subcommand or choice, and a help formatter that shows every option's default."""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn


def suggest(word: str, candidates: Sequence[str]) -> str:
    """' did you mean X?' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" did you mean {close[0]}?" if close else ""


class HelpFormatter(argparse.HelpFormatter):
    """Fills prose to the terminal's width but keeps indented lines (examples) as written, and appends
    "(default: X)" where an option's help names no default.

    argparse's ArgumentDefaultsHelpFormatter would also print "(default: None)" and "(default: False)" for
    flags and options without a default, which tells the reader nothing.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if line[:1].isspace() or not line:  # a command to copy: never re-wrapped
                lines.append(indent + line)
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # `is`, not `in`: 0 == False, and a default of 0 is worth showing.
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings
                or isinstance(action, argparse._HelpAction | argparse._VersionAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        shown = shown.replace("%", "%%")  # help strings are %-formatted
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class Parser(argparse.ArgumentParser):
    """ArgumentParser with the conventions above. Subparsers are of this class too (argparse creates them
    with the parent's class), so every subcommand gets them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # A subcommand or a choice that is not one: name the closest.
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            hint = suggest(str(value), choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{';' if hint else ''}{hint} "
                                                 f"(choose from {', '.join(choices)})")
        super()._check_value(action, value)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # Kept so that error() can point at a mistyped flag even when argparse fails on something else first
        # (a required option missing because its name was mistyped). A subcommand's parser sees its own part.
        self._seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            # The subcommand that was chosen owns the flags a mistyped one should be compared with.
            parser = self._chosen_subparser(ns)
            hints = parser._flag_hints(extras) if isinstance(parser, Parser) else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return ns

    def _flag_hints(self, args: Sequence[str]) -> str:
        """'; --tresh: did you mean --threshold?' for each argument that looks like an unknown flag."""
        flags = [s for a in self._actions for s in a.option_strings]
        hints = []
        for arg in args:
            name = arg.split("=", 1)[0]
            # Not a flag (a value, a negative number) or a known one (argparse also takes unique prefixes).
            if not name.startswith("-") or name == "-" or name[1:2].isdigit() or any(f.startswith(name) for f in flags):
                continue
            hint = suggest(name, flags)
            if hint:
                hints.append(f"; {arg}:{hint}")
        return "".join(hints)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            message += self._flag_hints(getattr(self, "_seen", []))
        super().error(message)

    def _chosen_subparser(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self
        while True:
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            name = getattr(ns, sub.dest, None) if sub is not None and sub.dest else None
            if sub is None or name not in sub.choices:
                return parser
            parser = sub.choices[name]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by its full name, groups included: 'info', ..., 'bench', 'bench decode'."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in subcommands(sub).items()})
    return out
