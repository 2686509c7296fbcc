"""Accuracy and latency of strategies on a problem set (JSONL), as a table, JSON and an accuracy-vs-latency plot.

Problems file: one JSON object per line. The question and the reference answer are read from the first field
present of FIELD_NAMES (question/answer, problem/solution, as common data sets name them), or from the fields a
FieldMap names (`specreason eval --fields question=prompt,answer=target`). A reference in a data set's own
convention is reduced to its answer (answers.reference_answer: GSM8K's "#### 72", MATH's \\boxed{}).
Every strategy runs every problem with the same seed, one problem at a time (latency is per problem, as a user
sees it).

Problems may carry a length (a `steps` or `length` field, an integer: the built-in task writes its chains' step
counts); then the report gains a by-length breakdown (accuracy, mean latency, speedup, acceptance per length).

Per problem, each strategy's accounting (means over the problems): steps drafted / accepted / rejected by the
verifier, wasted speculator tokens (drafted, then dropped), verifier scoring passes and all verifier forwards,
and seconds per phase (prefill, speculate, verify, fallback, select).

Accuracy counts the answer in the configured format only (what the strategies vote and stop on);
`accuracy_lenient` also reads answers the solution gave in another way (answers.final_answer), which is what a
chat model that ignores the format gets credit for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .answers import CUT_OFF, final_answer, is_correct, reference_answer
from .config import ReasonConfig
from .errors import ConfigError
from .reasoner import Reasoner
from .trace import RunResult

# Field names tried in order when no mapping is given: {our name: names data sets use}.
FIELD_NAMES = {"question": ("question", "problem", "prompt", "input"),
               "answer": ("answer", "solution", "target", "output"),
               "id": ("id", "unique_id", "idx")}
LENGTH_FIELDS = ("steps", "length")  # an optional integer per problem: the by-length breakdown groups on it


def parse_fields(text: str) -> dict[str, str]:
    """`question=prompt,answer=target[,id=key]` -> {"question": "prompt", ...}."""
    mapping: dict[str, str] = {}
    for part in text.split(","):
        ours, sep, theirs = (x.strip() for x in part.partition("="))
        if not sep or ours not in FIELD_NAMES or not theirs:
            raise ConfigError(f"--fields expects question=FIELD,answer=FIELD[,id=FIELD], got {text!r}")
        mapping[ours] = theirs
    return mapping


def read_problems(path: str | Path, *, limit: int | None = None,
                  fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Problems from a JSONL file; a bad line is an error naming the line and what it lacks."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if not path.is_file():
        raise ConfigError(f"problems file {path} does not exist")
    names = {k: ((fields[k],) if fields and k in fields else v) for k, v in FIELD_NAMES.items()}
    problems = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{n}: each line must be a JSON object")
        found = {k: next((record[f] for f in v if f in record), None) for k, v in names.items()}
        for k in ("question", "answer"):
            if found[k] is None:
                raise ConfigError(f"{path}:{n}: no {k} field: each line needs one of "
                                  f"{', '.join(repr(f) for f in names[k])} (or name it: --fields question=...,"
                                  "answer=...)")
        problem: dict[str, Any] = {"id": str(found["id"] if found["id"] is not None else n),
                                   "question": str(found["question"]), "answer": reference_answer(str(found["answer"]))}
        length = next((record[f] for f in LENGTH_FIELDS if f in record), None)
        if length is not None:
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise ConfigError(f"{path}:{n}: the length field ({'/'.join(LENGTH_FIELDS)}) must be an integer "
                                  f">= 0, got {length!r}")
            problem["length"] = length
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ConfigError(f"{path} holds no problems")
    return problems


def lenient_answer(result: RunResult) -> str | None:
    fmt = result.config.get("answer", {}).get("format", "answer_line")
    return final_answer(result.text, fmt=fmt, cut_off=result.finish in CUT_OFF)[0]


def accounting(results: list[RunResult]) -> dict[str, Any]:
    """Per problem means of where the work went (trace.DraftCounts, forwards, phase seconds)."""
    n = len(results)

    def mean(values: list[float]) -> float:
        return round(sum(values) / n, 4)

    return {
        "steps": mean([len(r.steps) for r in results]),
        "drafted": mean([r.drafts.drafted for r in results]),
        "accepted": mean([r.drafts.accepted for r in results]),
        "rejected": mean([r.drafts.rejected for r in results]),
        "wasted_speculator_tokens": mean([r.drafts.wasted_tokens for r in results]),
        "verify_passes": mean([r.drafts.verify_passes for r in results]),
        "verifier_forwards": mean([r.forwards["verifier"] for r in results]),
        "speculator_forwards": mean([r.forwards["speculator"] for r in results]),
        "phase_seconds": {k: round(sum(r.timings[k] for r in results) / n, 6) for k in results[0].timings},
    }


def summarize(results: list[RunResult], problems: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of one strategy over the problems (results[i] answers problems[i])."""
    pairs = list(zip(results, problems, strict=True))
    correct = [is_correct(predicted=r.answer, reference=p["answer"]) for r, p in pairs]
    lenient = [is_correct(predicted=lenient_answer(r), reference=p["answer"]) for r, p in pairs]
    latency = np.array([r.seconds for r in results])
    steps = sum(len(r.steps) for r in results)
    drafted = [s for r in results for s in r.steps if s.candidates]
    phases = {k: sum(r.timings[k] for r in results) for k in results[0].timings}
    return {
        "problems": len(results),
        "accuracy": round(float(np.mean(correct)), 4),
        "accuracy_lenient": round(float(np.mean(lenient)), 4),
        "answered": round(float(np.mean([r.answer is not None for r in results])), 4),
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
        "per_problem": accounting(results),
    }


