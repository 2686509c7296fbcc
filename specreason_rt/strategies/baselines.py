"""Baselines through the same API: one model alone, and the self-consistency majority vote.

speculator / verifier  one trajectory sampled by that model with its SamplingParams (the verifier alone is
                       the "vanilla" base model of the paper's comparisons); same stop rules as every strategy.
majority               n_specs trajectories of `search.majority_model` from one forked prompt; the most common
                       final answer wins (ties: the answer reached first), no verifier involved.
"""

from __future__ import annotations

import time
from collections import Counter

from ..answers import extract_answer
from ..trace import Candidate, RunResult
from .common import Run, Trajectory, sample_trajectories, trajectory_steps


def run_single(run: Run, *, role: str) -> RunResult:
    start = time.perf_counter()
    ctx = run.context(role)
    phase = "speculate" if role == "speculator" else "fallback"
    traj = sample_trajectories(run, ctx, role=role, trajs=[Trajectory()], max_steps=None, phase=phase,
                               stream=True)[0]  # steps and tokens reach on_step / on_token as they are written
    steps = trajectory_steps(traj, author=role)
    return run.result(strategy=role, traj=traj, steps=steps, seconds=time.perf_counter() - start)


def run_majority(run: Run) -> RunResult:
    start = time.perf_counter()
    n, role = run.config.search.n_specs, run.config.search.majority_model
    ctx = run.context(role)
    if n > 1:
        ctx.gather([0] * n)
    trajs = sample_trajectories(run, ctx, role=role, trajs=[Trajectory() for _ in range(n)],
                                max_steps=run.config.search.max_depth)
    with run.timer.phase("select"):
        answers = [extract_answer(t.text, fmt=run.config.answer.format) for t in trajs]
        votes = Counter(a for a in answers if a is not None)
        winner = max(votes, key=lambda a: (votes[a], -answers.index(a))) if votes else None
        best = answers.index(winner) if winner is not None else 0
    candidates = [Candidate(text=t.text, tokens=t.tokens, answer=a, accepted=i == best,
                            combined=round(votes[a] / n, 4) if a is not None else 0.0)
                  for i, (t, a) in enumerate(zip(trajs, answers, strict=True))]
    return run.result(strategy="majority", traj=trajs[best], steps=trajectory_steps(trajs[best], author=role),
                      seconds=time.perf_counter() - start, candidates=candidates)
