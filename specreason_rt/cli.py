"""`specreason`: the runtime's command line (numpy + ONNX Runtime only)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SpecReasonError
from .manifest import load_manifest


def _info(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.bundle)
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    print(f"bundle {args.bundle}: {manifest.precision}, tokenizers shared: {manifest.tokenizers_shared}")
    for role, e in manifest.models.items():
        a, v = e.architecture, e.validation
        print(f"  {role:<10} {e.source['id']} ({a.family}, {a.layers} layers, {a.parameters / 1e6:.2f}M params, "
              f"vocab {a.vocab_size}, context {a.max_context}); validation: max |logit diff| "
              f"{v['max_abs_logit_diff']:.2e}, greedy agreement {v['greedy_agreement']:.0%}")
    return 0


def _bench_logits(args: argparse.Namespace) -> int:
    from .bench import bench_logits

    result = bench_logits(bundle=args.bundle, role=args.role, prompt_tokens=args.tokens, repeats=args.repeats,
                          threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"prefill of {args.tokens} tokens, {result['role']} ({result['precision']}), median of {args.repeats}:")
    for r in result["results"]:
        print(f"  B={r['branches']}: last position only {r['last_only_ms']:.1f} ms "
              f"({r['last_only_logits_mb']} MB logits) vs all positions {r['all_positions_ms']:.1f} ms "
              f"({r['all_positions_logits_mb']} MB): {r['speedup']}x")
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    from .bench import bench_decode

    result = bench_decode(bundle=args.bundle, branches=tuple(args.branches), contexts=tuple(args.contexts),
                          steps=args.steps, repeats=args.repeats, threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"decode, {result['precision']}, median of {args.repeats} runs of {args.steps} steps:")
    for r in result["results"]:
        print(f"  {r['role']:<10} B={r['branches']:<2} T={r['context']:<5} {r['ms_per_step']:8.3f} ms/step "
              f"{r['tokens_per_s']:9.1f} tokens/s")
    for cell, ratio in result["verifier_over_speculator"].items():
        print(f"  verifier / speculator time per step at {cell}: {ratio}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specreason", description="Run and inspect specreason bundles.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="check a bundle (files, hashes, schema) and summarise its manifest")
    info.add_argument("--bundle", required=True, metavar="DIR")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks with JSON output")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    logits = bench_sub.add_parser("logits", help="prefill with logits at the last position vs at every position")
    logits.add_argument("--bundle", required=True, metavar="DIR")
    logits.add_argument("--role", default="speculator", choices=["speculator", "verifier"])
    logits.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    logits.add_argument("--repeats", type=int, default=5)
    logits.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    logits.add_argument("--json", action="store_true")
    logits.set_defaults(func=_bench_logits)
    decode = bench_sub.add_parser("decode", help="ms per decode step of both roles at given branches and context")
    decode.add_argument("--bundle", required=True, metavar="DIR")
    decode.add_argument("--branches", type=int, nargs="+", default=[1, 4], metavar="B")
    decode.add_argument("--contexts", type=int, nargs="+", default=[64], metavar="T")
    decode.add_argument("--steps", type=int, default=32, help="decode steps per run (default 32)")
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    decode.add_argument("--json", action="store_true")
    decode.set_defaults(func=_bench_decode)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SpecReasonError as e:
        print(f"specreason: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