def by_length(results: dict[str, list[RunResult]], problems: list[dict[str, Any]]) -> dict[str, Any]:
    """{length: {strategy: metrics}} over the problems that carry a length (others are left out)."""
    lengths = sorted({p["length"] for p in problems if "length" in p})
    out: dict[str, Any] = {}
    for length in lengths:
        index = [i for i, p in enumerate(problems) if p.get("length") == length]
        rows = {}
        for name, runs in results.items():
            m = summarize([runs[i] for i in index], [problems[i] for i in index])
            rows[name] = {k: m[k] for k in ("problems", "accuracy", "latency_mean_s", "acceptance_rate")}
            rows[name]["accounting"] = m["per_problem"]
        out[str(length)] = rows
    return out


def evaluate(*, reasoner: Reasoner, problems: list[dict[str, Any]], configs: dict[str, ReasonConfig],
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
                                "final_answer": lenient_answer(result),
                                **result.to_json()})
        if progress is not None:
            progress(i + 1, len(problems))
    report: dict[str, Any] = {
        "problems": len(problems),
        "strategies": {name: {"config": config.to_json(), **summarize(results[name], problems)}
                       for name, config in configs.items()}}
    if any("length" in p for p in problems):
        report["by_length"] = by_length(results, problems)
    return report

def speedup_baseline(report: dict[str, Any], wanted: str | None = None) -> str:
    """The row speedups are relative to: `wanted`, else the verifier alone (the model SpecReason accelerates),
    else the first row."""
    rows = report["strategies"]
    if wanted is not None:
        if wanted not in rows:
            raise ConfigError(f"--baseline {wanted!r} was not run: choose from {', '.join(rows)}")
        return wanted
    return "verifier" if "verifier" in rows else next(iter(rows))


def speedups(report: dict[str, Any], *, baseline: str) -> dict[str, float | None]:
    """Per row: the baseline's mean latency / the row's (above 1: faster than the baseline)."""
    base = report["strategies"][baseline]["latency_mean_s"]
    return {name: (round(base / m["latency_mean_s"], 3) if m["latency_mean_s"] > 0 else None)
            for name, m in report["strategies"].items()}


