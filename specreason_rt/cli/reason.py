"""`specreason run` and `specreason eval`: the reasoning strategies from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..answers import CUT_OFF, expected_format, final_answer
from ..config import PRESETS, STRATEGIES, ReasonConfig, make_config
from ..errors import ConfigError
from .common import add_bundle_argument, add_provider_arguments, provider_config, text_argument

if TYPE_CHECKING:
    from ..trace import RunResult


def _field_default(key: str) -> Any:
    """The built-in default of SECTION.FIELD (its type tells how to read a --set value), or None if unknown."""
    section, _, name = key.partition(".")
    part = getattr(ReasonConfig(), section, None)
    if part is None or not dataclasses.is_dataclass(part):
        return None
    return getattr(part, name, None)


def _value(key: str, text: str) -> Any:
    """A --set value, read as the field's type: text fields take the text as written (a judge prompt "5" is a
    prompt), numbers and booleans parse as JSON and must be one. Unknown fields pass through; make_config names
    them. Ranges are the config's to check."""
    default = _field_default(key)
    if isinstance(default, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--set {key}: expects true or false, got {text!r}")
    elif isinstance(default, int | float):
        kind = "an integer" if isinstance(default, int) else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"--set {key}: expects {kind} (default {default}), got {text!r}")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    shortcuts = {"stepwise.threshold": args.threshold, "search.n_specs": args.n_specs, "score.mode": args.score_mode,
                 "limits.max_tokens": args.max_tokens, "answer.format": args.answer_format}
    out: dict[str, Any] = {k: v for k, v in shortcuts.items() if v is not None}
    for item in args.set or []:  # after the shortcuts: an explicit --set wins
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE (e.g. stepwise.threshold=5), got {item!r}")
        out[key] = _value(key, value)
    out["seed"] = args.seed
    return out


def _reasoner(args: argparse.Namespace):  # noqa: ANN202 - the import stays lazy
    from ..reasoner import Reasoner

    return Reasoner(args.bundle, providers=provider_config(args), intra_op_threads=args.threads)


def check_output_file(path: str | Path, *, flag: str) -> Path:
    """Refuse an output path that cannot be written before the run, not after it (the run's result would be lost)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag}: {path} is a directory; give a file name, e.g. {path / 'out.json'}")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag}: the folder of {path} does not exist; create it or choose another")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{flag}: the folder of {path} is not writable")
    return path


def _write_atomic(path: Path, text: str, *, flag: str) -> None:
    """Never a half-written file: write beside it, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{flag}: cannot write {path}: {e.strerror}") from None


# How the finish reasons of a cut-off solution (answers.CUT_OFF) read in a summary.
_STOPPED = {"budget": "stopped at the token budget (limits.max_tokens)",
            "depth": "stopped at the step limit (search.max_depth)",
            "repeat": "stopped after two identical steps"}
_SOURCES = {"answer_line": "its 'Answer:' line", "boxed": "its \\boxed{}",
            "answer phrase": "the phrase 'the answer is ...'", "last number": "the last number of the solution"}


def summary(result: RunResult) -> str:
    """One plain line: who wrote the steps, how the run ended, how long it took.
    e.g. '3 steps: 2 drafted by the speculator and accepted, 1 drafted, rejected and rewritten by the verifier; 25.7 ms'
    """
    n = len(result.steps)
    steps = f"{n} step{'' if n == 1 else 's'}"
    if result.strategy == "stepwise":
        accepted = sum(s.author == "speculator" and bool(s.candidates) for s in result.steps)
        rejected = sum(s.author == "verifier" and bool(s.candidates) for s in result.steps)
        direct = sum(not s.candidates for s in result.steps)
        parts = [f"{accepted} drafted by the speculator and accepted" if accepted else "",
                 f"{rejected} drafted, rejected and rewritten by the verifier" if rejected else "",
                 f"{direct} written by the verifier without a draft" if direct else ""]
        body = f"{steps}: {', '.join(p for p in parts if p)}" if n else steps
    elif result.strategy in ("speculator", "verifier"):
        body = f"{steps}, all by the {result.strategy} (a baseline: no other model involved)"
    elif result.strategy == "majority":
        model = result.config.get("search", {}).get("majority_model", "speculator")
        body = f"{steps}: the majority answer of {len(result.candidates)} trajectories by the {model}"
    elif result.strategy == "tree":
        body = f"{steps}: the best leaf of the speculator's tree search, scored by the verifier"
    else:  # best_of_n
        kept, sampled = len(result.candidates), result.details.get("sampled", len(result.candidates))
        first = f" (the first {kept} of {sampled} to finish)" if kept < sampled else ""
        what = "the one speculator trajectory" if kept == 1 else f"the best of {kept} speculator trajectories"
        body = f"{steps}: {what}{first}, scored by the verifier"
    stopped = _STOPPED.get(result.finish)
    return "; ".join([body, *([stopped] if stopped else []), f"{result.seconds * 1e3:.1f} ms"])


