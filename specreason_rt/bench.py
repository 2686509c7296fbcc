"""Benchmarks with JSON output (not tests), and the `specreason bench` subcommands.

`decode` / `prefill` / `generate`: ours and the peers (onnxruntime-genai, transformers) in one run, fairly:
    all loaded, the same threads, interleaved windows, cores really used recorded (bench_harness.py).
`quality`: a quantized bundle and the peers' quantized model against the fp32 export (bench_quality.py).
`logits`: what computing logits only where asked saves (ours alone; median of repeated runs).

A prefill of T tokens for B branches needs the logits of the last position only (the sampler's next
token); a graph that returns every position materialises [B, T, vocab] floats. Our graphs take
`logits_index`, so the runtime asks for [B, 1, vocab]. This measures both on the same graph.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import usable_cores
from .backends.ort import OrtEngine
from .bench_harness import (
    OURS,
    PEER_SCRIPTS,
    SystemSpec,
    Worker,
    bench_decode,
    bench_generate,
    bench_prefill,
    describe,
    ours_spec,
    peer_spec,
    start_workers,
)
from .bench_quality import perplexity, quality_inputs, record_quality, summarise_quality
from .bench_verify import bench_verify
from .errors import ConfigError
from .kv_cache import KVCache
from .manifest import load_manifest
from .tokenizer import Tokenizer


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




# --- the fair harness's commands (bench_harness.py): decode, prefill, generate, quality --------------------------

DEFAULT_CHAT_PROMPT = "Explain in a few sentences how a bicycle works."


def _default_threads() -> int:
    return usable_cores()


def _systems(args: argparse.Namespace, *, ours: list[SystemSpec]) -> list[SystemSpec]:
    """Ours first, then each --peer KIND[:LABEL] PATH in the order given."""
    specs = list(ours)
    for kind_label, path in args.peer or []:
        kind, _, label = kind_label.partition(":")
        if kind == OURS:  # another of our bundles (e.g. another attention variant), run the same way
            if not (Path(path) / "manifest.json").is_file():
                raise ConfigError(f"--peer {kind_label} {path}: not a bundle (no manifest.json)")
            first = ours[0].command
            extra = first[first.index("--role") + 2:]  # ours' own flags (--fork), not its bundle
            specs.append(SystemSpec(name=f"{OURS}:{label or Path(path).name}",
                                    command=(*ours_spec(bundle=path, role=args.role).command, *extra)))
            continue
        python = args.peer_python or os.environ.get("SPECREASON_PEER_PYTHON", "")
        if not python and kind == "transformers":
            python = sys.executable  # the project's export extra has torch + transformers too
        if kind in PEER_SCRIPTS and not python:
            raise ConfigError(f"--peer {kind} needs the peer venv's python: pass --peer-python or set "
                              "SPECREASON_PEER_PYTHON (create it with runtime/peers/setup_genai.sh)")
        spec = peer_spec(name=kind, model=path, python=python)
        specs.append(SystemSpec(name=f"{kind}:{label}" if label else kind, command=spec.command))
    return specs


def _run(specs: list[SystemSpec], args: argparse.Namespace, body: Callable[[list[Worker]], dict[str, Any]]
         ) -> dict[str, Any]:
    workers = start_workers(specs, threads=args.threads)
    try:
        result = {**describe(workers, threads=args.threads), **body(workers)}
        # Every timed answer in the order it ran (kept, STYLE.md 14).
        result["raw"] = sorted((entry for w in workers for entry in w.log), key=lambda entry: entry["t0"])
        return result
    finally:
        for w in workers:
            w.close()


def _emit(result: dict[str, Any], args: argparse.Namespace, lines: list[str]) -> int:
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)  # never a half-written file
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['machine']['cpu_model']}, {args.threads} threads per system, load "
          f"{result['machine']['load_average_1m']}")
    for name, system in result["systems"].items():
        print(f"  {name} {system.get('version', '?')} ({system.get('precision', '?')}, threads {system['threads']})")
    print("\n".join(lines))
    return 0


def _cell_lines(title: str, cell: dict[str, Any], unit: str) -> list[str]:
    lines = [title]
    for name, s in cell["systems"].items():
        r, c = s["rate"], s["cores_used"]
        lines.append(f"    {name:<28} {r['median']:10.2f} {unit} [{r['min']:.2f}..{r['max']:.2f}]  "
                     f"cores used {c['median']:.2f} [{c['min']:.2f}..{c['max']:.2f}]")
    for pair, s in cell["ratios"].items():
        lines.append(f"    {pair:<28} {s['median']:.3f}x [{s['min']:.3f}..{s['max']:.3f}] over {s['n']} windows")
    return lines


def _bench_decode(args: argparse.Namespace) -> int:
    entry = load_manifest(args.bundle).models[args.role]
    floor_ms = None
    if not args.no_floor:
        floor_ms = _weight_bytes(Path(args.bundle), entry.file) / (read_bandwidth_gbs() * 1e9) * 1e3
    base = ours_spec(bundle=args.bundle, role=args.role)
    fork = ("--fork",) if args.fork else ()
    share = () if args.min_shared_prefix is None else ("--min-shared-prefix", str(args.min_shared_prefix))
    mine = [SystemSpec(name=base.name, command=(*base.command, *fork, *share))]
    if args.fork and entry.kv_cache.get("attention") == "prefix":
        # The same graph with every fork copied (no shared prefix): the path a prefix bundle takes below
        # SHARED_PREFIX_MIN_TOKENS, so the crossover can be read off one run.
        mine.append(SystemSpec(name=f"{OURS}:copies", command=(*base.command, *fork, "--min-shared-prefix",
                                                               str(2**40))))
    specs = _systems(args, ours=mine)

    def body(workers: list[Worker]) -> dict[str, Any]:
        cells = bench_decode(workers, branches=args.branches, contexts=args.contexts, steps=args.steps,
                             windows=args.windows, warmup=args.warmup, gap_s=args.gap_ms / 1e3)
        for cell in cells:
            ms = statistics.median(cell["systems"][OURS]["windows_ms"]) / args.steps
            cell["ours_ms_per_step"] = round(ms, 3)
            if floor_ms is not None and cell["branches"] == 1:
                cell["ours_floor_over_measured"] = round(floor_ms / ms, 3)
        return {"benchmark": "decode tokens/s (steady state)", "bundle": str(args.bundle), "role": args.role,
                "fork": args.fork,
                "steps_per_window": args.steps, "warmup_steps": args.warmup, "windows": args.windows,
                "bandwidth_floor_ms": None if floor_ms is None else round(floor_ms, 3), "cells": cells}

    result = _run(specs, args, body)
    lines = []
    for cell in result["cells"]:
        lines += _cell_lines(f"  B={cell['branches']} T={cell['context']} (ours {cell['ours_ms_per_step']} ms/step)",
                             cell, "tok/s")
    return _emit(result, args, lines)


def _bench_prefill(args: argparse.Namespace) -> int:
    specs = _systems(args, ours=[ours_spec(bundle=args.bundle, role=args.role)])

    def body(workers: list[Worker]) -> dict[str, Any]:
        cells = [cell for tokens in args.tokens
                 for cell in bench_prefill(workers, prompt_tokens=tokens, n_specs=args.n_specs, windows=args.windows,
                                           gap_s=args.gap_ms / 1e3)]
        for cell in cells:
            for s in cell["systems"].values():
                s["ms"] = round(statistics.median(s["windows_ms"]), 2)
        return {"benchmark": "prefill of one prompt for n_specs branches (ours: once, then the cache forked)",
                "bundle": str(args.bundle), "role": args.role, "windows": args.windows, "cells": cells}

    result = _run(specs, args, body)
    lines = []
    for cell in result["cells"]:
        lines += _cell_lines(f"  {cell['prompt_tokens']} tokens for {cell['n_specs']} branches", cell, "prefills/s")
    return _emit(result, args, lines)


def _prompt_ids(args: argparse.Namespace) -> list[int]:
    manifest = load_manifest(args.bundle)
    entry = manifest.models[args.role]
    tokenizer = Tokenizer(path=Path(args.bundle) / entry.tokenizer, generation=entry.generation)
    if args.raw:
        return tokenizer.encode(args.prompt)
    return tokenizer.encode_chat([{"role": "user", "content": args.prompt}])


def _bench_generate(args: argparse.Namespace) -> int:
    prompt = _prompt_ids(args)
    specs = _systems(args, ours=[ours_spec(bundle=args.bundle, role=args.role)])

    def body(workers: list[Worker]) -> dict[str, Any]:
        run = bench_generate(workers, prompt=prompt, new_tokens=args.new_tokens, windows=args.windows,
                             gap_s=args.gap_ms / 1e3)
        return {"benchmark": "end to end: prompt + N greedy tokens, wall time", "bundle": str(args.bundle),
                "role": args.role, "prompt": args.prompt, "windows": args.windows, **run}

    result = _run(specs, args, body)
    lines = _cell_lines(f"  {result['prompt_tokens']}-token prompt + {args.new_tokens} greedy tokens", result["timing"],
                        "tok/s")
    for name, out in result["outputs"].items():
        same = "identical to ours" if out["identical_to_ours"] else f"differs at token {out['first_difference']}"
        lines.append(f"    {name:<28} output {same}")
    return _emit(result, args, lines)


def _bench_quality(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.bundle)
    entry = manifest.models[args.role]
    tokenizer = Tokenizer(path=Path(args.bundle) / entry.tokenizer, generation=entry.generation)
    prompts, text = quality_inputs(tokenizer=tokenizer)
    text = text[:min(args.text_tokens, entry.architecture.max_context)]
    longest = max(len(p) for p in prompts) + args.new_tokens
    if longest > entry.architecture.max_context:
        raise ConfigError(f"the longest quality prompt + {args.new_tokens} tokens is {longest} tokens, over the "
                          f"model's context {entry.architecture.max_context}: lower --new-tokens")
    reference = ours_spec(bundle=args.reference, role=args.role, name="fp32-reference")
    specs = _systems(args, ours=[reference, ours_spec(bundle=args.bundle, role=args.role)])

    def body(workers: list[Worker]) -> dict[str, Any]:
        ref = workers[0]
        if ref.hello["precision"] != "fp32":
            raise ConfigError(f"--reference {args.reference} is {ref.hello['precision']}: pass an fp32 bundle")
        # 1. The reference's greedy trajectories; 2. every model scores prompt + trajectory and the text.
        trajectories = [ref.ask("generate", ids=p, new_tokens=args.new_tokens)["tokens"] for p in prompts]
        text_scores = {w.spec.name: w.ask("score", ids=text)["logprob"] for w in workers}
        ref_ppl = perplexity(text_scores[ref.spec.name])
        models = {}
        for w in workers:
            scores = [w.ask("score", ids=p + t) for p, t in zip(prompts, trajectories, strict=True)]
            models[w.spec.name] = {"precision": w.hello["precision"],
                                   **summarise_quality(trajectories=trajectories, prompts=prompts, scores=scores,
                                                       text_logprob=text_scores[w.spec.name],
                                                       reference_perplexity=ref_ppl)}
        return {"benchmark": "quantized quality vs the fp32 reference", "bundle": str(args.bundle),
                "reference": str(args.reference), "role": args.role, "new_tokens": args.new_tokens,
                "text_tokens": len(text), "models": models}

    result = _run(specs, args, body)
    ours = result["models"][OURS]
    if args.record:
        record_quality(bundle=args.bundle, role=args.role, quality={
            "method": "specreason bench quality (specreason_rt/bench_quality.py)", "reference": "fp32 export",
            **{k: ours[k] for k in ("greedy_agreement", "positions", "prompts", "identical_prefix_mean",
                                   "perplexity", "perplexity_over_reference")}})
    lines = [f"  {len(prompts)} prompts x {args.new_tokens} greedy tokens of the fp32 reference; perplexity over "
             f"{result['text_tokens']} tokens"]
    for name, q in result["models"].items():
        lines.append(f"    {name:<28} {q['precision']:<5} agreement {q['greedy_agreement']:.2%}  identical prefix "
                     f"{q['identical_prefix_mean']:.1f}  perplexity {q['perplexity']:.3f} "
                     f"({q['perplexity_over_reference']:.3f}x fp32)")
    return _emit(result, args, lines)


def _bench_logits(args: argparse.Namespace) -> int:
    result = bench_logits(bundle=args.bundle, role=args.role, prompt_tokens=args.tokens, repeats=args.repeats,
                          threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"prefill of {args.tokens} tokens, {result['role']} ({result['precision']}), median of {args.repeats}:")
    for r in result["results"]:
        print(f"  B={r['branches']}: last position only {r['last_only_ms']:.1f} ms "
              f"({r['last_only_logits_mb']} MB logits) vs all positions {r['all_positions_ms']:.1f} ms "
              f"({r['all_positions_logits_mb']} MB): {r['speedup']}x")
    return 0


def _bench_verify(args: argparse.Namespace) -> int:
    result = bench_verify(bundle=args.bundle, role=args.role, context=args.context, drafts=args.drafts,
                          draft_tokens=args.draft_tokens, repeats=args.repeats, threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    r = result["one_forward_over_one_per_draft"]
    print(f"{args.drafts} drafts x {args.draft_tokens} tokens on a {args.context}-token context "
          f"({result['attention']}, {result['precision']}): one forward {result['one_forward_ms']} ms, one per draft "
          f"{result['one_per_draft_ms']} ms; ratio {r['median']} [{r['min']}..{r['max']}], "
          f"max |logit difference| {result['max_abs_logit_difference']:.2g}")
    return 0


def _fair_arguments(p: argparse.ArgumentParser, *, windows: int) -> None:
    p.add_argument("--bundle", required=True, metavar="DIR", help="our bundle")
    p.add_argument("--role", default="speculator", choices=["speculator", "verifier"],
                   help="which model of the bundle (default: speculator)")
    p.add_argument("--threads", type=int, default=_default_threads(), metavar="N",
                   help="intra-op threads of EVERY system (default: the usable cores, %(default)s here)")
    p.add_argument("--peer", nargs=2, metavar=("KIND[:LABEL]", "PATH"), action="append", default=None,
                   help="a peer in the same run (repeatable): onnxruntime-genai MODEL_DIR (built by "
                        "runtime/peers/build_genai_model.sh) or transformers MODEL (.gguf or HF folder); a :LABEL "
                        "tells two peers of one kind apart; run from the repository root")
    p.add_argument("--peer-python", default=None, metavar="PY",
                   help="python of the peer venv (default: $SPECREASON_PEER_PYTHON; transformers falls back to "
                        "this interpreter)")
    p.add_argument("--windows", type=int, default=windows, help="interleaved windows per cell (default %(default)s)")
    p.add_argument("--gap-ms", type=float, default=50.0,
                   help="idle gap before each window, so no thread pool spins into the next (default 50)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--json", action="store_true", help="print the JSON result (raw per-window data included)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`specreason bench logits|verify|decode|prefill|generate|quality` (registered by the CLI)."""
    bench = sub.add_parser("bench", help="benchmarks with JSON output (fair: all systems loaded, equal threads, "
                                         "interleaved windows)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    logits = bench_sub.add_parser("logits", help="prefill with logits at the last position vs at every position")
    logits.add_argument("--bundle", required=True, metavar="DIR")
    logits.add_argument("--role", default="speculator", choices=["speculator", "verifier"])
    logits.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    logits.add_argument("--repeats", type=int, default=5)
    logits.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    logits.add_argument("--json", action="store_true")
    logits.set_defaults(func=_bench_logits)

    verify = bench_sub.add_parser("verify", help="drafts on one forked context: one forward at B = drafts vs one "
                                                 "forward per draft (ours alone)")
    verify.add_argument("--bundle", required=True, metavar="DIR")
    verify.add_argument("--role", default="verifier", choices=["speculator", "verifier"])
    verify.add_argument("--context", type=int, default=512, help="prompt tokens before the drafts (default 512)")
    verify.add_argument("--drafts", type=int, default=4, help="drafts, one branch each (default 4)")
    verify.add_argument("--draft-tokens", type=int, default=32, help="tokens per draft (default 32)")
    verify.add_argument("--repeats", type=int, default=5, help="interleaved runs of each way (default 5)")
    verify.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_bench_verify)

    decode = bench_sub.add_parser("decode", help="steady-state decode tokens/s per (branches, context), ours and "
                                                 "peers interleaved")
    _fair_arguments(decode, windows=7)
    decode.add_argument("--branches", type=int, nargs="+", default=[1, 4], metavar="B")
    decode.add_argument("--contexts", type=int, nargs="+", default=[64], metavar="T")
    decode.add_argument("--steps", type=int, default=16, help="timed decode steps per window (default 16)")
    decode.add_argument("--warmup", type=int, default=4, help="untimed decode steps after the prefill (default 4)")
    decode.add_argument("--no-floor", action="store_true", help="skip the read-bandwidth measurement (1 GiB)")
    decode.add_argument("--fork", action="store_true",
                        help="ours prefill the prompt once and fork it into the B branches (as best-of-n does) and "
                             "report the KV bytes held; a prefix bundle also runs as specreason-rt:copies (every "
                             "branch its own copy). Compare another of our bundles with --peer specreason-rt:LABEL DIR")
    decode.add_argument("--min-shared-prefix", type=int, default=None, metavar="N",
                        help="with --fork on a prefix bundle: share prompts of at least N tokens (default: the "
                             "runtime's SHARED_PREFIX_MIN_TOKENS)")
    decode.set_defaults(func=_bench_decode)

    prefill = bench_sub.add_parser("prefill", help="one prompt for N branches (ours: prefilled once, forked)")
    _fair_arguments(prefill, windows=5)
    prefill.add_argument("--tokens", type=int, nargs="+", default=[512], metavar="T",
                         help="prompt lengths, one cell each (default 512)")
    prefill.add_argument("--n-specs", type=int, nargs="+", default=[1, 4], metavar="N")
    prefill.set_defaults(func=_bench_prefill)

    generate = bench_sub.add_parser("generate", help="end to end: chat prompt + N greedy tokens, outputs compared")
    _fair_arguments(generate, windows=5)
    generate.add_argument("--prompt", default=DEFAULT_CHAT_PROMPT, help="user message (chat template applied)")
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    generate.add_argument("--new-tokens", type=int, default=128, help="greedy tokens, eos ignored (default 128)")
    generate.set_defaults(func=_bench_generate)

    quality = bench_sub.add_parser("quality", help="a quantized bundle vs its fp32 export (and peers' models): "
                                                   "greedy agreement and perplexity")
    _fair_arguments(quality, windows=1)
    quality.add_argument("--reference", required=True, metavar="DIR", help="the fp32 bundle of the same model")
    quality.add_argument("--new-tokens", type=int, default=64, help="reference tokens per prompt (default 64)")
    quality.add_argument("--text-tokens", type=int, default=1024,
                         help="perplexity over at most this many tokens of the text (default 1024: all of it)")
    quality.add_argument("--record", action="store_true",
                         help="write ours' figures into --bundle's manifest (models.ROLE.validation.quality)")
    quality.set_defaults(func=_bench_quality)