def table(report: dict[str, Any], *, baseline: str | None = None) -> str:
    """A fixed-width table of the report; the speedup column is headed by its baseline ('vs verifier') and a
    line under the table says what it is."""
    rows = report["strategies"]
    base_name = speedup_baseline(report, baseline)
    ratio = speedups(report, baseline=base_name)
    label = f"vs {base_name}"
    width = max(8, len(label))
    head = (f"{'strategy':<28} {'acc':>6} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8} {label:>{width}} "
            f"{'tokens':>7} {'accept':>7} {'spec share':>10}")
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        speedup = f"{ratio[name]:.2f}x" if ratio[name] is not None else "-"
        accept = f"{m['acceptance_rate']:.2f}" if m["acceptance_rate"] is not None else "-"
        lines.append(f"{name:<28} {m['accuracy']:>6.3f} {m['latency_mean_s'] * 1e3:>9.1f} "
                     f"{m['latency_p50_s'] * 1e3:>8.1f} {m['latency_p95_s'] * 1e3:>8.1f} {speedup:>{width}} "
                     f"{m['solution_tokens_per_problem']:>7.1f} {accept:>7} {m['speculator_step_share']:>10.2f}")
    lines.append(f"{label}: speedup = mean latency of {base_name} / mean latency of the row "
                 f"(above 1: faster than {base_name})")
    lines += accounting_table(report)
    if "by_length" in report:
        lines += length_table(report, baseline=base_name)
    for name, m in rows.items():
        if m.get("accuracy_lenient", m["accuracy"]) != m["accuracy"]:
            lines.append(f"{name}: {1 - m['answered']:.0%} of solutions lack the answer format; read leniently "
                         f"(last number, 'the answer is'), accuracy would be {m['accuracy_lenient']:.3f}")
    return "\n".join(lines)


def accounting_table(report: dict[str, Any]) -> list[str]:
    """Per problem: drafted / accepted / rejected steps, wasted speculator tokens, verifier passes, phase ms."""
    rows = report["strategies"]
    head = (f"{'per problem':<28} {'drafted':>7} {'accept':>7} {'reject':>7} {'wasted':>7} {'v.pass':>7} "
            f"{'v.fwd':>7} {'spec ms':>8} {'verify ms':>9} {'fallbk ms':>9} {'prefill ms':>10}")
    lines = ["", head, "-" * len(head)]
    for name, m in rows.items():
        a = m["per_problem"]
        ph = a["phase_seconds"]
        lines.append(f"{name:<28} {a['drafted']:>7.2f} {a['accepted']:>7.2f} {a['rejected']:>7.2f} "
                     f"{a['wasted_speculator_tokens']:>7.1f} {a['verify_passes']:>7.2f} {a['verifier_forwards']:>7.1f} "
                     f"{ph['speculate'] * 1e3:>8.2f} {ph['verify'] * 1e3:>9.2f} {ph['fallback'] * 1e3:>9.2f} "
                     f"{ph['prefill'] * 1e3:>10.2f}")
    lines.append("drafted/accept/reject: steps; wasted: speculator tokens dropped; v.pass: verifier scoring passes; "
                 "v.fwd: all verifier forwards")
    return lines


def length_table(report: dict[str, Any], *, baseline: str) -> list[str]:
    """By length (the problems' step count): accuracy and speedup vs the baseline, per strategy."""
    names = list(report["strategies"])
    head = f"{'length':>6} {'n':>5} " + " ".join(f"{name[:22]:>22}" for name in names)
    lines = ["", f"by length: accuracy / speedup vs {baseline}", head, "-" * len(head)]
    for length, rows in report["by_length"].items():
        base = rows[baseline]["latency_mean_s"]
        cells = []
        for name in names:
            r = rows[name]
            speed = base / r["latency_mean_s"] if r["latency_mean_s"] > 0 else float("nan")
            cells.append(f"{r['accuracy']:>6.3f} / {speed:>5.2f}x".rjust(22))
        lines.append(f"{length:>6} {rows[names[0]]['problems']:>5} " + " ".join(cells))
    return lines


def label_box(label: Any, renderer: Any) -> Any:
    """The display box of a label's text alone (an Annotation's own box also spans its leader line)."""
    from matplotlib.text import Text

    label.update_positions(renderer)  # where the offset puts the text now
    return Text.get_window_extent(label, renderer)


