"""Stepwise SpecReason for many requests at once: every model forward serves all of them.

A `StepwiseBatch` holds one speculator context and one verifier context whose branches are the requests
("lanes"). Each `tick` runs one step of the paper's loop (stepwise.py) for every lane together:

  1. batched decodes draft the next step(s) of every lane that drafts (per-lane RNG streams and budgets; one
     decode per step position, up to each lane's stepwise.lookahead steps);
  2. one verifier prefill pass scores all drafted steps (lanes without a draft feed nothing);
  3. per lane, accept the longest prefix of steps that pass, drop the rest from both caches (truncate) and keep
     the first rejected draft's prefix the verifier agrees with; one batched decode lets the verifier write the
     steps of every falling-back lane.

Lanes join between ticks (their prompts are prefilled, then their cache rows appended: continuous batching)
and leave when they finish (their rows are dropped). A lane gives the same steps as `run_stepwise` of the same
problem and seed alone, up to float rounding in the batched forwards (tested). Lanes of one batch share the
scoring config and both models' sampling params (`batch_key`); thresholds, token limits, stop rules and
seeds are per lane, and so is stepwise.lookahead (a lane drafts up to its L steps per tick, fewer when
stepwise.adaptive_lookahead says so, as run alone; lanes that stop drafting sit out the remaining batched
decodes of that tick). Only one draft per step (stepwise.candidates == 1) is batched this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..config import ReasonConfig
from ..context import Context
from ..decode import BranchOutput
from ..scoring import ChainScores, score_chains
from ..tokenizer import StepDetector
from ..trace import Candidate, DraftCounts, RunResult, StepTrace
from .common import Run, StepStream, Trajectory
from .lookahead import LookaheadPolicy, accepted_prefix
from .stepwise import _greedy_prefix, _replay


def batch_key(config: ReasonConfig) -> tuple[Any, ...] | None:
    """Configs with equal keys can share a batch; None: this config is not batched (run it alone)."""
    if config.strategy != "stepwise" or config.stepwise.candidates != 1:
        return None
    # stepwise.overlap is left out: a lane shares its forwards with the other lanes instead, and overlap never
    # changes a run's output, so a lane writes what its run alone writes.
    return (config.score, config.speculator, config.verifier)


@dataclass
class Lane:
    run: Run
    done: Callable[[RunResult | BaseException], None]  # called once with the result or the error
    traj: Trajectory = field(default_factory=Trajectory)
    steps: list[StepTrace] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    forwards_at_join: tuple[int, int] = (0, 0)  # the batch contexts' forward counts when the lane joined
    counts: DraftCounts = field(default_factory=DraftCounts)
    lookahead: LookaheadPolicy = field(init=False)  # how many steps each round drafts (the lane's config)

    def __post_init__(self) -> None:
        cfg = self.run.config.stepwise
        self.lookahead = LookaheadPolicy(most=cfg.steps_per_pass(score_mode=self.run.config.score.mode),
                                         adaptive=cfg.adaptive_lookahead)


class StepwiseBatch:
    def __init__(self, *, bundle: Bundle) -> None:
        self.bundle = bundle
        self.lanes: list[Lane] = []
        self.spec: Context | None = None
        self.ver: Context | None = None
        self.key: tuple[Any, ...] | None = None

    def __len__(self) -> int:
        return len(self.lanes)

    def accepts(self, config: ReasonConfig) -> bool:
        key = batch_key(config)
        return key is not None and (not self.lanes or key == self.key)

    def admit(self, items: list[tuple[Run, Callable[[RunResult | BaseException], None]]]) -> None:
        """Add runs as lanes: their prompts are prefilled together (one ragged forward per model), then their
        cache rows appended to the batch's. Every run must be accepted (see `accepts`) and share one key."""
        if not items:
            return
        keys = {batch_key(run.config) for run, _ in items}
        if None in keys or len(keys) != 1 or (self.lanes and keys != {self.key}):
            raise ValueError("these runs cannot join the batch (see batch_key)")
        start = time.perf_counter()
        new = {}
        for role in ("speculator", "verifier"):
            prompts = [run.prompts[role] for run, _ in items]
            # Room so that the longest need (prompt + budget + judge prompt) of any of them fits.
            needs = [len(p) + run.budget + (run.scorer.extra_room if role == "verifier" else 0)
                     for p, (run, _) in zip(prompts, items, strict=True)]
            new[role] = Context(model=self.bundle.models[role], tokenizer=self.bundle.tokenizers[role],
                                prompts=prompts, room=max(needs) - max(len(p) for p in prompts))
        for run, _ in items:
            run.timer.seconds["prefill"] += time.perf_counter() - start
        if self.spec is None or self.ver is None:
            self.spec, self.ver, self.key = new["speculator"], new["verifier"], keys.pop()
        else:
            self.spec.concat(new["speculator"])
            self.ver.concat(new["verifier"])
        # Their prefills count as one forward per model (concat adds them to the batch's totals).
        joined = (self.spec.forwards - 1, self.ver.forwards - 1)
        self.lanes += [Lane(run=run, done=done, forwards_at_join=joined) for run, done in items]

    def tick(self) -> None:
        """One round for every lane; finished (or failed) lanes report through their `done` and leave.

        A lane drafts up to the steps its LookaheadPolicy allows this round (lookahead.py's rule, per lane): one
        batched speculator decode per drafted step position, one verifier pass scores every lane's chain.
        """
        assert self.spec is not None and self.ver is not None
        spec, ver, lanes = self.spec, self.ver, self.lanes
        n = len(lanes)
        first = lanes[0].run
        v_tok = self.bundle.tokenizers["verifier"]
        eos = set(ver.model.generation.eos_ids)
        failed: dict[int, BaseException] = {}
        for i, lane in enumerate(lanes):
            try:
                if lane.run.cancel is not None:
                    lane.run.cancel.check()
            except BaseException as e:  # noqa: BLE001 - a cancelled lane fails alone
                failed[i] = e
        drafting = [i not in failed and len(lane.traj.steps) >= lane.run.config.stepwise.first_n_steps_verifier
                    for i, lane in enumerate(lanes)]
        ver_len = [ver.length(i) for i in range(n)]
        limits = [lane.lookahead.size() if drafting[i] else 0 for i, lane in enumerate(lanes)]
        # 1. Speculate: per step position, one batched decode for every lane still drafting its chain.
        drafts: list[list[BranchOutput]] = [[] for _ in range(n)]
        marks: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]  # spec state before each draft
        sims = [Trajectory(steps=list(lane.traj.steps), texts=list(lane.traj.texts)) for lane in lanes]
        active = list(drafting)
        started = time.perf_counter()
        position = 0
        while any(active):
            spec.flush()  # the decode would feed the pending tokens first anyway; now logits are the rewind rows
            for i in range(n):
                if active[i]:
                    marks[i].append((spec.length(i), spec.logits[i].copy()))
            step_outs = spec.decode_steps(params=first.params["speculator"],
                                          rng=[ln.run.rng["speculator"] for ln in lanes],
                                          max_tokens=[max(ln.run.step_budget(sims[i].tokens), 1)
                                                      for i, ln in enumerate(lanes)], active=active)
            position += 1
            for i, lane in enumerate(lanes):
                if not active[i]:
                    continue
                d = step_outs[i]
                drafts[i].append(d)
                lane.run.tokens["speculator"] += len(d.tokens)
                sims[i].steps.append(list(d.tokens))
                sims[i].texts.append(d.text)
                if position >= limits[i] or \
                        lane.run.finish_after_step(traj=sims[i], out_finish=d.finish, max_steps=None):
                    active[i] = False
        spans = [[first.convert(d.tokens, src="speculator", dst="verifier") for d in drafts[i]] for i in range(n)]
        speculated = time.perf_counter()
        # 2. Verify: one prefill pass over every lane's drafted steps.
        chain = None
        if any(drafting):
            chain = _score(first, ver, spans)
        verified = time.perf_counter()
        # 3. Per lane, keep the longest passing prefix of steps.
        accepted = [accepted_prefix(chain.scores[i], threshold=lane.run.config.stepwise.threshold)
                    if drafting[i] and chain is not None else 0 for i, lane in enumerate(lanes)]
        # 3a. Commit the accepted steps first: a client streaming the run sees them before the tokens of the
        # step the verifier writes after them.
        for i, lane in enumerate(lanes):
            if i in failed or not drafting[i]:
                continue
            assert chain is not None
            lane.counts.add_round(step_tokens=[len(d.tokens) for d in drafts[i]], accepted=accepted[i])
            lane.lookahead.observe(drafted=len(drafts[i]), accepted=accepted[i])
            try:
                for d, score in zip(drafts[i][:accepted[i]], chain.scores[i][:accepted[i]], strict=True):
                    self._commit(lane, tokens=d.tokens, text=d.text, author="speculator", reused=0,
                                 out_finish=d.finish, candidates=[Candidate(text=d.text, tokens=len(d.tokens),
                                                                            score=round(float(score), 4),
                                                                            accepted=True)])
            except BaseException as e:  # noqa: BLE001 - cancelled while its steps were reported: it fails alone
                failed[i] = e
        # 3b. Lanes that go on: drop the first rejected step and what follows from both caches, keeping the draft
        # prefix the verifier agrees with; one batched decode writes every such step.
        writes = [i not in failed and not lane.traj.finish and (not drafting[i] or accepted[i] < len(drafts[i]))
                  for i, lane in enumerate(lanes)]
        reuse: list[list[int]] = [[] for _ in range(n)]
        detectors = [StepDetector(tokenizer=v_tok) for _ in range(n)]
        complete = [""] * n  # "step" / "eos" where the reused prefix already is the whole step
        budgets = [max(lane.run.step_budget(lane.traj.tokens), 1) for lane in lanes]
        for i, lane in enumerate(lanes):
            if not writes[i] or not drafting[i]:
                continue
            assert chain is not None
            a, span = accepted[i], spans[i][accepted[i]]
            offset, rows = int(chain.starts[i][a]), chain.rows[i]
            cfg, v_params = lane.run.config.stepwise, lane.run.params["verifier"]
            if cfg.reuse_draft_prefix and v_params.greedy and v_params.repetition_penalty == 1.0:
                reuse[i] = span[:_greedy_prefix(rows[offset:offset + len(span) + 1], span)]
            spec_len, spec_logits = marks[i][a]
            spec.truncate(i, length=spec_len, logits=spec_logits)
            ver.truncate(i, length=ver_len[i] + offset + len(reuse[i]), logits=rows[offset + len(reuse[i])])
            complete[i] = _replay(detectors[i], reuse[i], eos)
        streams = {i: StepStream(lane.run, index=len(lane.steps)) for i, lane in enumerate(lanes)
                   if writes[i] and lane.run.on_token is not None}
        for i, stream in streams.items():
            stream.push(reuse[i])
        decoding = [writes[i] and not complete[i] for i in range(n)]
        outs = None
        if any(decoding):
            outs = ver.decode_steps(params=first.params["verifier"], rng=[ln.run.rng["verifier"] for ln in lanes],
                                    max_tokens=[max(b - len(r), 1) for b, r in zip(budgets, reuse, strict=True)],
                                    detectors=detectors, active=decoding,
                                    on_token=(lambda b, t: streams[b].push([t]) if b in streams else None)
                                    if streams else None)
        fell_back = time.perf_counter()
        # 4. Commit the steps the verifier wrote, and see whether each lane is done.
        finished = []
        for i, lane in enumerate(lanes):
            run, traj = lane.run, lane.traj
            run.timer.seconds["speculate"] += speculated - started
            run.timer.seconds["verify"] += verified - speculated
            run.timer.seconds["fallback"] += fell_back - verified
            if i in failed:
                finished.append(i)
                continue
            if writes[i]:
                candidates = []
                if drafting[i]:
                    assert chain is not None
                    d = drafts[i][accepted[i]]
                    candidates = [Candidate(text=d.text, tokens=len(d.tokens),
                                            score=round(float(chain.scores[i][accepted[i]]), 4))]
                if complete[i]:
                    tokens, out_finish = reuse[i], complete[i]
                else:
                    assert outs is not None
                    run.tokens["verifier"] += len(outs[i].tokens)
                    tokens, out_finish = reuse[i] + outs[i].tokens, outs[i].finish
                spec.defer(i, run.convert(tokens, src="verifier", dst="speculator"))
                try:
                    self._commit(lane, tokens=tokens, text=v_tok.decode(tokens), author="verifier",
                                 reused=len(reuse[i]), out_finish=out_finish, candidates=candidates)
                except BaseException as e:  # noqa: BLE001 - as above
                    failed[i] = e
                    finished.append(i)
                    continue
            if traj.finish:
                finished.append(i)
        for i in finished:
            lane = lanes[i]
            if i in failed:
                lane.done(failed[i])
            else:
                result = lane.run.result(strategy="stepwise", traj=lane.traj, steps=lane.steps,
                                         seconds=time.perf_counter() - lane.start)
                # The batched forwards that ran while the lane was in the batch (each served all its lanes).
                result.forwards = {"speculator": spec.forwards - lane.forwards_at_join[0],
                                   "verifier": ver.forwards - lane.forwards_at_join[1]}
                result.drafts = lane.counts
                lane.done(result)
        if finished:
            keep = [i for i in range(n) if i not in set(finished)]
            self.lanes = [lanes[i] for i in keep]
            if keep:
                spec.gather(keep)
                ver.gather(keep)
            else:
                self.spec = self.ver = None
                self.key = None

    @staticmethod
    def _commit(lane: Lane, *, tokens: list[int], text: str, author: str, reused: int, out_finish: str,
                candidates: list[Candidate]) -> None:
        run, traj = lane.run, lane.traj
        traj.steps.append(list(tokens))
        traj.texts.append(text)
        step = StepTrace(index=len(lane.steps), author=author, text=text, tokens=len(tokens), candidates=candidates,
                         reused_tokens=reused)
        lane.steps.append(step)
        if run.on_step is not None:
            run.on_step(step)
        if run.cancel is not None:
            run.cancel.check()  # a chain's steps are committed without a forward in between: stop before the next
        traj.finish = run.finish_after_step(traj=traj, out_finish=out_finish, max_steps=None)


def _score(run: Run, ver: Context, chains: list[list[list[int]]]) -> ChainScores:
    """Every lane's drafted steps scored in one verifier pass (score_chains); the judge, which needs its prompt
    after each step, scores one step per lane (lookahead 1 is then the only choice: config.py checks it)."""
    if run.config.score.mode != "judge":
        return score_chains(run.scorer, ver, chains)
    spans = [c[0] if c else [] for c in chains]
    scored = run.scorer.score_steps(ver, spans)
    return ChainScores(scores=[np.array([x]) if c else np.zeros(0) for x, c in zip(scored.scores, chains, strict=True)],
                       rows=scored.rows, starts=[np.array([0, len(s)]) for s in spans])