def answer_line(result: RunResult, *, fmt: str) -> str:
    """'answer: X', saying where X came from when the solution lacks the expected format, or what was expected."""
    if result.answer is not None:
        return f"answer: {result.answer}"
    expected = expected_format(fmt)
    if result.finish in CUT_OFF:  # its last number is not an answer
        return f"answer: (none): {_STOPPED.get(result.finish, 'cut off')} before the solution wrote its {expected}"
    found, source = final_answer(result.text, fmt=fmt)
    if found is not None and source is not None:
        return f"answer: {found} (read from {_SOURCES[source]}: the solution has no {expected})"
    other = expected_format("boxed" if fmt == "answer_line" else "answer_line")
    return (f"answer: (none): the solution has no {expected} (--answer-format {fmt}), no {other}, "
            "no 'the answer is ...' and no number")


def _run(args: argparse.Namespace) -> int:
    # Space around a question means nothing, but the models see it: `echo 37+45*3 | specreason run -` would
    # otherwise solve "37+45*3\n", a prompt the built-in pair never saw.
    problem = text_argument(args.problem, what="problem").strip()
    config = make_config(strategy=args.strategy, preset=args.preset, **_overrides(args))
    trace = check_output_file(args.trace, flag="--trace") if args.trace else None
    reasoner = _reasoner(args)
    stream = not args.json and sys.stdout.isatty()

    def on_step(step: Any) -> None:
        if stream:
            sys.stdout.write(f"[{step.author}] {step.text}")
            sys.stdout.flush()

    result = reasoner.run(problem, config, on_step=on_step if stream else None)
    data = result.to_json()
    data["final_answer"], data["final_answer_source"] = final_answer(
        result.text, fmt=config.answer.format, cut_off=result.finish in CUT_OFF)
    if trace is not None:
        _write_atomic(trace, json.dumps(data, indent=2) + "\n", flag="--trace")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    print(answer_line(result, fmt=config.answer.format))
    print(f"{result.strategy}: {summary(result)}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, ReasonConfig]:
    configs: dict[str, ReasonConfig] = {}
    for strategy in args.strategy:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
        # Not given: the configured value, one row; off / on / both: that value, or a row each.
        choices: dict[str | None, list[bool | None]] = {None: [None], "off": [False], "on": [True],
                                                        "both": [False, True]}
        overlaps, adaptives = choices[args.overlap], choices[args.adaptive]
        if strategy == "stepwise" and (args.thresholds or args.lookaheads or args.overlap or args.adaptive):
            # One row per (threshold, lookahead, adaptive, overlap); an axis not given keeps the configured value.
            for t, k, a, o in itertools.product(args.thresholds or [None], args.lookaheads or [None], adaptives,
                                                overlaps):
                if a and k == 1:
                    continue  # adaptive chooses between 1 and the lookahead: nothing to choose at 1
                parts = ([f"threshold={t:g}"] if t is not None else []) + \
                    ([f"lookahead={k}"] if k is not None else []) + \
                    ([] if a is None or k == 1 else ["adaptive" if a else "fixed"]) + \
                    ([] if o is None else ["overlap" if o else "sequential"])
                over = {**base, **({"stepwise.threshold": t} if t is not None else {}),
                        **({"stepwise.lookahead": k} if k is not None else {}),
                        **({"stepwise.adaptive_lookahead": a} if a is not None else {}),
                        **({"stepwise.overlap": o} if o is not None else {})}
                name = f"stepwise({','.join(parts)})" if parts else "stepwise"
                configs[name] = make_config(strategy=strategy, preset=args.preset, **over)
        elif strategy == "best_of_n" and (args.stop_after or args.overlap):
            # One row per (stop_after, overlap); an axis not given keeps the configured value.
            for m, o in itertools.product(args.stop_after or [None], overlaps):
                parts = ([f"stop_after={m}"] if m else []) + ([] if o is None else ["overlap" if o else "sequential"])
                over = {**base, **({"search.stop_after": m} if m is not None else {}),
                        **({"search.overlap": o} if o is not None else {})}
                name = f"best_of_n({','.join(parts)})" if parts else "best_of_n"
                configs[name] = make_config(strategy=strategy, preset=args.preset, **over)
        else:
            configs[strategy] = make_config(strategy=strategy, preset=args.preset, **base)
    return configs


def _eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate, parse_fields, plot, read_problems, speedups, table

    fields = parse_fields(args.fields) if args.fields else None
    problems = read_problems(args.problems, limit=args.limit, fields=fields)
    # Every output is checked before minutes of evaluation, not after.
    records_path = check_output_file(args.records, flag="--records") if args.records else None
    if args.plot:
        _check_plot(args.plot)
    if args.plot_by_length:
        _check_plot(args.plot_by_length)
        if not any("length" in p for p in problems):
            raise ConfigError("--plot-by-length needs problems with a length field ('steps' or 'length')")
    configs = _sweep(args, _overrides(args))
    if args.baseline is not None and args.baseline not in configs:
        raise ConfigError(f"--baseline {args.baseline!r} is not one of the strategies run: {', '.join(configs)}")
    reasoner = _reasoner(args)
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rproblem {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    records: list[dict] | None = [] if records_path is not None else None
    report = evaluate(reasoner=reasoner, problems=problems, configs=configs, progress=progress, records=records)
    report["bundle"] = str(args.bundle)
    report["problems_file"] = str(args.problems)
    baseline = args.baseline or ("verifier" if "verifier" in configs else next(iter(configs)))
    report["speedup_baseline"] = baseline
    for name, ratio in speedups(report, baseline=baseline).items():
        report["strategies"][name]["speedup"] = ratio
    if records is not None and records_path is not None:
        _write_atomic(records_path, "".join(json.dumps(r) + "\n" for r in records), flag="--records")
    if args.plot:
        plot(report, args.plot)
    if args.plot_by_length:
        plot(report, args.plot_by_length, by_length=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report, baseline=baseline))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _check_plot(path: str) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'specreason-rt[plot]'")
    check_output_file(path, flag="--plot")


def _common(p: argparse.ArgumentParser) -> None:
    add_bundle_argument(p)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="the seed's presets: n_specs / max_depth / temperature = default 4/8/0.7, "
                        "efficient 2/6/0.8, quality 8/12/0.6")
    p.add_argument("--threshold", type=float, default=None, help="stepwise: accept drafts scoring >= this (0-9)")
    p.add_argument("--n-specs", type=int, default=None, help="best_of_n / majority: trajectories per problem")
    p.add_argument("--score-mode", default=None, choices=["likelihood", "judge", "head"],
                   help="how the verifier scores (default likelihood)")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget of a solution (default 512)")
    p.add_argument("--answer-format", default=None, choices=["answer_line", "boxed"],
                   help="where the answer is read: 'Answer: X' (default) or \\boxed{X}")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="any config field, repeatable: e.g. --set stepwise.candidates=2 --set verifier.temperature=0.5")
    p.add_argument("--seed", type=int, default=0, help="one seed for the run (each model has its own stream)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0: auto = 1 for models under 10M parameters, else all cores)")
    add_provider_arguments(p)


