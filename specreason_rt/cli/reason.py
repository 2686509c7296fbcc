"""`specreason run` and `specreason eval`: the reasoning strategies from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import PRESETS, STRATEGIES, ReasonConfig, make_config
from ..errors import ConfigError
from .common import add_bundle_argument, add_provider_arguments, provider_config


def _value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, true/false, null), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    shortcuts = {"stepwise.threshold": args.threshold, "search.n_specs": args.n_specs, "score.mode": args.score_mode,
                 "limits.max_tokens": args.max_tokens, "answer.format": args.answer_format}
    out: dict[str, Any] = {k: v for k, v in shortcuts.items() if v is not None}
    for item in args.set or []:  # after the shortcuts: an explicit --set wins
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE (e.g. stepwise.threshold=5), got {item!r}")
        out[key] = _value(value)
    out["seed"] = args.seed
    return out


def _reasoner(args: argparse.Namespace):  # noqa: ANN202 - the import stays lazy
    from ..reasoner import Reasoner

    return Reasoner(args.bundle, providers=provider_config(args), intra_op_threads=args.threads)


def _run(args: argparse.Namespace) -> int:
    problem = sys.stdin.read() if args.problem == "-" else args.problem
    config = make_config(strategy=args.strategy, preset=args.preset, **_overrides(args))
    reasoner = _reasoner(args)
    stream = not args.json and sys.stdout.isatty()

    def on_step(step: Any) -> None:
        if stream:
            sys.stdout.write(f"[{step.author}] {step.text}")
            sys.stdout.flush()

    result = reasoner.run(problem, config, on_step=on_step if stream else None)
    if args.trace:
        _write_json(Path(args.trace), result.to_json())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    if stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    accept = f", acceptance {result.acceptance:.2f}" if result.acceptance is not None else ""
    print(f"answer: {result.answer if result.answer is not None else '(none)'}")
    print(f"[{result.strategy}: {result.finish}, {len(result.steps)} steps, {result.speculator_steps} by the "
          f"speculator{accept}, {result.seconds * 1e3:.1f} ms]", file=sys.stderr)
    return 0


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _sweep(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, ReasonConfig]:
    configs: dict[str, ReasonConfig] = {}
    for strategy in args.strategy:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
        if strategy == "stepwise" and args.thresholds:
            for t in args.thresholds:
                configs[f"stepwise(threshold={t:g})"] = make_config(
                    strategy=strategy, preset=args.preset, **{**base, "stepwise.threshold": t})
        else:
            configs[strategy] = make_config(strategy=strategy, preset=args.preset, **base)
    return configs


def _eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate, plot, read_problems, table

    problems = read_problems(args.problems, limit=args.limit)
    if args.plot:
        _check_plot(args.plot)  # refuse before minutes of evaluation, not after
    configs = _sweep(args, _overrides(args))
    reasoner = _reasoner(args)
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rproblem {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    records: list[dict] | None = [] if args.records else None
    report = evaluate(reasoner=reasoner, problems=problems, configs=configs, progress=progress, records=records)
    report["bundle"] = str(args.bundle)
    report["problems_file"] = str(args.problems)
    if records is not None:
        tmp = Path(args.records).with_name(Path(args.records).name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(args.records)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _check_plot(path: str) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'specreason-rt[plot]'")
    if not Path(path).parent.is_dir():
        raise ConfigError(f"--plot: the folder of {path} does not exist")


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
                        "\"question\", \"answer\"}) and print accuracy, mean/p50/p95 latency, tokens, acceptance "
                        "rate and the speculator's share of steps. The built-in task's held-out split: "
                        "python -m specreason_models.task --heldout FILE.")
    ev.add_argument("--problems", required=True, metavar="FILE.jsonl")
    ev.add_argument("--strategy", nargs="+", default=["verifier", "speculator", "stepwise", "best_of_n"],
                    metavar="S", help=f"strategies to compare (from {', '.join(STRATEGIES)})")
    ev.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                    help="run stepwise once per threshold (a sweep), e.g. --thresholds 3 5 7 9")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.add_argument("--plot", metavar="FILE.png", help="write accuracy vs latency per strategy as a PNG")
    ev.add_argument("--records", metavar="FILE.jsonl", help="write every run's result and trace, one per line")
    _common(ev)
    ev.set_defaults(func=_eval)
