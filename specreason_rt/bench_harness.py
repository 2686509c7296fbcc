"""The fair benchmark: every system in one process tree, all loaded, equal threads, windows interleaved.

A benchmark is an experiment (STYLE.md 14). On a machine whose load drifts, timing all of one system and then
all of another measures the drift as much as the systems (a ratio moved from 0.29x to 1.94x that way), so:

- every system is a worker process (bench_worker.py's protocol) started before any timing, its model loaded;
- every worker gets the same intra-op thread count, set explicitly (ours: SessionOptions, onnxruntime-genai: its
  config overlay's session_options.intra_op_num_threads, torch: torch.set_num_threads), and each worker reports
  the count it applied;
- a measurement is a sequence of windows; window w runs the systems in order A,B,C when w is even and C,B,A
  when it is odd, one at a time, with a short idle gap so that no thread pool still spins into the next window;
- every side gets the same untimed prefill and warm-up steps before its first window (steady state only);
- per window and system the cores really used (process CPU time / wall time) are kept next to the time;
- ratios are paired per window (ours / peer in the same window), then summarised by median and range.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ConfigError, SpecReasonError

# Peer name -> its worker script in the repository (runtime/peers/: each runs in the peer venv).
PEER_SCRIPTS = {
    "onnxruntime-genai": "runtime/peers/genai_bench.py",
    "transformers": "runtime/peers/transformers_bench.py",
}
OURS = "specreason-rt"


class BenchError(SpecReasonError):
    """A worker could not start or answered with an error."""


@dataclass(frozen=True)
class SystemSpec:
    """How to start one system's worker: a label and the command line (threads are appended by the harness)."""

    name: str
    command: tuple[str, ...]


def ours_spec(*, bundle: str | Path, role: str = "speculator", python: str = sys.executable,
              name: str = OURS) -> SystemSpec:
    return SystemSpec(name=name, command=(python, "-m", "specreason_rt.bench_worker", "--bundle", str(bundle),
                                          "--role", role))


def peer_spec(*, name: str, model: str | Path, python: str, repo_root: str | Path = ".") -> SystemSpec:
    if name not in PEER_SCRIPTS:
        raise ConfigError(f"unknown peer {name!r}: choose from {', '.join(PEER_SCRIPTS)}")
    script = Path(repo_root) / PEER_SCRIPTS[name]
    if not script.is_file():
        raise ConfigError(f"peer script {script} not found: run from the repository root")
    if not Path(model).exists():
        raise ConfigError(f"{name} model {model} not found: build it as runtime/peers/README.md says")
    return SystemSpec(name=name, command=(python, str(script), "--worker", "--model", str(model)))


