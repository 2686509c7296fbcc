"""What every `specreason` subcommand shares: the bundle and provider arguments, text input, and turning errors
into one line. The argparse side of the conventions (did-you-mean, defaults in --help) is in parser.py.

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
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SpecReasonError
from .parser import subcommands

if TYPE_CHECKING:
    from ..backends.providers import ProviderConfig

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
    """--provider and its options (specreason_rt/backends/providers.py), for every command that runs a bundle."""
    from ..backends.providers import PROVIDER_NAMES

    p.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES,
                   help="where the models run: cpu (default), cuda / tensorrt (ONNX Runtime execution providers, "
                        "need onnxruntime-gpu), trt (the bundle's TensorRT engines, KV cache on the GPU; needs "
                        "pip install 'specreason-rt[trt]' and engines from specreason-export --trt)")
    p.add_argument("--device-id", type=int, default=0, metavar="N", help="GPU index for cuda/tensorrt/trt")
    p.add_argument("--fp16", action="store_true", help="tensorrt provider: let TensorRT use fp16 kernels")
    p.add_argument("--trt-cache", type=Path, default=None, metavar="DIR",
                   help="tensorrt provider: engine and timing cache directory (default ~/.cache/specreason/trt-ep)")


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    from ..backends.providers import ProviderConfig

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
