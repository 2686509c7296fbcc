"""`specreason`: the runtime's command line (numpy + ONNX Runtime only).

One module per subcommand group, each with add_commands(sub); the helpers and conventions they share live in
common.py and parser.py, which import none of them (no import cycle). A new subcommand needs an example: an
epilog of its own or an entry in EXAMPLES (tests/test_cli.py checks every subcommand's --help).
"""

from __future__ import annotations

import argparse
import sys

from ..bench import add_commands as add_bench_commands
from . import info, reason, serve
from .common import PROG, add_provider_arguments, apply_conventions, provider_config, run_command, version_line
from .parser import Parser

__all__ = ["EXAMPLES", "add_provider_arguments", "build_parser", "main", "provider_config"]

# One runnable example per subcommand, shown under its --help. They assume the default bundle
# (./specreason-bundle, what a bare `specreason-export` writes).
EXAMPLES = {
    "info": "specreason info --bundle specreason-bundle",
    "generate": 'specreason generate --model speculator --branches 4 --seed 1 "37+45*3"',
    "run": 'specreason run "37+45*3"              # the built-in task: left-to-right arithmetic mod 100',
    "eval": "python -m specreason_models.task --heldout heldout.jsonl\n"
            "specreason eval --problems heldout.jsonl --strategy verifier stepwise --plot eval.png",
    "serve": "specreason serve --port 8000 --api-key \"$KEY\"",
    "bench": "specreason bench decode --branches 1 4 --contexts 64 --json",
    "bench logits": "specreason bench logits --tokens 512 --json",
    "bench verify": "specreason bench verify --context 512 --drafts 4 --draft-tokens 32 --threads 2 --json",
    "bench decode": "specreason bench decode --branches 1 4 --contexts 64 --threads 2 --json",
    "bench prefill": "specreason bench prefill --threads 2 --json",
    "bench generate": "specreason bench generate --threads 2 --json",
    "bench quality": "specreason bench quality --bundle smollm2-int4 --reference smollm2-fp32 --json",
}

DESCRIPTION = """\
Run and inspect specreason bundles: a speculator and a verifier model exported by specreason-export.

  specreason-export                  # the built-in pair -> ./specreason-bundle
  specreason run "37+45*3"           # the paper's stepwise speculative reasoning on one problem
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--version", action="version", version=version_line(PROG))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info.add_commands(sub)  # info, generate
    reason.add_commands(sub)  # run, eval
    serve.add_commands(sub)  # serve
    add_bench_commands(sub)  # bench logits / decode / prefill / generate / quality (specreason_rt/bench.py)
    apply_conventions(p, examples=EXAMPLES)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
