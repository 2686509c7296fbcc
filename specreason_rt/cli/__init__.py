"""`specreason`: the runtime's command line (numpy + ONNX Runtime only).

One module per subcommand group, each with add_commands(sub); the helpers they share live in common.py
(which imports none of them, so there is no import cycle).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, info, reason, serve
from .common import PROG, add_provider_arguments, provider_config, run_command

__all__ = ["add_provider_arguments", "build_parser", "main", "provider_config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run and inspect specreason bundles.")
    sub = p.add_subparsers(dest="command", required=True)
    info.add_commands(sub)  # info, generate
    reason.add_commands(sub)  # run, eval
    serve.add_commands(sub)  # serve
    bench.add_commands(sub)  # bench logits, bench decode
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
