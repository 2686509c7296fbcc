"""Export self-check: ONNX Runtime against the PyTorch source on a ragged batch of branches.

First the source model writes the reference: each prompt alone, greedy, decode_steps + 1 tokens. Then the
exported graph runs the way the runtime does — one batched prefill of the prompts (different lengths,
right-padded) and `decode_steps` batched decode steps with the runtime's KV cache — fed the reference
tokens, so both models see exactly the same contexts, and every logit row is compared.

    max_abs_logit_diff   max |logit_onnx - logit_torch| over every compared position and vocab entry
    greedy_agreement     share of generated positions where argmax(onnx) is the reference's greedy token;
                         1.0 means the exported model's greedy continuation is token-identical
    max_abs_value_diff   with a value head: max |value_onnx - value_torch| over the same positions, the torch
                         value being the head on transformers' final-norm hidden states (last_hidden_state)
    shared_prefix        prefix graphs only: the same graph run with a shared prefix segment against every
                         branch holding its own copy (the path the comparison above checked): half the longest
                         prompt forked into one branch per prompt, each adding its prompt in one ragged forward,
                         then decode steps; {prefix_tokens, branches, max_abs_logit_diff}, limit 1e-4 at every
                         precision (the two layouts compute the same attention)

A quantized bundle's report also carries `quantization` (export/quantize.py: format, bits, block size, and how
the embedding is stored), added by the bundle writer.

Feeding the reference (not the graph's own argmax) keeps quantized exports comparable: every variant is
scored on the same positions instead of on its own, diverging continuation.

Validation must be able to see what it validates: when the model has sliding windows and no context would pass
the smallest one, the longest prompt is extended (with its own tokens, repeated) until prompt + decode steps
exceed it. Features the contexts still cannot reach (longrope's long factors past original_max_position_embeddings,
which would take thousands of tokens) are listed in the report as `not_exercised`. At fp32 the graph must match
to float rounding, so a failure there with the default limits is a wrong export (a bug), reported as such.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from specreason_rt.backends.ort import OrtEngine
from specreason_rt.kv_cache import KVCache

from .errors import ExportError
from .families import family_of, layer_windows
from .onnx_export import KV_NAMES


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float | None  # None: recorded, not enforced (quantized weights change logits)
    min_greedy_agreement: float
    max_abs_value_diff: float | None = None  # the value head's output, when the graph has one


# fp32 must match the source to float rounding. Quantized weights change logits by design, so for int8/int4
# the bar only catches a broken export (which agrees on almost nothing); the recorded agreement is the
# quality figure (SmolLM2-135M: 67% for both over 27 positions).
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_abs_logit_diff=1e-3, min_greedy_agreement=1.0, max_abs_value_diff=1e-4),
    "int8": Tolerance(max_abs_logit_diff=None, min_greedy_agreement=0.5),
    "int4": Tolerance(max_abs_logit_diff=None, min_greedy_agreement=0.5),
}


def run_onnx(*, engine: OrtEngine, prompts: list[list[int]], continuations: list[list[int]], kv_heads: int,
             head_dim: int, max_context: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Batched prefill of the prompts, then one decode step per continuation token (all but the last),
    fed to every branch at once. Returns per branch the logits [len(prompt) + steps, vocab], and with a
    value head the values [len(prompt) + steps] (else None)."""
    branches = len(prompts)
    decode_steps = len(continuations[0]) - 1
    lens = np.array([len(p) for p in prompts], np.int64)
    cache = KVCache(layers=engine.layers, kv_heads=kv_heads, head_dim=head_dim, branches=branches,
                    max_context=max_context, capacity=int(lens.max()) + decode_steps + 1)

    # 1. Prefill every prompt in one call; ask for logits at every prompt position.
    width = int(lens.max())
    ids = np.zeros((branches, width), np.int64)  # [branches, width], right-padded
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    index = np.tile(np.arange(width), (branches, 1))
    with_value = engine.has_value

    def forward(fed: np.ndarray, n_new: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if with_value:
            return engine.step_with_values(cache=cache, input_ids=fed, n_new=n_new, logits_index=at)
        return engine.step(cache=cache, input_ids=fed, n_new=n_new, logits_index=at), None

    logits, value = forward(ids, lens, index)
    rows = [[logits[b, t] for t in range(lens[b])] for b in range(branches)]
    value_rows = [[value[b, t] for t in range(lens[b])] for b in range(branches)] if value is not None else None

    # 2. Decode, one reference token per branch per step, branches at different lengths.
    ones = np.ones(branches, np.int64)
    zero_index = np.zeros((branches, 1), np.int64)
    for step in range(decode_steps):
        fed = np.array([[c[step]] for c in continuations], np.int64)  # [branches, 1]
        logits, value = forward(fed, ones, zero_index)
        for b in range(branches):
            rows[b].append(logits[b, 0])
            if value_rows is not None and value is not None:
                value_rows[b].append(value[b, 0])
    return [np.stack(r) for r in rows], [np.stack(r) for r in value_rows] if value_rows is not None else None


SHARED_PREFIX_LIMIT = 1e-4  # shared vs copied prefix on one graph: float rounding only


def shared_prefix_check(*, engine: OrtEngine, prompts: list[list[int]], kv_heads: int, head_dim: int,
                        max_context: int, decode_steps: int = 3) -> dict[str, Any]:
    """Run a forked context on a prefix graph twice, with the prompt shared and copied per branch; return the
    largest logit difference between the two (see the module docstring, `shared_prefix`)."""
    longest = max(prompts, key=len)
    prefix = longest[:max(len(longest) // 2, 1)]
    branches = len(prompts)
    width = max(len(p) for p in prompts)
    runs = []
    for share in (True, False):
        cache = KVCache(layers=engine.layers, kv_heads=kv_heads, head_dim=head_dim, branches=1,
                        max_context=max_context, capacity=len(prefix) + width + decode_steps, share_prefix=share,
                        min_prefix=1)
        engine.step(cache=cache, input_ids=np.array([prefix], np.int64), n_new=np.array([len(prefix)]),
                    logits_index=np.zeros((1, 1), np.int64))
        cache.fork(branches)
        ids = np.zeros((branches, width), np.int64)  # [branches, width], right-padded
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        n_new = np.array([len(p) for p in prompts], np.int64)
        logits = engine.step(cache=cache, input_ids=ids, n_new=n_new, logits_index=np.tile(np.arange(width),
                                                                                            (branches, 1)))
        rows = [logits[b, :len(p)] for b, p in enumerate(prompts)]  # each [len(p), vocab]
        for step in range(decode_steps):
            fed = np.array([[p[step % len(p)]] for p in prompts], np.int64)  # [branches, 1]
            out = engine.step(cache=cache, input_ids=fed, n_new=np.ones(branches, np.int64),
                              logits_index=np.zeros((branches, 1), np.int64))
            rows.append(out[:, 0])
        if share and cache.prefix_len != len(prefix):
            raise ExportError("the prefix graph's cache did not share the forked prompt: a bug in specreason_rt")
        runs.append(rows)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*runs, strict=True))
    return {"prefix_tokens": len(prefix), "branches": branches, "decode_steps": decode_steps,
            "max_abs_logit_diff": diff, "limit": SHARED_PREFIX_LIMIT}


def reference_continuations(*, model: Any, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """The source model's own greedy continuation of each prompt, `tokens` long. A plain argmax loop rather
    than `generate`, so that nothing (eos handling, min-length rules) alters the model's choice."""
    import torch

    out = []
    for prompt in prompts:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        out.append(seq[len(prompt):])
    return out


def validate(*, model: Any, onnx_path: Path, attention: str, prompts: list[list[int]], precision: str,
             decode_steps: int = 8, tolerance: Tolerance | None = None, value_head: Any = None) -> dict[str, Any]:
    """Compare the ONNX graph with `model` (and its `value` output with the torch `value_head`, if given);
    return the report recorded in the manifest."""
    import torch

    if len(prompts) < 3 or len({len(p) for p in prompts}) < 2:
        raise ValueError("validation needs >= 3 prompts of different lengths")
    tol = tolerance or DEFAULT_TOLERANCES[precision]
    cfg = model.config
    prompts, not_exercised, smallest_window = _reach(config=cfg, prompts=prompts, decode_steps=decode_steps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    engine = OrtEngine(model_path=onnx_path, layers=cfg.num_hidden_layers, kv_names=KV_NAMES[attention],
                       attention=attention)
    continuations = reference_continuations(model=model, prompts=prompts, tokens=decode_steps + 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    onnx_rows, onnx_values = run_onnx(engine=engine, prompts=prompts, continuations=continuations,
                                      kv_heads=kv_heads, head_dim=head_dim, max_context=cfg.max_position_embeddings)

    if (value_head is not None) != (onnx_values is not None):
        raise ValueError(f"{onnx_path}: a value head was {'' if value_head is not None else 'not '}given but the "
                         f"graph {'lacks' if value_head is not None else 'has'} the output `value`")
    max_diff, max_value_diff, agree, total = 0.0, 0.0, 0, 0
    for b, prompt in enumerate(prompts):
        sequence = prompt + continuations[b][:-1]  # what both models were fed
        with torch.no_grad():
            ref = model(torch.tensor([sequence])).logits[0].float().numpy()  # [len + steps, vocab]
            if value_head is not None and onnx_values is not None:
                hidden = model.model(torch.tensor([sequence])).last_hidden_state  # [1, len + steps, hidden]
                ref_value = value_head(hidden)[0].float().numpy()  # [len + steps]
                max_value_diff = max(max_value_diff, float(np.abs(onnx_values[b] - ref_value).max()))
        ours = onnx_rows[b]
        max_diff = max(max_diff, float(np.abs(ours - ref).max()))
        gen = slice(len(prompt) - 1, None)  # positions whose argmax is a generated token
        agree += int((ours[gen].argmax(-1) == np.array(continuations[b])).sum())
        total += ours[gen].shape[0]
    agreement = agree / total
    shared = None
    if attention == "prefix":
        shared = shared_prefix_check(engine=engine, prompts=prompts, kv_heads=kv_heads, head_dim=head_dim,
                                     max_context=cfg.max_position_embeddings)
        if shared["max_abs_logit_diff"] > SHARED_PREFIX_LIMIT:
            # Not a precision question: both runs use the same weights, so this is a wrong graph or cache.
            raise ExportError(
                f"{onnx_path.parent.name}: the prefix graph's logits with the prompt shared differ from those with "
                f"the prompt copied per branch (max |diff| {shared['max_abs_logit_diff']:.3g}, limit "
                f"{SHARED_PREFIX_LIMIT}): a bug in specreason-export or the runtime's cache (please report it); "
                "export --attention gqa or plain meanwhile; no bundle written")
    passed = agreement >= tol.min_greedy_agreement and (
        tol.max_abs_logit_diff is None or max_diff <= tol.max_abs_logit_diff) and (
        value_head is None or tol.max_abs_value_diff is None or max_value_diff <= tol.max_abs_value_diff)
    if not passed and precision == "fp32" and tolerance is None:
        raise ExportError(
            f"{onnx_path.parent.name}: the exported fp32 graph ({cfg.model_type}, {attention} attention) differs from "
            f"transformers (max |logit diff| {max_diff:.3g}, greedy agreement {agreement:.1%}): the export is wrong, "
            "a bug in specreason-export's decoder for this family (please report it); no bundle written")
    report: dict[str, Any] = {
        "passed": passed,
        "reference": "transformers (PyTorch, fp32) on the source weights, each branch run alone; both fed "
                     "the transformers greedy continuation",
        "precision": precision,
        "attention": attention,
        "branches": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "decode_steps": decode_steps,
        "max_abs_logit_diff": max_diff,
        "greedy_agreement": agreement,
        "greedy_positions_checked": total,
        "longest_context": max(len(p) for p in prompts) + decode_steps,
        "smallest_window": smallest_window,
        "features": family.features(cfg) if (family := family_of(cfg.model_type)) else [],
        "not_exercised": not_exercised,
        "tolerance": dataclasses.asdict(tol),
    }
    if value_head is not None:
        report["max_abs_value_diff"] = max_value_diff
    if shared is not None:
        report["shared_prefix"] = shared
    return report


def _reach(*, config: Any, prompts: list[list[int]], decode_steps: int
           ) -> tuple[list[list[int]], list[str], int | None]:
    """Prompts whose longest context passes the smallest sliding window (the longest prompt extended with its own
    tokens when needed); the features no context reaches; the smallest window (None without windows)."""
    family = family_of(config.model_type)
    windows = [w for w in layer_windows(family=family, config=config) if w is not None] if family else []
    smallest = min(windows) if windows else None
    prompts = [list(p) for p in prompts]
    if smallest is not None:
        longest = max(range(len(prompts)), key=lambda b: len(prompts[b]))
        need = smallest + 2 - decode_steps  # prompt + decode steps > window by a margin of 2
        p = prompts[longest]
        if len(p) < need:
            prompts[longest] = (p * (need // len(p) + 1))[:need]
    not_exercised = []
    scaling = getattr(config, "rope_scaling", None) or {}
    original = getattr(config, "original_max_position_embeddings", None) or scaling.get(
        "original_max_position_embeddings")
    if "longrope" in str(scaling.get("rope_type", scaling.get("type", ""))) and original and (
            max(len(p) for p in prompts) + decode_steps <= original):
        not_exercised.append(f"longrope long factors (contexts past {original} tokens)")
    return prompts, not_exercised, smallest
