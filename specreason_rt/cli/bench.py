"""`specreason bench`: benchmarks with JSON output (specreason_rt/bench.py does the timing)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from .common import THREADS_HELP


def _bench_logits(args: argparse.Namespace) -> int:
    from ..bench import bench_logits

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
    import os

    from ..bench import PEER_SCRIPTS, bench_decode, compare_with_peer, run_peer

    peers = []
    for name, path in args.peer or []:
        if name not in PEER_SCRIPTS:
            raise ConfigError(f"unknown peer {name!r}: choose from {', '.join(PEER_SCRIPTS)}")
        # genai lives in its own venv; transformers runs with this interpreter (needs the export extra).
        python = sys.executable
        if name == "onnxruntime-genai":
            python = args.peer_python or os.environ.get("SPECREASON_PEER_PYTHON", "")
        if not python:
            raise ConfigError("--peer onnxruntime-genai needs the peer venv's python: pass --peer-python or set "
                              "SPECREASON_PEER_PYTHON (create it with runtime/peers/setup_genai.sh)")
        peers.append((name, path, python))
    roles = tuple(args.roles)
    cells = {"branches": tuple(args.branches), "contexts": tuple(args.contexts), "steps": args.steps,
             "repeats": args.repeats, "threads": args.threads, "prefill_tokens": args.prefill_tokens,
             "n_specs": tuple(args.n_specs)}
    result = bench_decode(bundle=args.bundle, roles=roles, **cells)
    # Ours first, then each peer, in this one invocation on the same machine.
    result["peers"], result["comparison"] = {}, {}
    for name, path, python in peers:
        peer = run_peer(name=name, python=python, model_dir=path, **cells)
        result["peers"][name] = peer
        result["comparison"][name] = compare_with_peer(ours=result, peer=peer, role=roles[0])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"decode, {result['precision']}, median of {args.repeats} runs of {args.steps} steps:")
    for r in result["results"]:
        print(f"  {r['role']:<10} B={r['branches']:<2} T={r['context']:<5} {r['ms_per_step']:8.3f} ms/step "
              f"{r['tokens_per_s']:9.1f} tokens/s  python overhead {r['python_overhead_pct']:.1f}%  "
              f"bandwidth floor/measured {r['floor_over_measured']:.2f}")
    for r in result["prefill"]:
        print(f"  {r['role']:<10} prefill {r['prompt_tokens']} tokens shared by {r['n_specs']} branches: "
              f"{r['ms']:.1f} ms")
    print(f"  read bandwidth {result['read_bandwidth_gbs']} GB/s ({result['bandwidth_method']})")
    for cell, ratio in result["verifier_over_speculator"].items():
        print(f"  verifier / speculator time per step at {cell}: {ratio}x")
    for name, comp in result["comparison"].items():
        print(f"  vs {name} {result['peers'][name].get('version', '?')} ({comp['role']}):")
        for c in comp["decode"]:
            print(f"    B={c['branches']:<2} T={c['context']:<5} ours {c['ours_ms']:8.2f} ms  "
                  f"peer {c['peer_ms']:8.2f} ms  tokens/s ratio {c['tokens_per_s_ratio']:.2f}x")
        if comp["prefill"]:
            print(f"    prefill 4 branches / 1 branch: ours {comp['prefill'].get('ours_n4_over_n1')}x, "
                  f"peer {comp['prefill'].get('peer_n4_over_n1')}x")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks with JSON output")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    logits = bench_sub.add_parser("logits", help="prefill with logits at the last position vs at every position")
    logits.add_argument("--bundle", required=True, metavar="DIR")
    logits.add_argument("--role", default="speculator", choices=["speculator", "verifier"])
    logits.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    logits.add_argument("--repeats", type=int, default=5)
    logits.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    logits.add_argument("--json", action="store_true")
    logits.set_defaults(func=_bench_logits)
    decode = bench_sub.add_parser("decode", help="ms per decode step of both roles at given branches and context")
    decode.add_argument("--bundle", required=True, metavar="DIR")
    decode.add_argument("--branches", type=int, nargs="+", default=[1, 4], metavar="B")
    decode.add_argument("--contexts", type=int, nargs="+", default=[64], metavar="T")
    decode.add_argument("--steps", type=int, default=32, help="decode steps per run (default 32)")
    decode.add_argument("--prefill-tokens", type=int, default=512, help="shared prompt length (default 512)")
    decode.add_argument("--n-specs", type=int, nargs="+", default=[1, 4], help="branches forked from the prompt")
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    decode.add_argument("--roles", nargs="+", default=["speculator", "verifier"],
                        choices=["speculator", "verifier"], help="which models to time (default both)")
    decode.add_argument("--peer", nargs=2, metavar=("NAME", "PATH"), action="append", default=None,
                        help="also time a peer in the same run (repeatable): onnxruntime-genai MODEL_DIR (built by "
                             "runtime/peers/build_genai_model.sh) or transformers MODEL (.gguf or HF folder); "
                             "run from the repository root")
    decode.add_argument("--peer-python", default=None,
                        help="python of the onnxruntime-genai venv (default: $SPECREASON_PEER_PYTHON)")
    decode.add_argument("--json", action="store_true")
    decode.set_defaults(func=_bench_decode)
