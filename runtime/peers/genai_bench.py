"""Peer worker: onnxruntime-genai behind the benchmark worker protocol (specreason_rt/bench_worker.py).

Runs INSIDE the peer venv (setup_genai.sh); imports only onnxruntime_genai, numpy and the standard library.
`specreason bench decode|prefill|generate|quality --peer onnxruntime-genai MODEL_DIR` starts it as

    python runtime/peers/genai_bench.py --worker --model /work/peer-models/smollm2-fp32 --threads N

and drives it over stdin/stdout, window by window, interleaved with the other systems.

Threads: N goes into the decoder's session_options.intra_op_num_threads through Config.overlay (the
genai_config.json key). Without it onnxruntime-genai 0.18 ran on one core (0.99 cores of CPU time per wall
second) while ONNX Runtime elsewhere used all of them: never compare without it.

Decode: a Generator (batch B, greedy, max_length covering prefill + warm-up + every window) gets the T prompt
tokens in every row (append_tokens, untimed), then `warmup` untimed generate_next_token calls (the first one
after append_tokens only picks a token from the prefill's logits and the next ones are the first real steps,
which must not be timed either), then each window times `steps` generate_next_token calls.
Prefill: append_tokens of one prompt in n_specs rows (genai cannot share one prompt's KV across rows).
Generate: append_tokens, then generate_next_token until exactly N new tokens (min_length keeps eos away).
Score: the tokens fed one at a time, get_logits after each (teacher forcing), for the quality check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import onnxruntime_genai as og


def timed(work: Any) -> tuple[dict[str, float], Any]:
    t0, c0, p0 = time.monotonic(), time.process_time(), time.perf_counter()
    out = work()
    wall, cpu = time.perf_counter() - p0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "t0": t0, "t1": time.monotonic()}, out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


class GenaiWorker:
    def __init__(self, model_dir: str, threads: int) -> None:
        with open(os.path.join(model_dir, "genai_config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(model_dir, cfg["model"]["decoder"]["filename"]), "rb") as f:
            precision = "int4" if b"MatMulNBits" in f.read() else "fp32"  # the builder's int4 op
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.hello = {"ready": True, "system": "onnxruntime-genai", "version": og.__version__,
                      "precision": precision, "threads": threads, "vocab_size": int(cfg["model"]["vocab_size"]),
                      "threads_how": "Config.overlay model.decoder.session_options.intra_op_num_threads"}
        self.gen: og.Generator | None = None

    def _generator(self, batch: int, max_length: int, min_length: int = 0) -> og.Generator:
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, batch_size=batch, do_sample=False)
        return og.Generator(self.model, params)

    def decode_start(self, ids: list[int], branches: int, warmup: int, max_new: int) -> dict[str, Any]:
        self.gen = None  # free the previous cell's KV buffers first
        self.gen = self._generator(branches, len(ids) + warmup + max_new + 2)
        self.gen.append_tokens(np.tile(np.asarray(ids, np.int32), (branches, 1)))
        for _ in range(warmup):
            self.gen.generate_next_token()
        return {"ok": True}

    def decode_window(self, steps: int) -> dict[str, Any]:
        gen = self.gen
        assert gen is not None

        def work() -> None:
            for _ in range(steps):
                gen.generate_next_token()

        stats, _ = timed(work)
        return {"ok": True, **stats}

    def prefill(self, ids: list[int], n_specs: int) -> dict[str, Any]:
        self.gen = None
        gen = self._generator(n_specs, len(ids) + 1)
        rows = np.tile(np.asarray(ids, np.int32), (n_specs, 1))
        stats, _ = timed(lambda: gen.append_tokens(rows))
        return {"ok": True, **stats}

    def generate(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        self.gen = None
        total = len(ids) + new_tokens

        def work() -> list[int]:
            gen = self._generator(1, total, min_length=total)
            gen.append_tokens(np.asarray([ids], np.int32))
            while len(gen.get_sequence(0)) < total and not gen.is_done():
                gen.generate_next_token()
            return [int(t) for t in gen.get_sequence(0)[len(ids):]]

        stats, tokens = timed(work)
        return {"ok": True, **stats, "tokens": tokens}

    def score(self, ids: list[int]) -> dict[str, Any]:
        self.gen = None
        gen = self._generator(1, len(ids) + 1)
        argmax, logprob = [], []
        for i, token in enumerate(ids[:-1]):
            gen.append_tokens(np.asarray([[token]], np.int32))
            logits = np.asarray(gen.get_logits()).reshape(-1)  # [vocab]: the last appended position
            argmax.append(int(logits.argmax()))
            logprob.append(float(log_softmax(logits)[ids[i + 1]]))
        return {"ok": True, "argmax": argmax, "logprob": logprob}


def serve(worker: GenaiWorker) -> None:
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
    ap.add_argument("--model", required=True, help="genai model folder (genai_config.json + model.onnx)")
    ap.add_argument("--threads", type=int, required=True, help="intra-op threads (the same for every system)")
    args = ap.parse_args(argv)
    serve(GenaiWorker(args.model, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
