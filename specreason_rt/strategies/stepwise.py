"""The paper's SpecReason: per step, the speculator drafts, the verifier scores, accept or fall back.

Per step (both models keep their own KV cache of the solution so far):
  1. speculate  the speculator samples `candidates` drafts of the next step (forked branches, one batch);
  2. verify     the verifier appends every draft to its cache in one prefill pass and scores it (scoring.py);
  3. accept     the best draft with score >= threshold joins both caches (the verifier already holds it);
     fallback   otherwise both caches drop the drafts (truncate: no trace is left) and the verifier writes the
                step itself; the speculator receives it as pending tokens (fed by its next forward).
With a greedy verifier the fallback starts from the longest draft prefix that matches the verifier's own
greedy choices (read from the scoring pass): those tokens are exactly what it would write.
The first `first_n_steps_verifier` steps are written by the verifier without drafting.
With stepwise.lookahead > 1 the speculator drafts several steps per verifier pass (lookahead.py).
"""

from __future__ import annotations

import time
from collections.abc import Collection

import numpy as np

from ..context import Context
from ..tokenizer import StepDetector
from ..trace import Candidate, DraftCounts, RunResult, StepTrace
from .common import Run, StepStream, Trajectory


def _greedy_prefix(rows: np.ndarray, span: list[int]) -> int:
    """How many leading span tokens equal the argmax of the rows predicting them (rows: [len(span)+1, vocab])."""
    if not span:
        return 0
    match = np.argmax(rows[:len(span)], axis=-1) == np.asarray(span)  # [len(span)]
    return len(span) if match.all() else int(np.argmin(match))


def _replay(detector: StepDetector, span: list[int], eos: Collection[int]) -> str:
    """Feed a reused draft prefix to the verifier's step detector: "step" / "eos" when the prefix already is a
    whole step (the verifier would have written exactly it), else "" (the verifier decodes the rest)."""
    finish = ""
    for t in span:
        step_done = detector.push(t)
        finish = "eos" if t in eos else "step" if step_done else ""
    return finish


def write_rest_of_step(run: Run, ver: Context, *, index: int, reuse_span: list[int], budget: int
                       ) -> tuple[list[int], str]:
    """The verifier writes step `index` on top of the draft prefix it agrees with (reuse_span, already in its
    cache): the prefix streams as its own text, then it decodes the rest of the step, unless the prefix already
    is a whole step. Returns the step's tokens and how it ended ("step", "eos", ...)."""
    detector = StepDetector(tokenizer=run.bundle.tokenizers["verifier"])
    out_finish = _replay(detector, reuse_span, ver.model.generation.eos_ids)
    stream = StepStream(run, index=index)
    stream.push(reuse_span)  # the verifier's own greedy choices: streamed as it writes the rest
    if out_finish:
        return list(reuse_span), out_finish  # the whole draft is what the verifier would have written
    out = ver.decode_steps(params=run.params["verifier"], rng=run.rng["verifier"],
                           max_tokens=max(budget - len(reuse_span), 1), detectors=[detector],
                           on_token=stream.on_token if run.on_token else None)[0]
    run.tokens["verifier"] += len(out.tokens)
    return reuse_span + out.tokens, out.finish


