"""Our side of the fair benchmark: one bundle model behind the benchmark worker protocol.

`specreason bench` (bench_harness.py) starts one worker process per system, ours included, and drives them
all window by window over their stdin/stdout, so every system runs in its own process with all models loaded
and its CPU time can be read per process. The protocol, one JSON object per line (the peers speak it too:
runtime/peers/genai_bench.py and transformers_bench.py, run with --worker):

    worker -> {"ready": true, "system", "version", "precision", "threads", "vocab_size"}   once, after loading
    {"op": "decode_start", "ids": [T], "branches": B, "warmup": W, "max_new": N}
              prefill ids in B rows, then W greedy decode steps, all untimed   -> {"ok": true}
              (ours with --fork: ids prefilled once and the cache forked into B branches, as best-of-n does;
              the answer adds "kv_bytes", the keys/values the cache holds, and "shared_prefix_tokens")
    {"op": "decode_window", "steps": S}
              S timed greedy decode steps (B new tokens each)  -> {"ok", "wall_s", "cpu_s", "t0", "t1"}
    {"op": "prefill", "ids": [T], "n_specs": N}
              timed: one prompt for N branches (ours prefills once and forks the cache; the peers
              compute it in every row)                                           -> {"ok", "wall_s", "cpu_s", ...}
    {"op": "generate", "ids": [T], "new_tokens": N}
              timed end to end: prefill, then exactly N greedy tokens (eos does not stop it, so every
              system does the same work)                                         -> {..., "tokens": [N]}
    {"op": "score", "ids": [T]}
              teacher-forced pass: at each position i < T-1 the argmax and log p(ids[i+1]) (quality)
                                                                                 -> {"ok", "argmax", "logprob"}
    {"op": "quit"}

wall_s is time.perf_counter around the timed work; cpu_s is time.process_time over the same span: the CPU
time of every thread of the worker process, so cpu_s / wall_s is the number of cores the system really used.
t0 / t1 are time.monotonic (one clock for every process of the machine): the harness checks that windows
never overlapped. A failure answers {"error": "..."} and the worker goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from .backends.ort import OrtEngine
from .kv_cache import KVCache
from .manifest import load_manifest
from .model import RoleModel


def timed(work: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Run work(); its wall time, the process's CPU time over it, and monotonic start/end stamps."""
    t0, c0, p0 = time.monotonic(), time.process_time(), time.perf_counter()
    out = work()
    wall, cpu = time.perf_counter() - p0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "t0": t0, "t1": time.monotonic()}, out


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """logits: [n, vocab] -> log-probabilities [n, vocab] (float64, for a stable perplexity)."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class OursWorker:
    """One role of a bundle, run the way the runtime runs it (RoleModel.forward: the engine, the KV cache)."""

    def __init__(self, *, bundle: str | Path, role: str, threads: int, fork: bool = False,
                 min_shared_prefix: int | None = None) -> None:
        manifest = load_manifest(bundle)
        self.entry = manifest.models[role]
        # threads > 0 always here: the harness gives every system the same explicit count.
        self.model = RoleModel(bundle_dir=bundle, entry=self.entry, intra_op_threads=threads)
        self.fork = fork
        if min_shared_prefix is not None:
            self.model.shared_prefix_min_tokens = min_shared_prefix
        engine = self.model.engine
        assert isinstance(engine, OrtEngine)  # RoleModel without TensorRT engine facts builds an OrtEngine
        applied = engine.session.get_session_options().intra_op_num_threads
        self.hello = {"ready": True, "system": "specreason-rt", "version": version("specreason-rt"),
                      "precision": self.entry.precision, "threads": applied,
                      "vocab_size": self.entry.architecture.vocab_size}
        self.cache: KVCache | None = None
        self.token: np.ndarray | None = None  # [branches, 1]: the next token of each row

    def _step(self) -> None:
        assert self.cache is not None and self.token is not None
        logits = self.model.forward(cache=self.cache, tokens=self.token.tolist())  # [branches, vocab]
        self.token = logits.argmax(-1)[:, None]

    def decode_start(self, *, ids: list[int], branches: int, warmup: int, max_new: int) -> dict[str, Any]:
        rows = 1 if self.fork else branches
        self.cache = self.model.new_cache(branches=rows, capacity=len(ids) + warmup + max_new + 1)
        logits = self.model.forward(cache=self.cache, tokens=[ids] * rows)  # [rows, vocab]
        if self.fork:
            self.cache.fork(branches)
            logits = np.repeat(logits, branches, axis=0)  # [branches, vocab]
        self.token = logits.argmax(-1)[:, None]
        for _ in range(warmup):
            self._step()
        return {"ok": True, "kv_bytes": self.cache.resident_bytes, "shared_prefix_tokens": self.cache.prefix_len}

    def decode_window(self, *, steps: int) -> dict[str, Any]:
        def work() -> None:
            for _ in range(steps):
                self._step()

        stats, _ = timed(work)
        return {"ok": True, **stats}

    def prefill(self, *, ids: list[int], n_specs: int) -> dict[str, Any]:
        cache = self.model.new_cache(branches=1, capacity=len(ids) + 1)

        def work() -> None:
            self.model.forward(cache=cache, tokens=[ids])
            if n_specs > 1:
                cache.fork(n_specs)  # what best-of-n and tree search do: the prompt's KV shared, not recomputed

        stats, _ = timed(work)
        return {"ok": True, **stats}

    def generate(self, *, ids: list[int], new_tokens: int) -> dict[str, Any]:
        def work() -> list[int]:
            cache = self.model.new_cache(branches=1, capacity=len(ids) + new_tokens)
            logits = self.model.forward(cache=cache, tokens=[ids])  # [1, vocab]
            out = [int(logits[0].argmax())]
            while len(out) < new_tokens:
                out.append(int(self.model.forward(cache=cache, tokens=[[out[-1]]])[0].argmax()))
            return out

        stats, tokens = timed(work)
        return {"ok": True, **stats, "tokens": tokens}

    def score(self, *, ids: list[int]) -> dict[str, Any]:
        cache = self.model.new_cache(branches=1, capacity=len(ids))
        logits = self.model.forward(cache=cache, tokens=[ids], all_logits=True)[0, :-1]  # [T-1, vocab]
        logp = log_softmax_rows(logits)
        target = np.asarray(ids[1:])
        return {"ok": True, "argmax": logits.argmax(-1).tolist(),
                "logprob": logp[np.arange(len(target)), target].tolist()}


def serve(handlers: dict[str, Callable[..., dict[str, Any]]], hello: dict[str, Any]) -> None:
    """The worker loop: one request line in, one answer line out, until quit or end of input."""
    out = sys.stdout
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            answer = handlers[op](**request)
        except Exception as e:  # one failing request is reported to the harness, which names the system
            answer = {"error": f"{op}: {type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="benchmark worker for one bundle model (started by specreason bench)")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--role", default="speculator", choices=["speculator", "verifier"])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--fork", action="store_true", help="decode: prefill the prompt once and fork it into the rows")
    ap.add_argument("--min-shared-prefix", type=int, default=None, metavar="N",
                    help="a fork shares prompts of at least N tokens (prefix bundles; default the runtime's)")
    args = ap.parse_args(argv)
    worker = OursWorker(bundle=args.bundle, role=args.role, threads=args.threads, fork=args.fork,
                        min_shared_prefix=args.min_shared_prefix)
    serve({"decode_start": worker.decode_start, "decode_window": worker.decode_window, "prefill": worker.prefill,
           "generate": worker.generate, "score": worker.score}, worker.hello)
    return 0


if __name__ == "__main__":
    sys.exit(main())
