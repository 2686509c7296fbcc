"""`specreason-export`: turn a speculator and a verifier into a validated ONNX bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ExportError

if TYPE_CHECKING:
    from specreason_rt.manifest import Manifest

    from .trt import TrtOptions

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
    from specreason_rt.cli.common import version_line  # --version: the same line as `specreason --version`

    p.add_argument("--version", action="version", version=version_line("specreason-export"))
    p.add_argument("--speculator", default="speculator", metavar="SOURCE",
                   help="the cheap model that drafts reasoning steps (default: built-in 'speculator')")
    p.add_argument("--verifier", default="verifier", metavar="SOURCE",
                   help="the stronger model that checks them (default: built-in 'verifier')")
    p.add_argument("--out", type=Path, default=Path("specreason-bundle"), metavar="DIR",
                   help="bundle directory to create (default: ./specreason-bundle)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4", "fp16"],
                   help="weights: fp32, int8 (dynamic, CPU) or int4 (MatMulNBits, CPU/edge); default fp32")
    p.add_argument("--attention", default="auto", choices=["auto", "gqa", "plain", "prefix"],
                   help="gqa: ONNX Runtime's GroupQueryAttention with an in-place KV cache (fastest on ORT); "
                        "plain: standard ONNX ops only (TensorRT); prefix: plain plus a shared prefix segment, so "
                        "branches forked from one prompt hold its keys/values once; auto (default): gqa where the "
                        "head size allows")
    p.add_argument("--force", action="store_true",
                   help="replace DIR if it is a bundle (only once the new bundle is done; never a non-bundle folder)")
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
    hub = p.add_argument_group("hub ids (org/name)")
    hub.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit of hub ids (default main)")
    hub.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                     help="hub download cache (default: the hub client's, $HF_HOME)")
    hub.add_argument("--token", default=None, metavar="TOKEN",
                     help="hub access token for private or gated models (default: $HF_TOKEN or the stored login)")
    trt = p.add_argument_group("TensorRT engines (NVIDIA GPU; pip install 'specreason-rt[trt]', see runtime/README.md)")
    trt.add_argument("--trt", action="store_true",
                     help="also build one TensorRT engine per model (forces --attention plain; --precision fp16 "
                          "builds fp16 engines beside the fp32 ONNX)")
    trt.add_argument("--engines-only", action="store_true",
                     help="build (or rebuild) the engines of the existing bundle --out on this machine; needs no torch")
    trt.add_argument("--max-branches", type=int, default=8, metavar="N", help="branches the engines take (default 8)")
    trt.add_argument("--max-prompt-tokens", type=int, default=512, metavar="N",
                     help="longest prefill in one call (default 512)")
    trt.add_argument("--max-step-tokens", type=int, default=128, metavar="N",
                     help="longest verified step, and most logit positions per call (default 128)")
    trt.add_argument("--trt-max-context", type=int, default=2048, metavar="N",
                     help="tokens per branch the engines hold (default 2048, at most the model's context)")
    trt.add_argument("--trt-workspace-mib", type=int, default=4096, metavar="MIB",
                     help="builder workspace (default 4096)")
    trt.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                     help="start from this TensorRT timing cache (default: the bundle's own, when it fits this GPU)")
    trt.add_argument("--device-id", type=int, default=0, metavar="N", help="GPU to build on (default 0)")
    return p


def _trt_options(args: argparse.Namespace) -> TrtOptions | None:
    """The engine build options, or None without --trt / --engines-only; ExportError on bad values."""
    from specreason_rt.backends.trt.plan import EngineLimits
    from specreason_rt.errors import ConfigError

    from .trt import TrtOptions

    if not (args.trt or args.engines_only):
        if args.precision == "fp16":
            raise ExportError("--precision fp16 is for TensorRT engines: add --trt (the ONNX stays fp32)")
        return None
    if args.precision not in ("fp32", "fp16"):
        raise ExportError(f"--trt builds fp32 or fp16 engines, not {args.precision}: use --precision fp16 for GPUs")
    try:
        limits = EngineLimits(max_branches=args.max_branches, max_prompt_tokens=args.max_prompt_tokens,
                              max_step_tokens=args.max_step_tokens, max_context=args.trt_max_context)
    except ConfigError as e:
        raise ExportError(str(e)) from e
    return TrtOptions(precision=args.precision, limits=limits, workspace_mib=args.trt_workspace_mib,
                      timing_cache=args.timing_cache, device_id=args.device_id)


def _print_engines(manifest: Manifest) -> None:
    for role, f in manifest.engines.items():
        print(f"  {role:<10} TensorRT {f.tensorrt_version} engine {f.file}: {f.precision}, {f.device} (compute "
              f"capability {f.compute_capability}), branches <= {f.max_branches}, context <= {f.max_context}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        trt_opts = _trt_options(args)
        if args.engines_only:
            from .trt import rebuild_engines

            assert trt_opts is not None
            manifest = rebuild_engines(bundle=args.out, options=trt_opts, show_progress=not args.quiet)
            print(f"built engines for {args.out}:")
            _print_engines(manifest)
            return 0
    except ExportError as e:
        print(f"specreason-export: error: {e}", file=sys.stderr)
        return 1
    from .sources import HubOptions, preflight

    try:  # before importing torch: a typo or an unreachable hub id is reported in a second or two
        hub = HubOptions(revision=args.revision, cache_dir=args.cache_dir, token=args.token)
        preflight([args.speculator, args.verifier], hub=hub)
    except ExportError as e:
        print(f"specreason-export: error: {e}", file=sys.stderr)
        return 1
    try:
        from .bundle import ExportOptions, write_bundle
    except ImportError as e:
        print(f"specreason-export: error: missing export dependency ({e.name}); install it with "
              "pip install 'specreason-rt[export]'", file=sys.stderr)
        return 2
    from .publish import interrupts_clean_up

    try:
        delimiter = args.step_delimiter.encode().decode("unicode_escape")  # let users type \n\n on a shell
    except UnicodeDecodeError as e:
        print(f"specreason-export: error: --step-delimiter {args.step_delimiter!r} has a bad escape ({e.reason})",
              file=sys.stderr)
        return 1
    try:
        opts = ExportOptions(hub=hub, speculator=args.speculator, verifier=args.verifier, out=args.out,
                             precision="fp32" if args.precision == "fp16" else args.precision, trt=trt_opts,
                             force=args.force, step_delimiter=delimiter,
                             attention=args.attention,
                             decode_steps=args.decode_steps, max_logit_diff=args.max_logit_diff,
                             min_agreement=args.min_agreement, show_progress=not args.quiet,
                             value_head=args.value_head)
        with interrupts_clean_up():  # SIGTERM / SIGHUP clean up like Ctrl-C
            manifest = write_bundle(opts)
    except ExportError as e:
        print(f"specreason-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("specreason-export: interrupted; no bundle was written (an existing one is unchanged)", file=sys.stderr)
        return 130
    print(f"wrote {opts.out} ({manifest.precision}):")
    for role, entry in manifest.models.items():
        v = entry.validation
        print(f"  {role:<10} {entry.source['id']}: {entry.architecture.parameters / 1e6:.2f}M params, "
              f"max |logit diff| {v['max_abs_logit_diff']:.2e}, greedy agreement {v['greedy_agreement']:.0%}")
    print(f"  tokenizers shared: {'yes' if manifest.tokenizers_shared else 'no (text is handed across)'}")
    _print_engines(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
