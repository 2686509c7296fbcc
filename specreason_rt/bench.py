"""Benchmarks with JSON output (not tests); every figure is a median of repeated runs.

`decode`: ms per decode step (one new token for every branch) at a given context, per role.
`logits`: what computing logits only where asked saves.

A prefill of T tokens for B branches needs the logits of the last position only (the sampler's next
token); a graph that returns every position materialises [B, T, vocab] floats. Our graphs take
`logits_index`, so the runtime asks for [B, 1, vocab]. This measures both on the same graph.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .engine import OrtEngine
from .errors import ConfigError
from .kv_cache import KVCache
from .manifest import Architecture, load_manifest


def _median_ms(fn: Callable[[], object], *, repeats: int) -> float:
    fn()  # warm-up: first run allocates ORT's arenas
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _prefill(*, engine: OrtEngine, cache: KVCache, ids: np.ndarray, n_new: np.ndarray, index: np.ndarray) -> None:
    cache.lengths[:] = 0  # start from an empty cache every run
    engine.step(cache=cache, input_ids=ids, n_new=n_new, logits_index=index)


def bench_logits(*, bundle: str | Path, role: str = "speculator", branches: tuple[int, ...] = (1, 4),
                 prompt_tokens: int = 512, repeats: int = 5, threads: int = 0) -> dict[str, Any]:
    manifest = load_manifest(bundle)
    entry = manifest.models[role]
    arch = entry.architecture
    engine = OrtEngine.from_bundle(bundle_dir=bundle, entry=entry, intra_op_threads=threads)
    tokens = min(prompt_tokens, arch.max_context)
    rng = np.random.default_rng(0)
    rows = []
    for b in branches:
        cache = KVCache(layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim, branches=b,
                        max_context=arch.max_context, capacity=tokens)
        n_new = np.full(b, tokens, np.int64)
        ids = rng.integers(4, arch.vocab_size, size=(b, tokens), dtype=np.int64)  # [branches, tokens]
        row: dict[str, Any] = {"branches": b, "prompt_tokens": tokens}
        for label, index in (("last_only", np.full((b, 1), tokens - 1, np.int64)),
                             ("all_positions", np.tile(np.arange(tokens), (b, 1)))):
            run = functools.partial(_prefill, engine=engine, cache=cache, ids=ids, n_new=n_new, index=index)
            row[f"{label}_ms"] = round(_median_ms(run, repeats=repeats), 2)
            row[f"{label}_logits_mb"] = round(b * index.shape[1] * arch.vocab_size * 4 / 2**20, 2)
        row["saved_ms"] = round(row["all_positions_ms"] - row["last_only_ms"], 2)
        row["speedup"] = round(row["all_positions_ms"] / row["last_only_ms"], 2)
        rows.append(row)
    return {"benchmark": "prefill logits only where asked", "bundle": str(bundle), "role": role,
            "precision": entry.precision, "vocab": arch.vocab_size, "repeats": repeats, "statistic": "median",
            "results": rows}


def _decode_ms(*, engine: OrtEngine, arch: Architecture, branches: int, context: int, steps: int,
               rng: np.random.Generator) -> tuple[float, float]:
    """Mean ms of one decode step over `steps` greedy steps after `context` cached tokens per branch,
    and the part of it spent inside ONNX Runtime."""
    cache = KVCache(layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim, branches=branches,
                    max_context=arch.max_context, capacity=context + steps + 1)
    # Random keys/values stand in for a prefilled context: a decode step's cost does not depend on their values.
    for k, v in zip(cache.keys, cache.values, strict=True):
        k[:, :, :context] = rng.standard_normal(k[:, :, :context].shape, np.float32)
        v[:, :, :context] = rng.standard_normal(v[:, :, :context].shape, np.float32)
    cache.lengths[:] = context
    ones = np.ones(branches, np.int64)
    zero_index = np.zeros((branches, 1), np.int64)
    token = rng.integers(4, arch.vocab_size, size=(branches, 1), dtype=np.int64)  # [branches, 1]
    ort_before = engine.ort_seconds
    start = time.perf_counter()
    for _ in range(steps):
        logits = engine.step(cache=cache, input_ids=token, n_new=ones, logits_index=zero_index)
        token = logits[:, 0].argmax(-1)[:, None].astype(np.int64)
    wall = time.perf_counter() - start
    return wall * 1e3 / steps, (engine.ort_seconds - ort_before) * 1e3 / steps


def _prefill_fork_ms(*, engine: OrtEngine, arch: Architecture, prompt: np.ndarray, n_specs: int) -> float:
    """Prefill one prompt once and fork its cache into n_specs branches (what best-of-n does)."""
    cache = KVCache(layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim, branches=1,
                    max_context=arch.max_context, capacity=prompt.shape[1] + 64)
    start = time.perf_counter()
    engine.step(cache=cache, input_ids=prompt, n_new=np.array([prompt.shape[1]]),
                logits_index=np.array([[prompt.shape[1] - 1]]))
    if n_specs > 1:
        cache.fork(n_specs)
    return (time.perf_counter() - start) * 1e3


def read_bandwidth_gbs(*, megabytes: int = 1024, repeats: int = 5) -> float:
    """Weight-read bandwidth as a decode step sees it: a float32 matrix-vector product (numpy's BLAS, its
    default threads) over a matrix far larger than the caches. Decode at one branch is such products over
    every weight, so weight bytes / this bandwidth is the floor of a decode step."""
    matrix = np.ones((megabytes * 2**20 // 4096, 1024), np.float32)  # [rows, 1024]
    vector = np.ones(1024, np.float32)
    matrix @ vector  # touch every page once
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        seconds.append(time.perf_counter() - start)
    return matrix.nbytes / statistics.median(seconds) / 1e9


def _weight_bytes(bundle: Path, rel_file: str) -> int:
    model = bundle / rel_file
    data = model.with_name(model.name + ".data")
    return model.stat().st_size + (data.stat().st_size if data.exists() else 0)


def bench_decode(*, bundle: str | Path, roles: tuple[str, ...] = ("speculator", "verifier"),
                 branches: tuple[int, ...] = (1, 4), contexts: tuple[int, ...] = (64,), steps: int = 32,
                 repeats: int = 5, threads: int = 0, prefill_tokens: int = 512,
                 n_specs: tuple[int, ...] = (1, 4)) -> dict[str, Any]:
    """Per role and (branches, context) cell: median over `repeats` runs of the mean ms per decode step;
    per role and n_specs: median ms to prefill one shared prompt and fork it into n_specs branches."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth_gbs()
    rows: list[dict[str, Any]] = []
    prefill_rows: list[dict[str, Any]] = []
    for role in roles:
        entry = manifest.models[role]
        arch = entry.architecture
        engine = OrtEngine.from_bundle(bundle_dir=bundle, entry=entry, intra_op_threads=threads)
        floor_ms = _weight_bytes(bundle, entry.file) / (bandwidth * 1e9) * 1e3
        for b in branches:
            for context in contexts:
                if context + steps > arch.max_context:
                    continue
                run = functools.partial(_decode_ms, engine=engine, arch=arch, branches=b, context=context,
                                        steps=steps, rng=rng)
                run()  # warm-up
                results = [run() for _ in range(repeats)]
                ms = statistics.median(r[0] for r in results)
                ort_ms = statistics.median(r[1] for r in results)
                rows.append({"role": role, "branches": b, "context": context, "ms_per_step": round(ms, 3),
                             "tokens_per_s": round(b * 1e3 / ms, 1),
                             "python_overhead_pct": round(100 * (ms - ort_ms) / ms, 2),
                             "bandwidth_floor_ms": round(floor_ms, 3),
                             "floor_over_measured": round(floor_ms / ms, 3)})
        tokens = min(prefill_tokens, arch.max_context - 64)
        prompt = rng.integers(4, arch.vocab_size, size=(1, tokens), dtype=np.int64)  # [1, tokens]
        for n in n_specs:
            run_prefill = functools.partial(_prefill_fork_ms, engine=engine, arch=arch, prompt=prompt, n_specs=n)
            run_prefill()  # warm-up
            prefill_rows.append({"role": role, "n_specs": n, "prompt_tokens": tokens,
                                 "ms": round(statistics.median(run_prefill() for _ in range(repeats)), 2)})
    ratios = {}
    for row in rows:
        spec = next((r for r in rows if r["role"] == "speculator" and r["branches"] == row["branches"]
                     and r["context"] == row["context"]), None)
        if row["role"] == "verifier" and spec is not None:
            ratios[f"B={row['branches']},T={row['context']}"] = round(row["ms_per_step"] / spec["ms_per_step"], 2)
    return {"benchmark": "decode ms per step", "bundle": str(bundle), "precision": manifest.precision,
            "attention": {role: manifest.models[role].kv_cache.get("attention", "plain") for role in roles},
            "steps": steps, "repeats": repeats, "statistic": "median", "threads": threads,
            "read_bandwidth_gbs": round(bandwidth, 2),
            "bandwidth_method": "float32 matrix-vector product over a 1 GiB matrix, 4x the L3 cache "
                                "(numpy BLAS), median of 5",
            "results": rows, "prefill": prefill_rows, "verifier_over_speculator": ratios}