def _place_labels(fig: Any, ax: Any, labels: list[Any]) -> None:
    """Move overlapping labels apart: each label starts up-right of its point (up-left at the right edge); in
    order of height, a label that overlaps one already placed moves up past it, and a thin line joins a moved
    label to its point. Offsets are in points, so they hold whatever the axes limits become.

    adjustText was tried first: it leaves labels of points at the same accuracy (a threshold sweep) on top of
    each other, since their vertical forces cancel. This stacking is deterministic and never overlaps.
    """
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []  # bounding boxes (display pixels) of labels already placed
    frame = ax.get_window_extent(renderer)
    px_per_pt = fig.dpi / 72
    order = sorted(range(len(labels)), key=lambda i: (labels[i].xy[1], labels[i].xy[0]))
    for i in order:
        label = labels[i]
        box = label_box(label, renderer)
        if box.x1 > frame.x1:  # would leave the axes on the right: put it left of its point
            label.set_position((-5 - box.width / px_per_pt, 4))
            box = label_box(label, renderer)
        dy = 0.0
        while any(box.translated(0, dy).overlaps(other) for other in placed):
            other = max((o for o in placed if box.translated(0, dy).overlaps(o)), key=lambda o: o.y1)
            dy = other.y1 - box.y0 + 2
        if dy:  # moved: the same label higher, with a line back to its point
            x, y = label.get_position()
            label.remove()
            label = labels[i] = ax.annotate(label.get_text(), label.xy, xytext=(x, y + dy / px_per_pt),
                                            textcoords="offset points", fontsize=label.get_fontsize(),
                                            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
        placed.append(label_box(label, renderer))


def figure(report: dict[str, Any], *, title: str = "") -> tuple[Any, list[Any]]:
    """Accuracy vs mean latency per strategy (like the paper's Fig. 3): (matplotlib figure, its label artists).
    Labels never overlap (_place_labels): strategies of a sweep often share a point."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install 'specreason-rt[plot]'") from None
    fig: Any
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = report["strategies"]
    xs = [m["latency_mean_s"] * 1e3 for m in rows.values()]  # [strategies] ms
    ys = [m["accuracy"] * 100 for m in rows.values()]  # [strategies] %
    ax.scatter(xs, ys, s=36, c=[f"C{i % 10}" for i in range(len(xs))], zorder=3)
    ax.set_xlabel("mean latency per problem (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"accuracy vs latency, {report['problems']} problems")
    ax.grid(alpha=0.3)
    ax.margins(x=0.1, y=0.1)
    labels: list[Any] = []
    for _ in range(4):  # stacked labels above the top of the axes: raise the top and lay out again
        for label in labels:
            label.remove()
        labels = [ax.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
                  for name, x, y in zip(rows, xs, ys, strict=True)]
        fig.tight_layout()
        _place_labels(fig, ax, labels)
        renderer = fig.canvas.get_renderer()
        top = max(label_box(label, renderer).y1 for label in labels)
        frame = ax.get_window_extent(renderer)
        if top <= frame.y1:
            break
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + (top - frame.y1 + 4) / frame.height * (high - low) * 1.5)
    return fig, labels


def figure_by_length(report: dict[str, Any]) -> Any:
    """Accuracy vs mean latency by problem length: one line per strategy through its per-length points
    (shortest to longest), each point marked with its length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install 'specreason-rt[plot]'") from None
    if "by_length" not in report:
        raise ConfigError("a plot by length needs problems with a length field ('steps' or 'length')")
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    lengths = list(report["by_length"])
    for i, name in enumerate(report["strategies"]):
        xs = [report["by_length"][k][name]["latency_mean_s"] * 1e3 for k in lengths]  # [lengths] ms
        ys = [report["by_length"][k][name]["accuracy"] * 100 for k in lengths]  # [lengths] %
        ax.plot(xs, ys, "-o", ms=3, lw=1, color=f"C{i % 10}", label=name)
        for k, x, y in zip(lengths, xs, ys, strict=True):
            ax.annotate(k, (x, y), xytext=(2, 2), textcoords="offset points", fontsize=6, color=f"C{i % 10}")
    ax.set_xlabel("mean latency per problem (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs latency by length (steps), {report['problems']} problems")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(report: dict[str, Any], path: str | Path, *, title: str = "", by_length: bool = False) -> Path:
    """figure() (or figure_by_length()) as a PNG at `path`, written whole or not at all."""
    import matplotlib.pyplot as plt

    fig = figure_by_length(report) if by_length else figure(report, title=title)[0]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)  # never a half-written plot
    return path
