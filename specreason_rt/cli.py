"""`specreason`: the runtime's command line (numpy + ONNX Runtime only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_reason import add_commands as add_reason_commands
from .cli_serve import add_commands as add_serve_commands
from .errors import ConfigError, SpecReasonError
from .manifest import load_manifest

if TYPE_CHECKING:
    from .providers import ProviderConfig


THREADS_HELP = "ONNX Runtime intra-op threads (0: auto = 1 below 10M parameters, else all cores)"


def add_provider_arguments(p: argparse.ArgumentParser) -> None:
    """--provider and its options (specreason_rt/providers.py), for every command that runs a bundle."""
    from .providers import PROVIDER_NAMES

    p.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES,
                   help="where the models run: cpu (default), cuda / tensorrt (ONNX Runtime execution providers, "
                        "need onnxruntime-gpu), trt (the bundle's TensorRT engines, KV cache on the GPU; needs "
                        "pip install 'specreason-rt[trt]' and engines from specreason-export --trt)")
    p.add_argument("--device-id", type=int, default=0, metavar="N", help="GPU index for cuda/tensorrt/trt")
    p.add_argument("--fp16", action="store_true", help="tensorrt provider: let TensorRT use fp16 kernels")
    p.add_argument("--trt-cache", type=Path, default=None, metavar="DIR",
                   help="tensorrt provider: engine and timing cache directory (default ~/.cache/specreason/trt-ep)")


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    from .providers import ProviderConfig

    return ProviderConfig(name=args.provider, device_id=args.device_id, fp16=args.fp16, cache_dir=args.trt_cache)


def _file_sizes(bundle: str, files: dict[str, str]) -> dict[str, int]:
    from pathlib import Path

    return {rel: (Path(bundle) / rel).stat().st_size for rel in files}


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
        context = min(args.context, a.max_context)
        kv = args.branches * context * a.kv_bytes_per_token()
        weights = sum(size for rel, size in _file_sizes(args.bundle, manifest.files).items()
                      if rel.startswith(f"{role}/model.onnx"))
        print(f"  {'':<10} memory: weights {weights / 2**20:.1f} MiB on disk; KV cache for {args.branches} "
              f"branches x {context} tokens: {kv / 2**20:.1f} MiB (fp32)")
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
    import os

    from .bench import PEER_SCRIPTS, bench_decode, compare_with_peer, run_peer

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


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from .bundle import Bundle
    from .decode import generate
    from .sampling import SamplingParams
    from .tokenizer import StreamDecoder

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt_text.strip():
        raise SpecReasonError("the prompt is empty: pass the text to continue (or - to read it from stdin)")
    if args.branches < 1:
        raise SpecReasonError(f"--branches must be >= 1, got {args.branches}")
    # One greedy branch is deterministic; several identical greedy branches would be pointless.
    temperature = args.temperature if args.temperature is not None else (0.0 if args.branches == 1 else 0.7)
    params = SamplingParams(temperature=temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty)
    bundle = Bundle(args.bundle, roles=[args.model], providers=provider_config(args),
                    intra_op_threads=args.threads, kv_limit_bytes=int(args.kv_limit_mib * 2**20))
    model, tok = bundle.models[args.model], bundle.tokenizers[args.model]
    prompt = tok.encode(prompt_text) if args.raw else tok.encode_prompt(prompt_text)

    stream = args.branches == 1 and not args.json
    streamer = StreamDecoder(tokenizer=tok)

    def on_token(branch: int, token: int) -> None:
        if stream:
            sys.stdout.write(streamer.push(token))
            sys.stdout.flush()

    outs = generate(model=model, tokenizer=tok, prompts=[prompt], params=params,
                    rng=np.random.default_rng(args.seed), max_tokens=args.max_tokens,
                    branches_per_prompt=args.branches, on_token=on_token)
    if args.json:
        print(json.dumps({"model": args.model, "prompt_tokens": len(prompt), "seed": args.seed,
                          "branches": [{"text": o.text, "tokens": o.tokens, "finish": o.finish,
                                        "logprobs": [round(lp, 5) for lp in o.logprobs]} for o in outs]}, indent=2))
    elif stream:
        sys.stdout.write(streamer.flush() + "\n")
        print(f"[{outs[0].finish}: {len(outs[0].tokens)} tokens]", file=sys.stderr)
    else:
        for i, o in enumerate(outs):
            print(f"--- branch {i} ({o.finish}, {len(o.tokens)} tokens) ---\n{o.text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specreason", description="Run and inspect specreason bundles.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="check a bundle (files, hashes, schema) and summarise its manifest")
    info.add_argument("--bundle", required=True, metavar="DIR")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.add_argument("--context", type=int, default=2048, help="tokens per branch for the memory estimate")
    info.add_argument("--branches", type=int, default=4, help="branches for the memory estimate")
    info.set_defaults(func=_info)
    gen = sub.add_parser("generate", help="plain decoding with one model of a bundle, streamed to stdout",
                         description="Continue PROMPT with the speculator or the verifier of a bundle. The prompt "
                         "is wrapped in the model's chat template unless --raw is given.")
    gen.add_argument("prompt", metavar="PROMPT", help="text to continue, or - to read it from stdin")
    gen.add_argument("--bundle", required=True, metavar="DIR")
    gen.add_argument("--model", default="verifier", choices=["speculator", "verifier"],
                     help="which model of the bundle generates (default: verifier)")
    gen.add_argument("--branches", type=int, default=1, metavar="N",
                     help="sample N branches from the one prompt (prefilled once, then forked); default 1")
    gen.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens per branch (default 128)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampler's RNG; a seed reproduces a run")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 = greedy (default for one branch); default 0.7 for several branches")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    gen.add_argument("--kv-limit-mib", type=float, default=4096, metavar="MIB",
                     help="refuse requests whose KV cache would exceed this many MiB (default 4096)")
    add_provider_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print tokens, text and log-probs as JSON")
    gen.set_defaults(func=_generate)
    add_reason_commands(sub)  # run, eval
    add_serve_commands(sub)  # serve
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SpecReasonError as e:
        print(f"specreason: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nspecreason: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