@dataclass
class Worker:
    """A running worker process and its hello line."""

    spec: SystemSpec
    process: subprocess.Popen[str]
    hello: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)  # every timed answer, in order

    def ask(self, op: str, **request: Any) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps({"op": op, **request}) + "\n")
            stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"the {self.spec.name} worker exited: {_stderr_tail(self.process)}") from None
        line = stdout.readline()
        if not line:
            raise BenchError(f"the {self.spec.name} worker exited during {op}: {_stderr_tail(self.process)}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise BenchError(f"the {self.spec.name} worker failed: {answer['error']}")
        if "wall_s" in answer:
            self.log.append({"system": self.spec.name, "op": op, **answer})
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def _stderr_tail(process: subprocess.Popen[str]) -> str:
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "no answer"
    err: IO[str] | None = process.stderr
    lines = err.read().strip().splitlines() if err is not None else []
    return lines[-1] if lines else f"exit status {process.returncode}"


def start_workers(specs: Sequence[SystemSpec], *, threads: int) -> list[Worker]:
    """Start every worker with the same --threads and wait until each has loaded its model."""
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 (every system gets the same explicit count), got {threads}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two systems share a name in {names}: give each a different one")
    workers: list[Worker] = []
    try:
        for spec in specs:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
            try:
                process = subprocess.Popen([*spec.command, "--threads", str(threads)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            except OSError as e:
                raise ConfigError(f"cannot start the {spec.name} worker ({spec.command[0]}: {e}); create the peer "
                                  "venv with runtime/peers/setup_genai.sh") from e
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise BenchError(f"the {spec.name} worker did not start: {_stderr_tail(process)}")
            workers.append(Worker(spec=spec, process=process, hello=json.loads(line)))
            if workers[-1].hello.get("threads") != threads:
                raise BenchError(f"the {spec.name} worker applied {workers[-1].hello.get('threads')} threads, "
                                 f"not {threads}")
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


def window_order(workers: Sequence[Worker], window: int) -> list[Worker]:
    """A,B,C on even windows, C,B,A on odd ones: each system runs first and last equally often."""
    return list(workers) if window % 2 == 0 else list(reversed(workers))


def run_windows(workers: Sequence[Worker], *, windows: int, gap_s: float,
                one: Callable[[Worker], dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """windows x systems answers of `one`, interleaved; answers[w][i] belongs to workers[i]."""
    answers: list[list[dict[str, Any]]] = []
    for w in range(windows):
        row: dict[str, dict[str, Any]] = {}
        for worker in window_order(workers, w):
            time.sleep(gap_s)  # let the previous system's pool threads stop spinning
            row[worker.spec.name] = {**one(worker), "window": w}
        answers.append([row[worker.spec.name] for worker in workers])
    return answers


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(*, threads: int) -> dict[str, Any]:
    return {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "threads_per_system": threads, "python": platform.python_version()}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and range of per-window values (a ratio's spread is its min..max over paired windows)."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def summarise(workers: Sequence[Worker], answers: list[list[dict[str, Any]]], *,
              rate: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """Per system: rate (higher = faster) and cores used per window; paired ratios ours / each peer."""
    systems: dict[str, Any] = {}
    for i, worker in enumerate(workers):
        rows = [a[i] for a in answers]
        systems[worker.spec.name] = {
            "rate": spread([rate(r) for r in rows]),
            "wall_ms": spread([r["wall_s"] * 1e3 for r in rows]),
            "cores_used": spread([r["cpu_s"] / r["wall_s"] for r in rows]),
            "windows_ms": [round(r["wall_s"] * 1e3, 3) for r in rows],
        }
    ratios = {}
    names = [w.spec.name for w in workers]
    if OURS in names:
        mine = names.index(OURS)
        for i, name in enumerate(names):
            if i != mine:
                ratios[f"{OURS}/{name}"] = spread([rate(a[mine]) / rate(a[i]) for a in answers])
    return {"systems": systems, "ratios": ratios}


def fixed_tokens(*, n: int, vocab: int) -> list[int]:
    """The one token sequence every system gets: pseudo-random ids past the first 100 (specials), seed 1234."""
    rng = np.random.default_rng(1234)
    return rng.integers(100, vocab, size=n).tolist()


def common_vocab(workers: Sequence[Worker]) -> int:
    sizes = {w.spec.name: int(w.hello["vocab_size"]) for w in workers}
    if len(set(sizes.values())) != 1:
        raise BenchError(f"the systems run different vocabularies {sizes}: give every system the same model")
    return next(iter(sizes.values()))


def _per_second(answer: dict[str, Any], *, work: float) -> float:
    return work / answer["wall_s"]


def _ask_prefill(worker: Worker, *, ids: list[int], n_specs: int) -> dict[str, Any]:
    return worker.ask("prefill", ids=ids, n_specs=n_specs)


def bench_decode(workers: Sequence[Worker], *, branches: Sequence[int], contexts: Sequence[int], steps: int,
                 windows: int, warmup: int, gap_s: float) -> list[dict[str, Any]]:
    """Per (B, T) cell: every system prefilled with the same T tokens in B rows and warmed up by `warmup`
    steps (untimed), then `windows` interleaved windows of `steps` decode steps each."""
    vocab = common_vocab(workers)
    cells = []
    for t in contexts:
        ids = fixed_tokens(n=t, vocab=vocab)
        for b in branches:
            started = {w.spec.name: w.ask("decode_start", ids=ids, branches=b, warmup=warmup,
                                          max_new=windows * steps + 1) for w in workers}
            answers = run_windows(workers, windows=windows, gap_s=gap_s,
                                  one=lambda w: w.ask("decode_window", steps=steps))
            summary = summarise(workers, answers, rate=functools.partial(_per_second, work=b * steps))  # tokens/s
            for name, answer in started.items():  # what ours' caches held (bench_worker.py), when reported
                for key in ("kv_bytes", "shared_prefix_tokens"):
                    if key in answer:
                        summary["systems"][name][key] = answer[key]
            cells.append({"branches": b, "context": t, "steps_per_window": steps, **summary})
    return cells


def bench_prefill(workers: Sequence[Worker], *, prompt_tokens: int, n_specs: Sequence[int], windows: int,
                  gap_s: float) -> list[dict[str, Any]]:
    """Per n_specs: one `prompt_tokens` prompt for n_specs branches, timed, in interleaved windows (one
    untimed run of each shape first, everywhere)."""
    ids = fixed_tokens(n=prompt_tokens, vocab=common_vocab(workers))
    cells = []
    for n in n_specs:
        for w in workers:
            w.ask("prefill", ids=ids, n_specs=n)  # warm-up: arenas, kernels
        answers = run_windows(workers, windows=windows, gap_s=gap_s,
                              one=functools.partial(_ask_prefill, ids=ids, n_specs=n))
        summary = summarise(workers, answers, rate=lambda r: 1.0 / r["wall_s"])  # prefills per second
        cells.append({"n_specs": n, "prompt_tokens": prompt_tokens, **summary})
    return cells


def bench_generate(workers: Sequence[Worker], *, prompt: list[int], new_tokens: int, windows: int,
                   gap_s: float) -> dict[str, Any]:
    """End to end: the same prompt ids, then exactly new_tokens greedy tokens, wall time including prefill;
    one untimed run first everywhere. Outputs are compared token by token against ours."""
    for w in workers:
        w.ask("generate", ids=prompt, new_tokens=min(new_tokens, 4))  # warm-up
    answers = run_windows(workers, windows=windows, gap_s=gap_s,
                          one=lambda w: w.ask("generate", ids=prompt, new_tokens=new_tokens))
    summary = summarise(workers, answers, rate=lambda r: new_tokens / r["wall_s"])  # tokens/s end to end
    names = [w.spec.name for w in workers]
    reference = answers[0][names.index(OURS)]["tokens"] if OURS in names else answers[0][0]["tokens"]
    outputs = {}
    for i, name in enumerate(names):
        tokens = answers[0][i]["tokens"]
        same = next((k for k, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens))
        outputs[name] = {"tokens": tokens, "identical_to_ours": tokens == reference,
                         "first_difference": None if tokens == reference else same,
                         "deterministic": all(a[i]["tokens"] == tokens for a in answers)}
    return {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "timing": summary, "outputs": outputs}


def describe(workers: Sequence[Worker], *, threads: int) -> dict[str, Any]:
    return {"machine": machine_facts(threads=threads),
            "systems": {w.spec.name: {**w.hello, "command": list(w.spec.command)} for w in workers},
            "method": "one worker process per system, all loaded first; the same intra-op threads everywhere; "
                      "windows interleaved A,B,C / C,B,A; untimed prefill and warm-up on every side; "
                      "cores_used = process CPU time / wall time per window; ratios paired per window"}
