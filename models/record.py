"""Measure the committed pair and write models/builtin/accuracy.json (the numbers models/README.md quotes).

Usage: python -m specreason_models.record [--n 1000] [--out models/builtin/accuracy.json]

Records, per role: greedy exact-solve accuracy on the first ``n`` held-out problems, by chain length and on the
first 200 (the subset tests/test_models_builtin.py re-checks), the parameter count and the training metadata;
plus the decode-time proxies of specreason_models.timing. The first pair (task v1, 2-3 steps) is recorded in
models/builtin-v1/accuracy.json (its weights: models/builtin-v1/, the v2 recipe's starting point).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import BUILTIN_DIR, BUILTIN_NAMES, builtin_path
from .evaluate import accuracy, accuracy_by_length, load
from .task import TaskConfig, heldout_split
from .timing import measure

TEST_SUBSET = 200

COMMANDS = {
    # v2 recipe: fine-tunes the v1 pair (models/builtin-v1/) on 2-12 step chains with a curriculum, one thread each
    "train_verifier": "python -m specreason_models.train --out models/builtin --role verifier "
                      "--init models/builtin-v1 --seed 0 --steps 1300 --batch 32 --lr 7e-4 --threads 1 "
                      "--max-ops 12 --curriculum-start 4 --ramp 0.3 --eval-every 650 --eval-n 165",
    # stage 2: the stage-1 verifier, 450 more steps on uniform 2-12 chains (fresh data: seed 1)
    "train_verifier_stage2": "python -m specreason_models.train --out models/builtin --role verifier "
                             "--init models/builtin --seed 1 --steps 450 --batch 32 --lr 5e-4 --threads 1 "
                             "--max-ops 12 --eval-every 450 --eval-n 330",
    # stage 3: long chains only (6-12 steps, the stage-2 verifier's weak end), fresh data (seed 2)
    "train_verifier_stage3": "python -m specreason_models.train --out models/builtin --role verifier "
                             "--init models/builtin --seed 2 --steps 400 --batch 32 --lr 3e-4 --threads 1 "
                             "--max-ops 12 --min-ops 6 --eval-every 200 --eval-n 330",
    # stage 4: all lengths again at a low rate (stage 3 cost the 4-step chains a few points)
    "train_verifier_stage4": "python -m specreason_models.train --out models/builtin --role verifier "
                             "--init models/builtin --seed 3 --steps 200 --batch 32 --lr 2e-4 --threads 1 "
                             "--max-ops 12 --eval-every 200 --eval-n 330",
    "train_speculator": "python -m specreason_models.train --out models/builtin --role speculator "
                        "--init models/builtin-v1 --seed 0 --steps 800 --batch 64 --lr 1e-3 --threads 1 "
                        "--max-ops 12 --curriculum-start 4 --ramp 0.3",
    # stage 2: 3000 more steps on uniform 2-12 chains (fresh data: seed 2)
    "train_speculator_stage2": "python -m specreason_models.train --out models/builtin --role speculator "
                               "--init models/builtin --seed 2 --steps 3000 --batch 64 --lr 1e-3 --threads 1 "
                               "--max-ops 12 --eval-every 1000 --eval-n 330",
    "evaluate": "python -m specreason_models.evaluate --model models/builtin/verifier --n 1000",
    "value_head": "python -m specreason_models.value_head --out models/builtin/verifier --seed 0 --synthetic 4000 "
                  "--sampled 4000 --heldout 1000 --threads 2",
    "timing": "python -m specreason_models.timing",
    "record": "python -m specreason_models.record --n 1000",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m specreason_models.record",
        description="Evaluate the committed built-in pair and write accuracy.json.",
    )
    parser.add_argument("--n", type=int, default=1000, help="held-out problems evaluated per model")
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR / "accuracy.json")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    problems = heldout_split(n=args.n)
    report: dict = {"split": "heldout", "decoding": "greedy", "task": vars(TaskConfig()).copy()}
    for name in BUILTIN_NAMES:
        model, tok = load(builtin_path(name))
        start = time.perf_counter()
        table = accuracy_by_length(model=model, tok=tok, problems=problems)
        acc = sum(solved for solved, _ in table.values()) / len(problems)
        seconds = time.perf_counter() - start
        training = json.loads((builtin_path(name) / "training.json").read_text())
        report[name] = {
            "heldout_accuracy": acc,
            "n": args.n,
            f"heldout_accuracy_first_{TEST_SUBSET}": accuracy(model=model, tok=tok, problems=problems[:TEST_SUBSET]),
            "by_length": {str(k): {"accuracy": round(solved / total, 4), "n": total}
                          for k, (solved, total) in table.items()},
            "eval_seconds": round(seconds, 1),
            "parameters": training["parameters"],
            "train_seconds": training["train_seconds"],
            "train_steps": training["preset"]["steps"],
            "seed": training["seed"],
            "training": training,
        }
        print(name, json.dumps(report[name]), flush=True)
    report["seed"] = report["verifier"]["seed"]
    torch.set_num_threads(1)
    report["decode_time_proxy"] = measure(speculator=builtin_path("speculator"), verifier=builtin_path("verifier"))
    report["commands"] = COMMANDS
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["decode_time_proxy"], indent=2))


if __name__ == "__main__":
    main()
