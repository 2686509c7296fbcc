"""`specreason`: the runtime's command line (numpy + ONNX Runtime only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .bench import add_commands as add_bench_commands
from .cli_reason import add_commands as add_reason_commands
from .cli_serve import add_commands as add_serve_commands
from .errors import SpecReasonError
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
    use_chat = not args.raw and model.generation.chat_template is not None
    prompt = tok.encode_chat([{"role": "user", "content": prompt_text}]) if use_chat else tok.encode(prompt_text)

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
    add_bench_commands(sub)  # bench logits / decode / prefill / generate / quality (bench.py)
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
