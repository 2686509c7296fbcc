"""`specreason info` and `specreason generate`: look at a bundle, decode with one of its models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SpecReasonError
from ..kv_cache import SHARED_PREFIX_MIN_TOKENS
from ..manifest import load_manifest
from .common import THREADS_HELP, add_bundle_argument, add_provider_arguments, provider_config, text_argument

if TYPE_CHECKING:
    from ..manifest import Manifest


ATTENTION = {
    "gqa": "gqa (ONNX Runtime's GroupQueryAttention, KV cache updated in place)",
    "plain": "plain (standard ONNX ops)",
    "prefix": "prefix (standard ONNX ops; branches forked from one prompt share its KV cache)",
}


def _file_sizes(bundle: str, files: dict[str, str]) -> dict[str, int]:
    return {rel: (Path(bundle) / rel).stat().st_size for rel in files}


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def describe_windows(windows: list[int | None]) -> str:
    """Per-layer sliding windows (None = full attention), grouped: 'window 4096 on layers 0-4, 6; full on 5, 7'."""
    groups: dict[int | None, list[int]] = {}
    for layer, w in enumerate(windows):
        groups.setdefault(w, []).append(layer)
    if list(groups) == [None]:
        return "full attention on every layer"
    parts = [f"window {w} on layers {layer_ranges(ls)}" for w, ls in groups.items() if w is not None]
    if None in groups:
        parts.append(f"full attention on layers {layer_ranges(groups[None])}")
    return "; ".join(parts)


def backends(manifest: Manifest) -> dict[str, tuple[bool, str]]:
    """Which --provider values can run this bundle ({name: (can run, why / what it needs)}), and whether this
    machine has what each one needs. The rules are those of backends/providers.py and backends/trt/engine.py."""
    import importlib.util

    import onnxruntime as ort

    available = ort.get_available_providers()
    gqa = [role for role, e in manifest.models.items() if e.kv_cache.get("attention", "plain") != "plain"]

    def here(ep: str) -> str:
        return "available here" if ep in available else "needs onnxruntime-gpu (not in this onnxruntime build)"

    out = {"cpu": (True, "available here"), "cuda": (True, here("CUDAExecutionProvider"))}
    if not gqa:
        out["tensorrt"] = (True, here("TensorrtExecutionProvider"))
    else:
        kinds = sorted({manifest.models[r].kv_cache["attention"] for r in gqa})
        why = ("gqa attention is an ONNX Runtime contrib op TensorRT cannot parse" if kinds == ["gqa"] else
               f"{' and '.join(kinds)} attention: the tensorrt provider takes plain-attention bundles")
        out["tensorrt"] = (False, f"{' and '.join(gqa)}: {why} (re-export with --attention plain)")
    missing = [role for role in manifest.models if role not in manifest.engines]
    if missing:
        out["trt"] = (False, f"no TensorRT engine for {' and '.join(missing)} (specreason-export --trt, or "
                             "--engines-only on the GPU machine)")
    else:
        f = next(iter(manifest.engines.values()))
        found = "installed here" if importlib.util.find_spec("tensorrt") else "not installed here"
        out["trt"] = (True, f"engines for TensorRT {f.tensorrt_version}, compute capability "
                            f"{f.compute_capability} ({f.device}); tensorrt {found}")
    return out


def _info(args: argparse.Namespace) -> int:
    for flag, value, least in (("--branches", args.branches, 1), ("--context", args.context, 1),
                               ("--prompt-tokens", args.prompt_tokens, 0)):
        if value is not None and value < least:
            raise SpecReasonError(f"{flag} must be >= {least}, got {value}")
    manifest = load_manifest(args.bundle, integrity="full" if args.verify else "sizes")
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    print(f"bundle {args.bundle}: {manifest.precision}, tokenizers shared: {manifest.tokenizers_shared}")
    for role, e in manifest.models.items():
        a, v = e.architecture, e.validation
        print(f"  {role:<10} {e.source['id']} ({a.family}, {a.layers} layers, {a.parameters / 1e6:.2f}M params, "
              f"vocab {a.vocab_size}, context {a.max_context}); validation: max |logit diff| "
              f"{v['max_abs_logit_diff']:.2e}, greedy agreement {v['greedy_agreement']:.0%}")
        print(f"  {'':<10} attention: {ATTENTION.get(e.kv_cache.get('attention', 'plain'), '?')}")
        # Both are optional in the manifest (older bundles, families without them): getattr, not a field access.
        windows = getattr(a, "attention_windows", None)
        if windows:
            print(f"  {'':<10} sliding windows: {describe_windows(list(windows))}")
        features = getattr(a, "features", None)
        if features:
            print(f"  {'':<10} features: {', '.join(features)}")
        context = min(args.context, a.max_context)
        prompt = context if args.prompt_tokens is None else min(args.prompt_tokens, context)
        kv = e.kv_cache_bytes(branches=args.branches, tokens=context)
        forked = e.kv_cache_bytes(branches=args.branches, tokens=context, prompt_tokens=prompt)
        weights = sum(size for rel, size in _file_sizes(args.bundle, manifest.files).items()
                      if rel.startswith(e.file))  # the graph and its external data; roles may share it
        print(f"  {'':<10} memory: weights {weights / 2**20:.1f} MiB on disk; KV cache for {args.branches} "
              f"branches x {context} tokens: {kv / 2**20:.1f} MiB (fp32)")
        if args.branches > 1 and prompt > 0:
            if forked < kv:
                how = f"{forked / 2**20:.1f} MiB, the prompt held once"
            elif e.shares_prefix:
                how = f"{forked / 2**20:.1f} MiB, copied per branch (prompts under {SHARED_PREFIX_MIN_TOKENS} tokens)"
            else:
                shared = dataclasses.replace(e, kv_cache={**e.kv_cache, "attention": "prefix"}).kv_cache_bytes(
                    branches=args.branches, tokens=context, prompt_tokens=prompt)
                how = (f"{forked / 2**20:.1f} MiB, every branch copies the prompt (a bundle exported with "
                       f"--attention prefix holds it once: {shared / 2**20:.1f} MiB)")
            print(f"  {'':<10} {'':<7} forked from one {prompt}-token prompt: {how}")
    print("  backends (--provider):")
    for name, (ok, why) in backends(manifest).items():
        print(f"    {name:<9} {'yes' if ok else 'no '}  {why}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..bundle import Bundle
    from ..decode import generate
    from ..sampling import SamplingParams
    from ..tokenizer import StreamDecoder

    prompt_text = text_argument(args.prompt, what="prompt")
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="check a bundle (files, hashes, schema) and summarise its manifest",
                          description="Check a bundle (files, hashes, schema) and summarise it: each model's "
                          "architecture, attention variant, sliding windows and features, validation, memory, and "
                          "which --provider backends can run it.")
    add_bundle_argument(info)
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.add_argument("--verify", action="store_true",
                      help="re-hash every file against the manifest (loading checks paths and sizes only)")
    info.add_argument("--context", type=int, default=2048, help="tokens per branch for the memory estimate")
    info.add_argument("--branches", type=int, default=4, help="branches for the memory estimate")
    info.add_argument("--prompt-tokens", type=int, default=None, metavar="P",
                      help="of the --context tokens per branch, the prompt the branches were forked from (default: "
                           "all of them, just after the fork); prefix bundles hold it once")
    info.set_defaults(func=_info)
    gen = sub.add_parser("generate", help="plain decoding with one model of a bundle, streamed to stdout",
                         description="Continue PROMPT with the speculator or the verifier of a bundle. The prompt "
                         "is wrapped in the model's chat template unless --raw is given.")
    gen.add_argument("prompt", metavar="PROMPT", help="text to continue, or - to read it from stdin")
    add_bundle_argument(gen)
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
