"""Peer benchmark: onnxruntime-genai decode/prefill timings on a model folder built by build_genai_model.sh.

Runs INSIDE the peer venv (setup_genai.sh); imports only onnxruntime_genai, numpy and the standard library.

    python genai_bench.py --model /work/peer-models/smollm2-fp32 --branches 1 2 4 8 \
        --contexts 64 512 2048 --steps 32 --repeats 5 --threads 0 --json

Decode, for each (B branches, T context): a fresh Generator (batch_size=B, max_length=T+steps+1, greedy) gets
the same fixed T-token sequence in every row (append_tokens, untimed), then one untimed generate_next_token
(right after append_tokens the logits are already computed, so that call only picks the token and runs no
model), then `steps` timed generate_next_token calls, each one forward pass over B new tokens against a
context of T..T+steps tokens. ms_per_step = median over repeats of (total time / steps); tokens_per_s =
B * 1000 / ms_per_step.

Prefill, for n_specs in {1, 4}: append_tokens of one fixed prompt (--prefill-tokens, 512 by default) with
batch_size n_specs, every row the same prompt (genai has no way to share one prompt's KV across rows, so it
computes it n_specs times); ms = median over repeats.

Threads: --threads N sets the decoder's session_options.intra_op_num_threads through Config.overlay (the same
key as genai_config.json); 0 leaves ONNX Runtime's default (one thread per physical core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og


def fixed_tokens(n: int, vocab: int) -> np.ndarray:
    """A fixed, deterministic token sequence (no tokenizer needed), avoiding the first 100 (special) ids."""
    rng = np.random.default_rng(1234)
    return rng.integers(100, vocab, size=n, dtype=np.int64).astype(np.int32)


def load_model(model_dir: str, threads: int) -> og.Model:
    cfg = og.Config(model_dir)
    if threads > 0:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(cfg)


def new_generator(model: og.Model, batch: int, max_length: int) -> og.Generator:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, batch_size=batch, do_sample=False)
    return og.Generator(model, params)


def decode_ms(model: og.Model, tokens: np.ndarray, batch: int, context: int, steps: int) -> float:
    """Mean ms per decode step over `steps` steps after a `context`-token prefill (one repeat)."""
    gen = new_generator(model, batch, context + steps + 1)
    gen.append_tokens(np.tile(tokens[:context], (batch, 1)))
    gen.generate_next_token()  # only samples from the prefill's logits: no forward pass, not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.generate_next_token()
    dt = time.perf_counter() - t0
    del gen
    return dt * 1e3 / steps


def prefill_ms(model: og.Model, tokens: np.ndarray, n_specs: int, prompt_tokens: int) -> float:
    gen = new_generator(model, n_specs, prompt_tokens + 1)
    ids = np.tile(tokens[:prompt_tokens], (n_specs, 1))
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    dt = time.perf_counter() - t0
    del gen
    return dt * 1e3


def model_info(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "genai_config.json")) as f:
        cfg = json.load(f)
    info = {"vocab_size": int(cfg["model"]["vocab_size"]), "type": cfg["model"].get("type")}
    # Precision: the builder writes MatMulNBits (int4) or plain MatMul; sniff the graph file for the op name.
    onnx_path = os.path.join(model_dir, cfg["model"]["decoder"]["filename"])
    with open(onnx_path, "rb") as f:
        graph = f.read()
    info["precision"] = "int4" if b"MatMulNBits" in graph else "fp32"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="genai model folder (genai_config.json + model.onnx)")
    ap.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = ONNX Runtime default")
    ap.add_argument(
        "--prefill-specs",
        type=int,
        nargs="*",
        default=[1, 4],
        help="batch sizes for the shared-prompt prefill test; give none to skip it",
    )
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per (B, T) / per prefill shape")
    ap.add_argument("--json", action="store_true", help="print only the JSON object (progress goes to stderr)")
    args = ap.parse_args(argv)

    info = model_info(args.model)
    model = load_model(args.model, args.threads)
    tokens = fixed_tokens(max(args.contexts + [args.prefill_tokens]), info["vocab_size"])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    decode = []
    for context in args.contexts:
        for batch in args.branches:
            for _ in range(args.warmup):
                decode_ms(model, tokens, batch, context, min(args.steps, 4))
            runs = [decode_ms(model, tokens, batch, context, args.steps) for _ in range(args.repeats)]
            ms = statistics.median(runs)
            decode.append(
                {
                    "branches": batch,
                    "context": context,
                    "ms_per_step": round(ms, 3),
                    "tokens_per_s": round(batch * 1000.0 / ms, 2),
                    "runs_ms": [round(r, 3) for r in runs],
                }
            )
            log(
                f"decode B={batch} T={context}: {ms:.2f} ms/step ({batch * 1000.0 / ms:.1f} tok/s) "
                f"runs={[round(r, 1) for r in runs]}"
            )

    prefill = []
    for n_specs in args.prefill_specs:
        for _ in range(args.warmup):
            prefill_ms(model, tokens, n_specs, args.prefill_tokens)
        runs = [prefill_ms(model, tokens, n_specs, args.prefill_tokens) for _ in range(args.repeats)]
        ms = statistics.median(runs)
        prefill.append(
            {
                "n_specs": n_specs,
                "prompt_tokens": args.prefill_tokens,
                "ms": round(ms, 3),
                "runs_ms": [round(r, 3) for r in runs],
            }
        )
        log(f"prefill n_specs={n_specs} prompt={args.prefill_tokens}: {ms:.1f} ms runs={[round(r, 1) for r in runs]}")

    out = {
        "peer": "onnxruntime-genai",
        "version": og.__version__,
        "model": os.path.abspath(args.model),
        "precision": info["precision"],
        "threads": args.threads,
        "threads_note": "intra_op_num_threads via Config.overlay; 0 = ONNX Runtime default",
        "cpu_count": os.cpu_count(),
        "steps": args.steps,
        "repeats": args.repeats,
        "decode": decode,
        "prefill": prefill,
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