# Peer name -> its benchmark script in the repository (each prints one JSON object, see runtime/peers/).
PEER_SCRIPTS = {
    "onnxruntime-genai": "runtime/peers/genai_bench.py",
    "transformers": "runtime/peers/transformers_bench.py",
}


def run_peer(*, name: str, python: str, model_dir: str | Path, branches: tuple[int, ...],
             contexts: tuple[int, ...], steps: int, repeats: int, threads: int, prefill_tokens: int,
             n_specs: tuple[int, ...], script: str | Path | None = None) -> dict[str, Any]:
    """Run a peer's benchmark script in its own interpreter: onnxruntime-genai needs its own venv (its builder
    wants transformers >= 5), transformers needs torch — neither may enter this process."""
    if name not in PEER_SCRIPTS:
        raise ConfigError(f"unknown peer {name!r}: choose from {', '.join(PEER_SCRIPTS)}")
    script = script or PEER_SCRIPTS[name]
    if not Path(script).is_file():
        raise ConfigError(f"peer script {script} not found: run from the repository root")
    cmd = [python, str(script), "--model", str(model_dir), "--branches", *map(str, branches),
           "--contexts", *map(str, contexts), "--steps", str(steps), "--repeats", str(repeats),
           "--threads", str(threads), "--prefill-tokens", str(prefill_tokens), "--prefill-specs", *map(str, n_specs),
           "--json"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ConfigError(f"cannot run the peer's python {python!r} ({e}); create it with "
                          "runtime/peers/setup_genai.sh") from e
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"the {name} peer failed: {tail[0]}")
    return json.loads(res.stdout)


def compare_with_peer(*, ours: dict[str, Any], peer: dict[str, Any], role: str = "speculator") -> dict[str, Any]:
    """Ratios ours / peer on the same cells: tokens/s (> 1 means we are faster) and the shared-prompt prefill."""
    cells = []
    for p in peer["decode"]:
        mine = next((r for r in ours["results"] if r["role"] == role and r["branches"] == p["branches"]
                     and r["context"] == p["context"]), None)
        if mine is not None:
            cells.append({"branches": p["branches"], "context": p["context"], "ours_ms": mine["ms_per_step"],
                          "peer_ms": p["ms_per_step"],
                          "tokens_per_s_ratio": round(mine["tokens_per_s"] / p["tokens_per_s"], 3)})
    prefill = {}
    for name, rows in (("ours", [r for r in ours["prefill"] if r["role"] == role]), ("peer", peer["prefill"])):
        by_n = {r["n_specs"]: r["ms"] for r in rows}
        if 1 in by_n and 4 in by_n:
            prefill[f"{name}_n4_over_n1"] = round(by_n[4] / by_n[1], 3)
    return {"role": role, "decode": cells, "prefill": prefill}
