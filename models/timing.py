"""Decode-time proxies for the built-in pair: how much slower is a verifier token than a speculator token.

Two proxies, both at batch 1 on CPU, reported as median milliseconds:

* ``torch_decode_ms`` -- per-token greedy decode with the KV cache in transformers (prefill a prompt, then time
  ``tokens`` single-token forwards that reuse ``past_key_values``).
* ``ort_forward_ms`` -- ONNX Runtime run of a no-cache forward exported with ``torch.onnx.export(dynamo=False)``,
  at ``seq`` = 1 (one decode step's op count without the cache; per-op overhead dominates at this size) and at
  ``seq`` = 64 (a short prefill).

ratio = verifier time / speculator time; the runtime's real numbers come from its own benchmarks.

Usage: python -m specreason_models.timing [--speculator DIR] [--verifier DIR] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from . import builtin_path


class _LogitsOnly(torch.nn.Module):
    """Wraps the model so the exported graph has one input (input_ids [1, seq]) and one output (logits)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # A ready 4-D causal mask [1, 1, seq, seq] keeps transformers off its vmap mask builder, which the
        # TorchScript tracer cannot follow (RuntimeError: unordered_map::at with torch 2.13).
        seq = input_ids.shape[1]
        future = torch.ones((seq, seq), dtype=torch.bool).triu(1)
        mask = torch.zeros((seq, seq)).masked_fill(future, torch.finfo(torch.float32).min)[None, None]
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits  # [1, seq, vocab]


@torch.no_grad()
def torch_decode_ms(*, model: LlamaForCausalLM, tokens: int = 64, repeats: int = 3) -> float:
    """Median per-token milliseconds of greedy decoding with the KV cache, batch 1, after an 8-token prefill."""
    model.eval()
    per_run = []
    for _ in range(repeats):
        ids = torch.ones((1, 8), dtype=torch.long)  # ids: [1, 8]
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)  # [1, 1]
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        per_run.append((time.perf_counter() - start) * 1000 / tokens)
    return statistics.median(per_run)


def ort_forward_ms(*, model: LlamaForCausalLM, seqs: tuple[int, ...] = (1, 64), repeats: int = 50) -> dict[int, float]:
    """Median milliseconds of one ONNX Runtime forward (no cache) per sequence length."""
    import onnxruntime as ort

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        torch.onnx.export(
            _LogitsOnly(model),
            (torch.ones((1, 8), dtype=torch.long),),
            path,
            dynamo=False,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {1: "seq"}, "logits": {1: "seq"}},
            opset_version=17,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # single thread: the comparison is per-op cost, not parallel speedup
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    result = {}
    for seq in seqs:
        feed = {"input_ids": np.ones((1, seq), dtype=np.int64)}
        session.run(None, feed)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1000)
        result[seq] = statistics.median(times)
    return result


def measure(*, speculator: Path, verifier: Path, tokens: int = 64) -> dict:
    report: dict = {}
    for role, path in (("speculator", speculator), ("verifier", verifier)):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        ort_ms = ort_forward_ms(model=model)
        report[role] = {
            "parameters": sum(t.numel() for t in model.parameters()),
            "torch_decode_ms": round(torch_decode_ms(model=model, tokens=tokens), 3),
            "ort_forward_ms_seq1": round(ort_ms[1], 4),
            "ort_forward_ms_seq64": round(ort_ms[64], 4),
        }
    for key in ("torch_decode_ms", "ort_forward_ms_seq1", "ort_forward_ms_seq64"):
        report[f"ratio_{key}"] = round(report["verifier"][key] / report["speculator"][key], 2)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m specreason_models.timing",
        description="Verifier/speculator per-token time ratio on CPU (torch with KV cache, ONNX Runtime no-cache).",
    )
    parser.add_argument("--speculator", type=Path, default=builtin_path("speculator"))
    parser.add_argument("--verifier", type=Path, default=builtin_path("verifier"))
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed in torch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(speculator=args.speculator, verifier=args.verifier, tokens=args.tokens), indent=2))


if __name__ == "__main__":
    main()