def add_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="solve one problem with a strategy (stepwise by default)",
                         description="Solve PROBLEM with the bundle's speculator and verifier. Strategies: "
                         "stepwise (the paper's accept-or-fallback), best_of_n, tree, and the baselines speculator, "
                         "verifier, majority. Steps stream to a terminal as they are committed.")
    run.add_argument("problem", metavar="PROBLEM", help="the question, or - to read it from stdin")
    run.add_argument("--strategy", default="stepwise", choices=list(STRATEGIES))
    run.add_argument("--json", action="store_true", help="print the whole result with its trace as JSON")
    run.add_argument("--trace", metavar="FILE", help="also write the result and trace as JSON to FILE")
    _common(run)
    run.set_defaults(func=_run)
    ev = sub.add_parser("eval", help="accuracy and latency of strategies on a JSONL problem set",
                        description="Run each strategy on every problem of FILE.jsonl (lines of {\"id\", "
                        "\"question\", \"answer\"}, or see --fields) and print accuracy, mean/p50/p95 latency, "
                        "speedup, tokens, acceptance rate and the speculator's share of steps, then per problem the "
                        "steps drafted, accepted and rejected, wasted speculator tokens, verifier passes and time per "
                        "phase, and, when problems carry a length (a 'steps' or 'length' field), accuracy and speedup "
                        "by length. The built-in task's "
                        "held-out split: python -m specreason_models.task --heldout FILE.")
    ev.add_argument("--problems", required=True, metavar="FILE.jsonl",
                    help="one JSON object per line; question and answer are read from question/answer, "
                         "problem/solution, prompt/target or input/output (GSM8K's '#### X' and MATH's \\boxed{X} "
                         "references are reduced to X)")
    ev.add_argument("--fields", metavar="question=F,answer=F[,id=F]",
                    help="the problem file's own field names, e.g. --fields question=query,answer=gold")
    ev.add_argument("--baseline", metavar="NAME",
                    help="the strategy speedups are relative to (default: verifier when run, else the first)")
    ev.add_argument("--strategy", nargs="+", default=["verifier", "speculator", "stepwise", "best_of_n"],
                    metavar="S", help=f"strategies to compare (from {', '.join(STRATEGIES)})")
    ev.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                    help="run stepwise once per threshold (a sweep), e.g. --thresholds 3 5 7 9")
    ev.add_argument("--lookaheads", type=int, nargs="+", metavar="L",
                    help="run stepwise once per lookahead (steps drafted per verifier pass), e.g. --lookaheads 1 4; "
                         "with --thresholds, once per pair")
    ev.add_argument("--adaptive", choices=["off", "on", "both"], default=None,
                    help="stepwise: choose each round's lookahead (up to --lookaheads L) from the run's recent "
                         "acceptance rate (on), draft L steps every round (off), or a row each (both); default: "
                         "the config's stepwise.adaptive_lookahead (true)")
    ev.add_argument("--overlap", choices=["off", "on", "both"], default=None,
                    help="stepwise: pipeline the speculator's next chain with the verifier's scoring; best_of_n: "
                         "the verifier reads each step as the speculator writes it; where each model has a core "
                         "(on), the models in turn (off), or a row each (both); the output is the same; default: "
                         "the config's stepwise.overlap / search.overlap (true)")
    ev.add_argument("--stop-after", type=int, nargs="+", metavar="M",
                    help="run best_of_n once per M: stop sampling once M trajectories have finished and choose "
                         "among them (0: wait for all n_specs), e.g. --stop-after 0 2")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.add_argument("--plot", metavar="FILE.png", help="write accuracy vs latency per strategy as a PNG")
    ev.add_argument("--plot-by-length", metavar="FILE.png",
                    help="write accuracy vs latency by problem length (one line per strategy) as a PNG")
    ev.add_argument("--records", metavar="FILE.jsonl", help="write every run's result and trace, one per line")
    _common(ev)
    ev.set_defaults(func=_eval)
