"""Peer benchmark: transformers `generate` (PyTorch, CPU) on the model our runtime exports.

Runs in a venv with torch and transformers (the project's `export` extra). Prints one JSON object shaped like
genai_bench.py's, so `specreason bench decode --peer transformers MODEL` can compare in the same run.

Decode, for each (B branches, T context): `generate` with greedy search on B copies of a fixed T-token
context, `steps + 1` new tokens; a streamer timestamps every token, and ms_per_step is the mean gap between
consecutive new tokens after the first (the first one is the prefill's). Median over repeats.
Prefill, for n_specs in {1, 4}: time to the first new token with n_specs copies of a fixed prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """Records the wall time at which generate hands over each batch of new tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load(path: str) -> AutoModelForCausalLM:
    p = Path(path)
    if p.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()


def generate(model: AutoModelForCausalLM, ids: torch.Tensor, new_tokens: int, clock: TokenClock | None) -> None:
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)


def decode_ms(model: AutoModelForCausalLM, tokens: np.ndarray, batch: int, context: int, steps: int) -> float:
    ids = torch.tensor(np.tile(tokens[:context], (batch, 1)))  # [batch, context]
    clock = TokenClock()
    generate(model, ids, steps + 1, clock)
    gaps = np.diff(clock.times)  # [steps]: one decode step each
    return float(gaps.mean() * 1e3)


def prefill_ms(model: AutoModelForCausalLM, tokens: np.ndarray, batch: int) -> float:
    ids = torch.tensor(np.tile(tokens, (batch, 1)))
    start = time.perf_counter()
    generate(model, ids, 1, None)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file or a Hugging Face model folder")
    ap.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    ap.add_argument("--prefill-specs", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model = load(args.model)
    vocab = model.config.vocab_size
    tokens = np.random.default_rng(1234).integers(100, vocab, size=max(args.contexts + [args.prefill_tokens]))
    decode = []
    for b in args.branches:
        for t in args.contexts:
            decode_ms(model, tokens, b, t, 2)  # warm-up
            ms = statistics.median(decode_ms(model, tokens, b, t, args.steps) for _ in range(args.repeats))
            decode.append({"branches": b, "context": t, "ms_per_step": round(ms, 3),
                           "tokens_per_s": round(b * 1e3 / ms, 1)})
            print(f"transformers B={b} T={t}: {ms:.2f} ms/step", file=sys.stderr)
    prefill = []
    for n in args.prefill_specs:
        prefill_ms(model, tokens[:args.prefill_tokens], n)  # warm-up
        ms = statistics.median(prefill_ms(model, tokens[:args.prefill_tokens], n) for _ in range(args.repeats))
        prefill.append({"n_specs": n, "prompt_tokens": args.prefill_tokens, "ms": round(ms, 2)})
    result = {"peer": "transformers", "version": transformers.__version__, "torch": torch.__version__,
              "model": args.model, "precision": "fp32", "threads": torch.get_num_threads(), "steps": args.steps,
              "repeats": args.repeats, "decode": decode, "prefill": prefill}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