def run_stepwise(run: Run) -> RunResult:
    cfg = run.config.stepwise
    if cfg.steps_per_pass(score_mode=run.config.score.mode) > 1 or cfg.pipelines(score_mode=run.config.score.mode):
        from .lookahead import run_lookahead  # lookahead.py builds on this module's helpers

        return run_lookahead(run)
    start = time.perf_counter()
    spec, ver = run.context("speculator"), run.context("verifier")
    v_tok = run.bundle.tokenizers["verifier"]
    v_params = run.params["verifier"]
    can_reuse = cfg.reuse_draft_prefix and v_params.greedy and v_params.repetition_penalty == 1.0
    traj, steps = Trajectory(), []
    k = cfg.candidates
    while not traj.finish:
        index, budget = len(traj.steps), run.step_budget(traj.tokens)
        candidates: list[Candidate] = []
        spec.flush()
        spec_len, spec_logits = spec.length(0), spec.logits[0].copy()
        # The verifier's pending token (the end of a step it wrote) rides along with the scoring pass, whose
        # first row is the logits after it: what a dropped draft rewinds to. No flush needed.
        ver_len = ver.length(0)
        reuse_span: list[int] = []
        accepted = -1
        if index >= cfg.first_n_steps_verifier:
            # 1. Speculate k drafts from the same state.
            if k > 1:
                spec.gather([0] * k)
            with run.timer.phase("speculate"):
                drafts = spec.decode_steps(params=run.params["speculator"], rng=run.rng["speculator"],
                                           max_tokens=budget)
            run.tokens["speculator"] += sum(len(d.tokens) for d in drafts)
            # 2. Verify all drafts in one prefill pass of the verifier.
            spans = [run.convert(d.tokens, src="speculator", dst="verifier") for d in drafts]
            with run.timer.phase("verify"):
                if k > 1:
                    ver.gather([0] * k)
                scored = run.scorer.score_steps(ver, spans)
            best = int(np.argmax(scored.scores))
            if scored.scores[best] >= cfg.threshold:
                accepted = best
            candidates = [Candidate(text=d.text, tokens=len(d.tokens), score=round(float(s), 4), accepted=i == accepted)
                          for i, (d, s) in enumerate(zip(drafts, scored.scores, strict=True))]
        if accepted >= 0:
            # 3a. Accept: keep that branch in both caches; the verifier already holds the step.
            if k > 1:
                spec.gather([accepted])
                ver.gather([accepted])
            draft = drafts[accepted]
            tokens, text, author, out_finish, reused = draft.tokens, draft.text, "speculator", draft.finish, 0
        else:
            # 3b. Fallback: drop every draft from both caches, then the verifier writes the step.
            with run.timer.phase("fallback"):
                keep = 0
                if candidates and can_reuse:
                    lengths = [_greedy_prefix(r, s) for r, s in zip(scored.rows, spans, strict=True)]
                    keep = int(np.argmax(lengths))
                    reuse_span = spans[keep][:lengths[keep]]
                if spec.branches > 1:
                    spec.gather([0])
                if candidates:
                    spec.truncate(0, length=spec_len, logits=spec_logits)
                    if ver.branches > 1:
                        ver.gather([keep])
                    after = scored.rows[keep][len(reuse_span)]  # row 0: the logits before the draft
                    ver.truncate(0, length=ver_len + len(reuse_span), logits=after)
                tokens, out_finish = write_rest_of_step(run, ver, index=index, reuse_span=reuse_span, budget=budget)
                text, author, reused = v_tok.decode(tokens), "verifier", len(reuse_span)
                spec.defer(0, run.convert(tokens, src="verifier", dst="speculator"))
        traj.steps.append(list(tokens))
        traj.texts.append(text)
        step = StepTrace(index=index, author=author, text=text, tokens=len(tokens), candidates=candidates,
                         reused_tokens=reused)
        steps.append(step)
        if run.on_step is not None:
            run.on_step(step)
        traj.finish = run.finish_after_step(traj=traj, out_finish=out_finish, max_steps=None)
    result = run.result(strategy="stepwise", traj=traj, steps=steps, seconds=time.perf_counter() - start)
    result.drafts = draft_counts(steps)
    return result


def draft_counts(steps: list[StepTrace]) -> DraftCounts:
    """The accounting of a run that drafts one step per verifier pass (lookahead 1), read from its steps."""
    drafted = [s for s in steps if s.candidates]
    accepted = sum(s.author == "speculator" for s in drafted)
    wasted = sum(c.tokens for s in drafted for c in s.candidates if not c.accepted)
    return DraftCounts(drafted=len(drafted), accepted=accepted, rejected=len(drafted) - accepted,
                       wasted_tokens=wasted, verify_passes=len(drafted), rounds=len(drafted))
