"""`specreason-export`: turn a speculator and a verifier into a validated ONNX bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ExportError

DESCRIPTION = """\
Export a speculator model and a verifier model into one bundle directory that the specreason_rt
runtime loads: an ONNX graph per model (batched branch dimension, KV cache in/out, logits only where
asked), tokenizer files and manifest.json (architecture, IO names, generation facts, file hashes,
provenance, validation result).

A SOURCE is one of:
  speculator | verifier     the built-in pair trained on the built-in reasoning task (models/)
  path/to/model.gguf        a GGUF file (dequantized by transformers; llama/mistral/qwen2 families)
  path/to/model-dir         a local Hugging Face model directory
  org/name                  a Hugging Face hub id (needs network access)

Every exported model is checked against its PyTorch source (a batch of 3 prompts of different
lengths, prefill plus decode steps); a model past tolerance fails the export and nothing is written.
"""

EPILOG = """\
examples:
  specreason-export                                   # built-in pair -> ./specreason-bundle
  specreason-export --precision int4 --out bundle-int4
  specreason-export --speculator SmolLM2.gguf --verifier SmolLM2.gguf --out smollm2-bundle
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specreason-export", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speculator", default="speculator", metavar="SOURCE",
                   help="the cheap model that drafts reasoning steps (default: built-in 'speculator')")
    p.add_argument("--verifier", default="verifier", metavar="SOURCE",
                   help="the stronger model that checks them (default: built-in 'verifier')")
    p.add_argument("--out", type=Path, default=Path("specreason-bundle"), metavar="DIR",
                   help="bundle directory to create (default: ./specreason-bundle)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"],
                   help="weights: fp32, int8 (dynamic, CPU) or int4 (MatMulNBits, CPU/edge); default fp32")
    p.add_argument("--attention", default="auto", choices=["auto", "gqa", "plain"],
                   help="gqa: ONNX Runtime's GroupQueryAttention with an in-place KV cache (fastest on ORT); "
                        "plain: standard ONNX ops only (TensorRT); auto (default): gqa where the head size allows")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists (only once the new bundle is done)")
    p.add_argument("--step-delimiter", default="\n\n", metavar="TEXT",
                   help=r"text that ends a reasoning step, recorded in the manifest (default: a blank line, '\n\n')")
    p.add_argument("--decode-steps", type=int, default=8, metavar="N",
                   help="greedy decode steps checked during validation (>= 8, default 8)")
    p.add_argument("--max-logit-diff", type=float, default=None, metavar="X",
                   help="validation limit on max |logit diff| vs PyTorch "
                        "(default 1e-3 for fp32, unchecked for int8/int4)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="F",
                   help="validation minimum greedy-token agreement, 0..1 (default 1.0 fp32, 0.5 int8/int4)")
    p.add_argument("--value-head", default="auto", metavar="FILE|none",
                   help="value head put in the verifier's graph (output `value`): a file from "
                        "python -m specreason_models.value_head, or none (default: the built-in verifier's own head)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .bundle import ExportOptions, write_bundle
    except ImportError as e:
        print(f"specreason-export: error: missing export dependency ({e.name}); install it with "
              "pip install 'specreason-rt[export]'", file=sys.stderr)
        return 2
    delimiter = args.step_delimiter.encode().decode("unicode_escape")  # let users type \n\n on a shell
    try:
        opts = ExportOptions(speculator=args.speculator, verifier=args.verifier, out=args.out,
                             precision=args.precision, force=args.force, step_delimiter=delimiter,
                             attention=args.attention,
                             decode_steps=args.decode_steps, max_logit_diff=args.max_logit_diff,
                             min_agreement=args.min_agreement, show_progress=not args.quiet,
                             value_head=args.value_head)
        manifest = write_bundle(opts)
    except ExportError as e:
        print(f"specreason-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("specreason-export: interrupted; no bundle was written", file=sys.stderr)
        return 130
    print(f"wrote {opts.out} ({manifest.precision}):")
    for role, entry in manifest.models.items():
        v = entry.validation
        print(f"  {role:<10} {entry.source['id']}: {entry.architecture.parameters / 1e6:.2f}M params, "
              f"max |logit diff| {v['max_abs_logit_diff']:.2e}, greedy agreement {v['greedy_agreement']:.0%}")
    print(f"  tokenizers shared: {'yes' if manifest.tokenizers_shared else 'no (text is handed across)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
