"""Stepwise SpecReason with multi-step lookahead: draft several steps, verify them in one pass, keep a prefix.

Per round (stepwise.lookahead = L > 1, one candidate per step):
  1. speculate  the speculator drafts up to L steps one after another, stopping early after a step that would
                end the run (eos, an answer line, the budget, a repeat: the same rules a committed step obeys);
  2. verify     the verifier appends all drafted steps to its cache in one prefill pass and scores each one
                (scoring.score_chains; a causal model scores step i exactly as if steps 0..i-1 were committed);
  3. accept     the longest prefix of steps that each score >= threshold is committed (both caches hold it):
                token-level speculative decoding's accept rule, applied to steps;
     fallback   the first rejected step and everything drafted after it is dropped from both caches (truncate to
                the state saved before that step), and the verifier writes that step itself, starting from the
                draft's prefix that matches its own greedy choices (as stepwise.py does).
So with threshold above the scale every draft is rejected and the output is exactly the verifier's; with
threshold 0 every draft is accepted and the output is exactly the speculator's (same RNG stream, same order).

stepwise.adaptive_lookahead makes L the most steps a round drafts; LookaheadPolicy picks each round's count from
the run's recent acceptance rate (deterministic, so a seed still reproduces a run).

The verifier prefills the prompt in a worker thread while the speculator drafts the first chain (the output is
unchanged). stepwise.overlap pipelines the rest too, where each model has a core of its own (Bundle.own_cores)
and the run's acceptance rate says chain r likely passes whole: while the verifier scores chain r, the
speculator drafts chain r+1 as if chain r passes, with the length the policy would choose after that. If
chain r passes, chain r+1 is ready; if not, chain r+1 is dropped with the rejected steps (the same rewind) and
the speculator's RNG goes back to its state before chain r+1, so the next chain is drafted with the draws the
sequential loop would use. The output is the sequential loop's, for every seed: pipelining changes when work
runs, never what is written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..context import Context
from ..decode import BranchOutput
from ..scoring import ChainScores, score_chains
from ..trace import Candidate, DraftCounts, RunResult, StepTrace
from .common import Run, Trajectory
from .stepwise import _greedy_prefix, write_rest_of_step


@dataclass
class Chain:
    drafts: list[BranchOutput]
    marks: list[tuple[int, np.ndarray]]  # per draft: the speculator's (length, logits row [vocab]) before it
    ends_run: bool  # its last step would end the run (eos, answer, budget, repeat) if accepted


def draft_chain(run: Run, *, spec: Context, traj: Trajectory, lookahead: int) -> Chain:
    """Draft up to `lookahead` steps on the speculator's branch 0, after the steps of `traj`.

    Per draft, the speculator's state before it (length, logits row [vocab]) is kept: what a rejection of that
    draft rewinds to.
    """
    sim = Trajectory(steps=list(traj.steps), texts=list(traj.texts))  # the run as if every draft were accepted
    drafts: list[BranchOutput] = []
    marks: list[tuple[int, np.ndarray]] = []
    for _ in range(lookahead):
        spec.flush()  # the forward decode would run first anyway; afterwards logits[0] is the row to rewind to
        marks.append((spec.length(0), spec.logits[0].copy()))
        draft = spec.decode_steps(params=run.params["speculator"], rng=run.rng["speculator"],
                                  max_tokens=run.step_budget(sim.tokens))[0]
        drafts.append(draft)
        sim.steps.append(list(draft.tokens))
        sim.texts.append(draft.text)
        if run.finish_after_step(traj=sim, out_finish=draft.finish, max_steps=None):
            return Chain(drafts=drafts, marks=marks, ends_run=True)
    return Chain(drafts=drafts, marks=marks, ends_run=False)


def accepted_prefix(scores: np.ndarray, *, threshold: float) -> int:
    """How many leading steps each score >= threshold (scores: [steps]; NaN never passes)."""
    passed = np.asarray(scores) >= threshold  # [steps]
    return len(passed) if passed.all() else int(np.argmin(passed))


class LookaheadPolicy:
    """How many steps the next round drafts: always `most`, or (adaptive) as many as will likely survive.

    Why the rule: with a per-step acceptance rate p, the k-th drafted step is committed only if all k pass
    (probability p**k). Drafting it costs one speculator step s; if it is committed it saves a verifier pass V
    (the round it would otherwise have needed); when it is rejected after k-1 passing steps it also saves V
    (its rejection is found in this pass, not a later one). So it pays when p**(k-1) * V > (1 - p**(k-1)) * s,
    and with s about V (a drafted step and one scoring pass cost about the same on the built-in pair) that is
    p**(k-1) > 1/2: draft the k-th step while the chance that every step before it passes is at least half.
    p is an exponential moving average over this run's scored steps (passes, and the first rejection of a
    round; steps after a rejection were scored on a context that is thrown away, so they are not evidence).
    It uses no clocks, so a seed reproduces a run.
    """

    PRIOR = 0.75  # acceptance assumed before any step is scored: three steps in the first round
    DECAY = 0.25  # weight of each new outcome in the moving average (about the last 4-8 steps matter)

    def __init__(self, *, most: int, adaptive: bool) -> None:
        self.most, self.adaptive = most, adaptive
        self.rate = self.PRIOR
        self.observed = 0  # rounds folded in so far

    def size(self) -> int:
        if not self.adaptive:
            k = self.most
        else:
            k = 1
            while k < self.most and self.rate**k >= 0.5:  # the chance steps 1..k all pass: draft step k+1?
                k += 1
        return k

    def draft_ahead(self, drafted: int) -> bool:
        """Whether overlap should draft the next chain ahead of this one of `drafted` steps: in the first round
        (nothing is known yet), then where this chain passes whole with a chance of at least half (the rule
        size() uses). A chain drafted ahead of one that then fails is thrown away, and drafting it is not free:
        it holds the GIL between the speculator's forwards while the verifier needs it between its own (a
        speculator right on 70% of steps ran 7% slower drafting ahead of every chain, BENCHMARKS.md)."""
        return self.observed == 0 or self.rate**drafted >= 0.5

    def size_if_all_pass(self, drafted: int) -> int:
        """size() after observe(drafted=drafted, accepted=drafted), without changing this policy: the length of
        the chain drafted ahead, which is kept only when the current chain passes whole."""
        ahead = LookaheadPolicy(most=self.most, adaptive=self.adaptive)
        ahead.rate = self.rate
        ahead.observe(drafted=drafted, accepted=drafted)
        return ahead.size()

    def observe(self, *, drafted: int, accepted: int) -> None:
        """Fold in one round: `accepted` leading steps passed; a rejection follows them if accepted < drafted."""
        self.observed += 1
        outcomes = [1.0] * accepted + ([0.0] if accepted < drafted else [])
        for x in outcomes:
            self.rate += self.DECAY * (x - self.rate)


def run_lookahead(run: Run) -> RunResult:
    # One worker thread for the verifier: it prefills the prompt there while this thread drafts the first chain
    # (always: the same work in the same order, so the output is unchanged), and with stepwise.overlap it
    # scores chain r there while this thread drafts chain r+1. ONNX Runtime releases the GIL, so the two models
    # run at once when each has a core of its own (otherwise they would take cores from each other: in turn).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="specreason-verify") as pool:
        return _run_lookahead(run, pool)


def _run_lookahead(run: Run, pool: ThreadPoolExecutor) -> RunResult:
    start = time.perf_counter()
    cfg = run.config.stepwise
    scorer = run.scorer  # built here, not lazily inside the worker thread
    policy = LookaheadPolicy(most=cfg.steps_per_pass(score_mode=run.config.score.mode),
                             adaptive=cfg.adaptive_lookahead)
    pipelined = cfg.pipelines(score_mode=run.config.score.mode) and run.bundle.own_cores()
    spec = run.context("speculator")
    ahead: Chain | None = None  # overlap: the chain drafted while the previous one was scored
    ahead_rng: Mapping[str, Any] = {}  # overlap: the speculator's RNG state before that chain's draws
    if cfg.first_n_steps_verifier == 0:
        # The verifier prefills its prompt in the worker thread while the speculator drafts the first chain
        # (the draws the loop would make first, so the output does not change).
        prefill = pool.submit(run.context, "verifier")
        try:
            with run.timer.phase("speculate"):
                ahead = draft_chain(run, spec=spec, traj=Trajectory(), lookahead=policy.size())
            run.tokens["speculator"] += sum(len(d.tokens) for d in ahead.drafts)
        finally:
            ver = prefill.result()  # never leave the verifier running on its own
    else:
        ver = run.context("verifier")
    v_tok = run.bundle.tokenizers["verifier"]
    v_params = run.params["verifier"]
    can_reuse = cfg.reuse_draft_prefix and v_params.greedy and v_params.repetition_penalty == 1.0
    traj, counts = Trajectory(), DraftCounts()
    steps: list[StepTrace] = []

    def commit(*, tokens: list[int], text: str, author: str, candidates: list[Candidate], reused: int,
               out_finish: str) -> None:
        traj.steps.append(list(tokens))
        traj.texts.append(text)
        step = StepTrace(index=len(steps), author=author, text=text, tokens=len(tokens), candidates=candidates,
                         reused_tokens=reused)
        steps.append(step)
        if run.on_step is not None:
            run.on_step(step)
        if run.cancel is not None:
            # Several steps of one chain are committed without a forward in between (where the one-step
            # loop's cancellation point is): a run cancelled during one of them stops before the next.
            run.cancel.check()
        traj.finish = run.finish_after_step(traj=traj, out_finish=out_finish, max_steps=None)

    def verify(spans: list[list[int]]) -> ChainScores:
        with run.timer.phase("verify"):
            return score_chains(scorer, ver, [spans])

    while not traj.finish:
        reuse_span: list[int] = []
        rejected: Candidate | None = None
        if len(traj.steps) >= cfg.first_n_steps_verifier:
            # 1. Speculate a chain of up to L steps (or take the one drafted during the last verification).
            if ahead is None:
                with run.timer.phase("speculate"):
                    ahead = draft_chain(run, spec=spec, traj=traj, lookahead=policy.size())
                run.tokens["speculator"] += sum(len(d.tokens) for d in ahead.drafts)
            current, ahead = ahead, None
            drafts, marks = current.drafts, current.marks
            # 2. Verify every drafted step in one prefill pass. The verifier's pending token (the end of a step
            # it wrote) rides along; the scoring rows start after it.
            ver_len = ver.length(0)
            spans = [run.convert(d.tokens, src="speculator", dst="verifier") for d in drafts]
            if pipelined and not current.ends_run and policy.draft_ahead(len(drafts)):
                # 2'. Overlap: draft the next chain as if this one passes, while the verifier scores this one.
                future = pool.submit(verify, spans)
                assumed = Trajectory(steps=[*traj.steps, *(list(d.tokens) for d in drafts)],
                                     texts=[*traj.texts, *(d.text for d in drafts)])
                ahead_rng = run.rng["speculator"].bit_generator.state
                try:
                    with run.timer.phase("speculate"):
                        ahead = draft_chain(run, spec=spec, traj=assumed,
                                            lookahead=policy.size_if_all_pass(len(drafts)))
                    run.tokens["speculator"] += sum(len(d.tokens) for d in ahead.drafts)
                finally:
                    chain = future.result()  # never leave the verifier running on its own
            else:
                chain = verify(spans)
            scores, rows, starts = chain.scores[0], chain.rows[0], chain.starts[0]
            accepted = accepted_prefix(scores, threshold=cfg.threshold)
            policy.observe(drafted=len(drafts), accepted=accepted)
            counts.add_round(step_tokens=[len(d.tokens) for d in drafts], accepted=accepted)
            if ahead is not None and accepted < len(drafts):
                # The chain drafted ahead assumed every step here passes: drop it (the rewind below covers its
                # tokens) and give back its draws, so the next chain is drafted as the sequential loop drafts it.
                counts.add_dropped(step_tokens=[len(d.tokens) for d in ahead.drafts])
                run.rng["speculator"].bit_generator.state = ahead_rng
                ahead = None
            # 3a. Accept the prefix: both caches already hold it.
            for d, score in zip(drafts[:accepted], scores[:accepted], strict=True):
                commit(tokens=d.tokens, text=d.text, author="speculator", reused=0, out_finish=d.finish,
                       candidates=[Candidate(text=d.text, tokens=len(d.tokens), score=round(float(score), 4),
                                             accepted=True)])
            if accepted == len(drafts) or traj.finish:
                continue
            # 3b. Drop the first rejected step and everything after it from both caches.
            with run.timer.phase("fallback"):
                d, span, offset = drafts[accepted], spans[accepted], int(starts[accepted])
                rejected = Candidate(text=d.text, tokens=len(d.tokens), score=round(float(scores[accepted]), 4))
                if can_reuse:
                    # rows[offset + j] predicts span[j]: the greedy prefix of the rejected step alone
                    reuse_span = span[:_greedy_prefix(rows[offset:offset + len(span) + 1], span)]
                spec_len, spec_logits = marks[accepted]
                spec.truncate(0, length=spec_len, logits=spec_logits)
                ver.truncate(0, length=ver_len + offset + len(reuse_span), logits=rows[offset + len(reuse_span)])
        # 3c. The verifier writes the step (from the reused greedy prefix, if any).
        index, budget = len(traj.steps), run.step_budget(traj.tokens)
        with run.timer.phase("fallback"):
            tokens, out_finish = write_rest_of_step(run, ver, index=index, reuse_span=reuse_span, budget=budget)
            spec.defer(0, run.convert(tokens, src="verifier", dst="speculator"))
        commit(tokens=tokens, text=v_tok.decode(tokens), author="verifier", reused=len(reuse_span),
               out_finish=out_finish, candidates=[rejected] if rejected is not None else [])
    result = run.result(strategy="stepwise", traj=traj, steps=steps, seconds=time.perf_counter() - start)
    result.drafts = counts
    assert ahead is None  # a chain that ends the run is never drafted past (Chain.ends_run)
    return result
