"""Peer worker: transformers (PyTorch, CPU) behind the benchmark worker protocol (specreason_rt/bench_worker.py).

Runs in a venv with torch and transformers (the peer venv of setup_genai.sh: transformers 5; the project's
`export` extra, transformers 4.57, works too). `specreason bench ... --peer transformers MODEL` starts it as

    python runtime/peers/transformers_bench.py --worker --model MODEL --threads N

MODEL is a .gguf file (dequantized to fp32 on load, as our exporter does) or a Hugging Face folder.
Threads: torch.set_num_threads(N), read back with torch.get_num_threads().

Decode is the loop `generate` runs, without its logits processors: a forward over the new tokens with the
DynamicCache, argmax. The prefill asks for the last position's logits only (logits_to_keep=1), like ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM


def timed(work: Any) -> tuple[dict[str, float], Any]:
    t0, c0, p0 = time.monotonic(), time.process_time(), time.perf_counter()
    out = work()
    wall, cpu = time.perf_counter() - p0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "t0": t0, "t1": time.monotonic()}, out


def load(path: str) -> Any:
    p = Path(path)
    if p.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()


class TransformersWorker:
    def __init__(self, model_path: str, threads: int) -> None:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        self.model = load(model_path)
        self.hello = {"ready": True, "system": "transformers", "version": transformers.__version__,
                      "torch": torch.__version__, "precision": "fp32", "threads": torch.get_num_threads(),
                      "vocab_size": int(self.model.config.vocab_size), "threads_how": "torch.set_num_threads"}
        self.past: Any = None
        self.token: torch.Tensor | None = None  # [branches, 1]

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, past: Any, keep: int = 1) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=keep)
        return out.logits, out.past_key_values

    def _step(self) -> None:
        logits, self.past = self._forward(self.token, self.past)
        self.token = logits[:, -1].argmax(-1, keepdim=True)

    def decode_start(self, ids: list[int], branches: int, warmup: int, max_new: int) -> dict[str, Any]:
        self.past = None
        logits, self.past = self._forward(torch.tensor([ids] * branches), None)
        self.token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(warmup):
            self._step()
        return {"ok": True}

    def decode_window(self, steps: int) -> dict[str, Any]:
        stats, _ = timed(lambda: [self._step() for _ in range(steps)])
        return {"ok": True, **stats}

    def prefill(self, ids: list[int], n_specs: int) -> dict[str, Any]:
        self.past = None
        rows = torch.tensor([ids] * n_specs)  # no way to share one prompt's cache across rows in one call
        stats, _ = timed(lambda: self._forward(rows, None))
        return {"ok": True, **stats}

    def generate(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        self.past = None

        def work() -> list[int]:
            logits, past = self._forward(torch.tensor([ids]), None)
            out = [int(logits[0, -1].argmax())]
            while len(out) < new_tokens:
                logits, past = self._forward(torch.tensor([[out[-1]]]), past)
                out.append(int(logits[0, -1].argmax()))
            return out

        stats, tokens = timed(work)
        return {"ok": True, **stats, "tokens": tokens}

    def score(self, ids: list[int]) -> dict[str, Any]:
        logits, _ = self._forward(torch.tensor([ids]), None, keep=0)  # keep=0: every position
        logp = torch.log_softmax(logits[0, :-1].double(), -1)  # [T-1, vocab]
        target = torch.tensor(ids[1:])
        return {"ok": True, "argmax": logits[0, :-1].argmax(-1).tolist(),
                "logprob": logp[torch.arange(len(target)), target].tolist()}


def serve(worker: TransformersWorker) -> None:
    """One request line in, one answer line out (the protocol of specreason_rt/bench_worker.py)."""
    handlers = {"decode_start": worker.decode_start, "decode_window": worker.decode_window,
                "prefill": worker.prefill, "generate": worker.generate, "score": worker.score}
    print(json.dumps(worker.hello), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            answer = handlers[op](**request)
        except Exception as e:  # reported to the harness, which names this peer
            answer = {"error": f"{op}: {type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", required=True, help="speak the worker protocol on stdin/stdout")
    ap.add_argument("--model", required=True, help="a .gguf file or a Hugging Face model folder")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads (the same for every system)")
    args = ap.parse_args(argv)
    serve(TransformersWorker(args.model, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
