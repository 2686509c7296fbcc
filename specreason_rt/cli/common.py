"""What every `specreason` subcommand shares: the parser conventions, the bundle and provider arguments, and
turning errors into one line.

Conventions (issue 12, the ones users know from other tools):
  --version                    the package version and the versions of the libraries it runs on
  --bundle                     optional everywhere: $SPECREASON_BUNDLE, else ./specreason-bundle (what
                               `specreason-export` writes by default)
  --help                       shows each option's default and an example per subcommand
  did-you-mean                 for a mistyped flag, subcommand or choice (difflib; argparse before 3.14 has none)
  a closed pipe                (`specreason info --json | head -1`) ends quietly, as `cat` does
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import SpecReasonError

if TYPE_CHECKING:
    from ..providers import ProviderConfig

PROG = "specreason"
BUNDLE_ENV = "SPECREASON_BUNDLE"
DEFAULT_BUNDLE = "specreason-bundle"  # specreason-export's default --out
THREADS_HELP = "ONNX Runtime intra-op threads (0: auto = 1 below 10M parameters, else all cores)"
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def version_line(prog: str) -> str:
    """`PROG VERSION (onnxruntime X, numpy Y, python Z)`: what a bug report needs, without importing anything."""

    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(map(str, sys.version_info[:3]))
    return (f"{prog} {installed('specreason-rt')} (onnxruntime {installed('onnxruntime')}, "
            f"numpy {installed('numpy')}, python {python})")


def default_bundle() -> str:
    return os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE


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


def apply_conventions(parser: argparse.ArgumentParser, *, examples: dict[str, str]) -> None:
    """--bundle's default and help, and an example, in every subcommand, including those whose modules set
    neither (serve, bench): one place keeps the whole CLI consistent. A subcommand with its own epilog keeps it."""
    for name, sub in subcommands(parser).items():
        for action in sub._actions:
            if action.dest == "bundle" and action.option_strings:
                action.required = False
                action.default = None  # resolved when the command runs (run_command), so the env var is read then
                action.help = (f"the bundle directory (default: ${BUNDLE_ENV}, else ./{DEFAULT_BUNDLE}, "
                               "where specreason-export writes)")
        if not sub.epilog and name in examples:
            body = "\n".join(f"  {line}" for line in examples[name].splitlines())
            sub.epilog = f"example{'s' if len(examples[name].splitlines()) > 1 else ''}:\n{body}"


def text_argument(value: str, *, what: str) -> str:
    """A PROBLEM / PROMPT argument, or stdin for '-', as valid Unicode text. Undecodable bytes reach Python's argv
    as lone surrogates, which the tokenizer cannot take: refuse them here, naming the byte."""
    if value == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecReasonError(f"the {what} on stdin is not UTF-8: byte 0x{data[e.start]:02x} at offset "
                                  f"{e.start}") from None
    for i, ch in enumerate(value):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"U+{ord(ch):04X}"
            raise SpecReasonError(f"the {what} is not valid UTF-8 text: {byte} at character {i}")
    return value


def add_bundle_argument(p: argparse.ArgumentParser) -> None:
    """--bundle DIR; its default and help come from apply_conventions, the same for every subcommand."""
    p.add_argument("--bundle", metavar="DIR", default=None)


def add_provider_arguments(p: argparse.ArgumentParser) -> None:
    """--provider and its options (specreason_rt/providers.py), for every command that runs a bundle."""
    from ..providers import PROVIDER_NAMES

    p.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES,
                   help="where the models run: cpu (default), cuda / tensorrt (ONNX Runtime execution providers, "
                        "need onnxruntime-gpu), trt (the bundle's TensorRT engines, KV cache on the GPU; needs "
                        "pip install 'specreason-rt[trt]' and engines from specreason-export --trt)")
    p.add_argument("--device-id", type=int, default=0, metavar="N", help="GPU index for cuda/tensorrt/trt")
    p.add_argument("--fp16", action="store_true", help="tensorrt provider: let TensorRT use fp16 kernels")
    p.add_argument("--trt-cache", type=Path, default=None, metavar="DIR",
                   help="tensorrt provider: engine and timing cache directory (default ~/.cache/specreason/trt-ep)")


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    from ..providers import ProviderConfig

    return ProviderConfig(name=args.provider, device_id=args.device_id, fp16=args.fp16, cache_dir=args.trt_cache)


def _resolve_bundle(args: argparse.Namespace) -> None:
    """Fill in the default bundle; a default that does not exist says how to name or make one."""
    if getattr(args, "bundle", "") is not None:
        return
    args.bundle = default_bundle()
    if not Path(args.bundle).is_dir():
        source = f"${BUNDLE_ENV}" if os.environ.get(BUNDLE_ENV) else "the default"
        shown = args.bundle if Path(args.bundle).is_absolute() else f"./{Path(args.bundle)}"
        raise SpecReasonError(f"no bundle at {shown} ({source}): pass --bundle DIR, set ${BUNDLE_ENV}, "
                              "or create ./specreason-bundle with specreason-export")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, prog: str = PROG) -> int:
    """Parse and run a subcommand (its `func`): a SpecReasonError is one line on stderr (exit 1), Ctrl-C exit 130,
    a closed pipe exit 141 without a word (also for --help piped into head)."""
    try:
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        _resolve_bundle(args)
        return int(func(args))
    except SpecReasonError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (head, less) has gone: stop quietly. Point stdout at /dev/null so the interpreter's own
        # flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT
