"""The seed's two search strategies: speculate-verify-select (best_of_n) and tree search.

best_of_n  The speculator samples n_specs trajectories from one prefilled prompt (forked, one batch, up to
           max_depth steps); the verifier scores every trajectory in one batched pass; the combined score
           (scoring.combine: local confidence, consistency, verifier quality) picks the winner. With
           search.stop_after = m, sampling stops as soon as m trajectories have finished and the winner is
           chosen among those m (the "short-m@k" of Hassid et al. 2025, arXiv 2505.17813): the batch no
           longer decodes until its longest sample ends, at the price of favouring short solutions. With
           search.overlap (where it pays, see _overlaps) the verifier reads each step in a worker thread as
           the speculator writes it instead of all at the end: the same scores, earlier.
tree       Each level forks every kept node into beam_width children, decodes one step for all of them in one
           batch, scores the new steps with the verifier in one pass, and keeps the best beam_width unfinished
           nodes (both caches gathered, never recomputed). Finished children become leaves. After tree_depth
           levels the kept nodes are finished as trajectories and scored; the best leaf by combined score wins.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..answers import extract_answer
from ..model import SMALL_MODEL_PARAMETERS
from ..scoring import TrajectoryScores, combine, consistency, local_confidence
from ..trace import Candidate, RunResult
from .common import Run, Trajectory, sample_trajectories, trajectory_steps


def _select(run: Run, trajs: list[Trajectory], quality: np.ndarray) -> tuple[int, list[Candidate]]:
    """Combined scores of finished trajectories; the index of the best and the trace's candidates."""
    fmt = run.config.answer.format
    answers = [extract_answer(t.text, fmt=fmt) for t in trajs]
    local = np.array([local_confidence(t.logprobs) for t in trajs])
    combined = combine(local=local, consistent=consistency(answers), quality=quality, config=run.config.score)
    best = int(np.argmax(combined))
    candidates = [Candidate(text=t.text, tokens=t.tokens, score=round(float(q), 4), combined=round(float(c), 4),
                            local=round(float(lc), 4), answer=a, accepted=i == best)
                  for i, (t, q, c, lc, a) in enumerate(zip(trajs, quality, combined, local, answers, strict=True))]
    return best, candidates


class _StepFeed:
    """best_of_n's overlap: hands each step the speculator writes to the verifier's worker thread.

    Steps queue up here; a drain job on the one-worker pool appends everything queued in one batched pass
    (TrajectoryScores.append). A new job is submitted only when none is waiting, so a verifier slower than the
    speculator reads several steps per pass instead of falling further behind one step at a time. So how many
    verifier forwards a run takes depends on timing (the scores and the output do not).
    """

    def __init__(self, *, run: Run, pool: ThreadPoolExecutor, n: int) -> None:
        self.run, self.pool, self.n = run, pool, n
        self.scores: Future[TrajectoryScores] = pool.submit(self._prefill)  # while the speculator starts
        self.lock = threading.Lock()
        self.queued: list[tuple[int, list[int]]] = []  # (trajectory, its new step in speculator tokens)
        self.waiting = False  # a drain job is submitted and has not started
        self.jobs: list[Future[None]] = []

    def _prefill(self) -> TrajectoryScores:
        ver = self.run.context("verifier")
        if self.n > 1:
            ver.gather([0] * self.n)
        return TrajectoryScores(scorer=self.run.scorer, ctx=ver)

    def push(self, i: int, traj: Trajectory) -> None:
        with self.lock:
            self.queued.append((i, traj.steps[-1]))
            if self.waiting:
                return
            self.waiting = True
        self.jobs.append(self.pool.submit(self._drain))

    def _drain(self) -> None:
        with self.lock:
            taken, self.queued, self.waiting = self.queued, [], False
        steps: list[list[list[int]]] = [[] for _ in range(self.n)]
        for i, step in taken:
            steps[i].append(self.run.convert(step, src="speculator", dst="verifier"))
        with self.run.timer.phase("verify"):
            self.scores.result().append(steps)

    def finish(self) -> TrajectoryScores:
        """Wait for the worker to read every step (raising what it raised); then the scores are this thread's."""
        scores = self.scores.result()
        for job in self.jobs:
            job.result()
        return scores


def _overlaps(run: Run) -> bool:
    """search.overlap where it pays: each model has a CPU core of its own, and the speculator is big enough
    (SMALL_MODEL_PARAMETERS) that its model, not the Python decode loop, sets the time of a step. Below that
    the verifier thread's Python holds the interpreter lock the decode loop waits for: on the built-in pair
    overlap slowed the decode from 18.9 to 26.9 ms per problem, no gain with all four trajectories and 16%
    slower with stop_after 2, where SmolLM2 gained 1.17-1.29x (BENCHMARKS.md)."""
    big = run.bundle.models["speculator"].arch.parameters >= SMALL_MODEL_PARAMETERS
    return run.config.search.overlap and big and run.bundle.own_cores()


def run_best_of_n(run: Run) -> RunResult:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="specreason-verify") as pool:
        return _best_of_n(run, pool)


def _best_of_n(run: Run, pool: ThreadPoolExecutor) -> RunResult:
    start = time.perf_counter()
    search = run.config.search
    n = search.n_specs
    scorer = run.scorer  # built here, not lazily inside the worker thread
    spec = run.context("speculator")
    if n > 1:
        spec.gather([0] * n)  # fork the prefilled prompt: no recompute
    feed = _StepFeed(run=run, pool=pool, n=n) if _overlaps(run) else None
    try:
        sampled = sample_trajectories(run, spec, role="speculator", trajs=[Trajectory() for _ in range(n)],
                                      max_steps=search.max_depth, enough=search.stop_after or None,
                                      on_step=feed.push if feed else None)
    finally:
        scores = feed.finish() if feed else None  # never leave the worker running on its own
    keep = [i for i, t in enumerate(sampled) if t.finish != "stopped"]
    trajs = [sampled[i] for i in keep]
    if scores is None:  # the models in turn: the verifier reads every kept trajectory in one batched pass
        ver = run.context("verifier")
        if len(trajs) > 1:
            ver.gather([0] * len(trajs))
        scores, keep = TrajectoryScores(scorer=scorer, ctx=ver), list(range(len(trajs)))
        with run.timer.phase("verify"):
            scores.append([[run.convert(s, src="speculator", dst="verifier") for s in t.steps] for t in trajs])
    with run.timer.phase("verify"):
        quality = scores.quality(keep)
    with run.timer.phase("select"):
        best, candidates = _select(run, trajs, quality)
    return run.result(strategy="best_of_n", traj=trajs[best], steps=trajectory_steps(trajs[best], author="speculator"),
                      seconds=time.perf_counter() - start, candidates=candidates,
                      details={"sampled": n, "stopped": n - len(trajs), "overlap": feed is not None})


def _node_score(run: Run, traj: Trajectory) -> float:
    """Pruning score of a partial trajectory: local confidence and its weakest verified step, weighted."""
    cfg = run.config.score
    w_local, w_verify = cfg.local_weight, cfg.verify_weight
    quality = min(traj.quality) / 9 if traj.quality else 0.0
    if w_local + w_verify == 0:
        return quality
    return (w_local * local_confidence(traj.logprobs) + w_verify * quality) / (w_local + w_verify)


def run_tree(run: Run) -> RunResult:
    start = time.perf_counter()
    search = run.config.search
    width = search.beam_width
    spec, ver = run.context("speculator"), run.context("verifier")
    nodes: list[Trajectory] = [Trajectory()]  # kept unfinished nodes, one per branch of both contexts
    leaves: list[Trajectory] = []
    levels = []  # per level: children expanded, of them finished, nodes kept
    for _ in range(search.tree_depth):
        # Expand: every kept node forks into `width` children (cache rows duplicated, not recomputed).
        parents = [i for i in range(len(nodes)) for _ in range(width)]
        spec.gather(parents)
        ver.gather(parents)
        budget = min(run.step_budget(nodes[i].tokens) for i in parents)
        with run.timer.phase("speculate"):
            outs = spec.decode_steps(params=run.params["speculator"], rng=run.rng["speculator"], max_tokens=budget)
        run.tokens["speculator"] += sum(len(o.tokens) for o in outs)
        with run.timer.phase("verify"):
            scored = run.scorer.score_steps(ver, [run.convert(o.tokens, src="speculator", dst="verifier")
                                                  for o in outs])
        children = []
        for parent, out, score in zip(parents, outs, scored.scores, strict=True):
            p = nodes[parent]
            child = Trajectory(steps=[*p.steps, out.tokens], texts=[*p.texts, out.text],
                               logprobs=[*p.logprobs, *out.logprobs], quality=[*p.quality, float(score)])
            child.finish = run.finish_after_step(traj=child, out_finish=out.finish, max_steps=search.max_depth)
            children.append(child)
        leaves.extend(c for c in children if c.finish)
        # Prune: keep the best `width` unfinished children in both caches.
        open_rows = [j for j, c in enumerate(children) if not c.finish]
        keep = sorted(open_rows, key=lambda j: -_node_score(run, children[j]))[:width]
        nodes = [children[j] for j in keep]
        levels.append({"expanded": len(children), "finished": len(children) - len(open_rows), "kept": len(nodes)})
        if not nodes:
            break
        spec.gather(keep)
        ver.gather(keep)
    if nodes:
        # Finish the kept nodes as trajectories, then let the verifier score what they added.
        done_steps = [len(t.steps) for t in nodes]
        sample_trajectories(run, spec, role="speculator", trajs=nodes, max_steps=search.max_depth)
        tails = [[run.convert(s, src="speculator", dst="verifier") for s in t.steps[d:]]
                 for t, d in zip(nodes, done_steps, strict=True)]
        with run.timer.phase("verify"):  # every kept node was unfinished, so every tail has a step
            tail_quality = run.scorer.score_trajectories(ver, tails)
        for t, q in zip(nodes, tail_quality, strict=True):
            t.quality.append(float(q))
        leaves.extend(nodes)
    with run.timer.phase("select"):
        quality = np.array([min(t.quality) if t.quality else 0.0 for t in leaves])
        best, candidates = _select(run, leaves, quality)
    return run.result(strategy="tree", traj=leaves[best], steps=trajectory_steps(leaves[best], author="speculator"),
                      seconds=time.perf_counter() - start, candidates=candidates, details={"levels": levels})

