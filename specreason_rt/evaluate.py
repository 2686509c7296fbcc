"""Accuracy and latency of strategies on a problem set (JSONL), as a table, JSON and an accuracy-vs-latency plot.

Problems file: one JSON object per line, {"id": ..., "question": ..., "answer": ...}. Every strategy runs every
problem with the same seed, one problem at a time (latency is per problem, as a user sees it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .answers import is_correct
from .config import ReasonConfig
from .errors import ConfigError
from .reasoner import Reasoner
from .trace import RunResult


def read_problems(path: str | Path, *, limit: int | None = None) -> list[dict[str, str]]:
    """Problems from a JSONL file; a bad line is an error naming the line and what it lacks."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if not path.is_file():
        raise ConfigError(f"problems file {path} does not exist")
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not all(k in record for k in ("question", "answer")):
            raise ConfigError(f"{path}:{n}: each line needs \"question\" and \"answer\" (and an \"id\")")
        problems.append({"id": str(record.get("id", n)), "question": str(record["question"]),
                         "answer": str(record["answer"])})
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ConfigError(f"{path} holds no problems")
    return problems


def summarize(results: list[RunResult], problems: list[dict[str, str]]) -> dict[str, Any]:
    """The metrics of one strategy over the problems (results[i] answers problems[i])."""
    correct = [is_correct(predicted=r.answer, reference=p["answer"]) for r, p in zip(results, problems, strict=True)]
    latency = np.array([r.seconds for r in results])
    steps = sum(len(r.steps) for r in results)
    drafted = [s for r in results for s in r.steps if s.candidates]
    phases = {k: sum(r.timings[k] for r in results) for k in results[0].timings}
    return {
        "problems": len(results),
        "accuracy": round(float(np.mean(correct)), 4),
        "latency_mean_s": round(float(latency.mean()), 5),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 5),
        "latency_p95_s": round(float(np.percentile(latency, 95)), 5),
        "solution_tokens_per_problem": round(sum(sum(s.tokens for s in r.steps) for r in results) / len(results), 2),
        "speculator_tokens_per_problem": round(sum(r.tokens["speculator"] for r in results) / len(results), 2),
        "verifier_tokens_per_problem": round(sum(r.tokens["verifier"] for r in results) / len(results), 2),
        "acceptance_rate": (round(sum(s.author == "speculator" for s in drafted) / len(drafted), 4)
                            if drafted else None),
        "speculator_step_share": round(sum(r.speculator_steps for r in results) / max(steps, 1), 4),
        "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
    }


def evaluate(*, reasoner: Reasoner, problems: list[dict[str, str]], configs: dict[str, ReasonConfig],
             progress: Callable[[int, int], None] | None = None, records: list[dict] | None = None,
             ) -> dict[str, Any]:
    """Run every named config on every problem; per-config metrics. records (if given) gets one per run.

    The configs take turns on each problem (problem-major order), so a slow spell of a shared machine hits
    every strategy alike instead of whichever happened to run then: the latency ratios stay fair.
    """
    results: dict[str, list[RunResult]] = {name: [] for name in configs}
    for i, problem in enumerate(problems):
        for name, config in configs.items():
            result = reasoner.run(problem["question"], config)
            results[name].append(result)
            if records is not None:
                records.append({"name": name, "id": problem["id"], "reference": problem["answer"],
                                "correct": is_correct(predicted=result.answer, reference=problem["answer"]),
                                **result.to_json()})
        if progress is not None:
            progress(i + 1, len(problems))
    return {"problems": len(problems),
            "strategies": {name: {"config": config.to_json(), **summarize(results[name], problems)}
                           for name, config in configs.items()}}

def table(report: dict[str, Any], *, baseline: str | None = "verifier") -> str:
    """A fixed-width table of the report; speedup is relative to `baseline` when it was run."""
    rows = report["strategies"]
    base = rows.get(baseline, {}).get("latency_mean_s") if baseline else None
    head = (f"{'strategy':<28} {'acc':>6} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8} {'speedup':>8} "
            f"{'tokens':>7} {'accept':>7} {'spec share':>10}")
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        speedup = f"{base / m['latency_mean_s']:.2f}x" if base else "-"
        accept = f"{m['acceptance_rate']:.2f}" if m["acceptance_rate"] is not None else "-"
        lines.append(f"{name:<28} {m['accuracy']:>6.3f} {m['latency_mean_s'] * 1e3:>9.1f} "
                     f"{m['latency_p50_s'] * 1e3:>8.1f} {m['latency_p95_s'] * 1e3:>8.1f} {speedup:>8} "
                     f"{m['solution_tokens_per_problem']:>7.1f} {accept:>7} {m['speculator_step_share']:>10.2f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Accuracy vs mean latency per strategy (like the paper's Fig. 3), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install 'specreason-rt[plot]'") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, m in report["strategies"].items():
        ax.scatter(m["latency_mean_s"] * 1e3, m["accuracy"] * 100, s=36)
        ax.annotate(name, (m["latency_mean_s"] * 1e3, m["accuracy"] * 100), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("mean latency per problem (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"accuracy vs latency, {report['problems']} problems")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)  # never a half-written plot
    return path

