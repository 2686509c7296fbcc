"""Stepwise SpecReason for many requests at once: every model forward serves all of them.

A `StepwiseBatch` holds one speculator context and one verifier context whose branches are the requests
("lanes"). Each `tick` runs one step of the paper's loop (stepwise.py) for every lane together:

  1. one batched decode drafts the next step of every lane that drafts (per-lane RNG streams and budgets);
  2. one verifier prefill pass scores all drafts (lanes without a draft feed nothing);
  3. per lane, accept, or drop the draft from both caches (truncate) and keep the draft prefix the verifier
     agrees with; one batched decode lets the verifier write the steps of every falling-back lane.

Lanes join between ticks (their prompts are prefilled, then their cache rows appended: continuous batching)
and leave when they finish (their rows are dropped). A lane gives the same steps as `run_stepwise` of the same
problem and seed alone, up to float rounding in the batched forwards (tested). Lanes of one batch share the
scoring config and both models' sampling params (`batch_key`); thresholds, token limits, stop rules and
seeds are per lane. Only one draft per step (stepwise.candidates == 1) is batched this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..bundle import Bundle
from ..config import ReasonConfig
from ..context import Context
from ..tokenizer import StepDetector
from ..trace import Candidate, RunResult, StepTrace
from .common import Run, StepStream, Trajectory
from .stepwise import _greedy_prefix, _replay


def batch_key(config: ReasonConfig) -> tuple[Any, ...] | None:
    """Configs with equal keys can share a batch; None: this config is not batched (run it alone)."""
    if config.strategy != "stepwise" or config.stepwise.candidates != 1:
        return None
    return (config.score, config.speculator, config.verifier)


@dataclass
class Lane:
    run: Run
    done: Callable[[RunResult | BaseException], None]  # called once with the result or the error
    traj: Trajectory = field(default_factory=Trajectory)
    steps: list[StepTrace] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    forwards_at_join: tuple[int, int] = (0, 0)  # the batch contexts' forward counts when the lane joined


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
        """One step for every lane; finished (or failed) lanes report through their `done` and leave."""
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
        budgets = [lane.run.step_budget(lane.traj.tokens) for lane in lanes]
        drafting = [i not in failed and len(lane.traj.steps) >= lane.run.config.stepwise.first_n_steps_verifier
                    for i, lane in enumerate(lanes)]
        spec.flush()
        spec_len, spec_logits = [spec.length(i) for i in range(n)], spec.logits.copy()
        ver_len = [ver.length(i) for i in range(n)]
        # 1. Speculate: one batched decode for every drafting lane.
        spans: list[list[int]] = [[] for _ in range(n)]
        drafts = None
        scored = None
        started = time.perf_counter()
        if any(drafting):
            drafts = spec.decode_steps(params=first.params["speculator"],
                                       rng=[ln.run.rng["speculator"] for ln in lanes], max_tokens=budgets,
                                       active=drafting)
            spans = [first.convert(d.tokens, src="speculator", dst="verifier") if drafting[i] else []
                     for i, d in enumerate(drafts)]
            for lane, d in zip(lanes, drafts, strict=True):
                lane.run.tokens["speculator"] += len(d.tokens)
        speculated = time.perf_counter()
        # 2. Verify: one prefill pass over every draft.
        if any(drafting):
            scored = first.scorer.score_steps(ver, spans)
        verified = time.perf_counter()
        # 3. Accept or fall back, per lane; the verifier writes all fallback steps in one batched decode.
        accepted = [bool(drafting[i] and scored is not None and scored.scores[i] >= lane.run.config.stepwise.threshold)
                    for i, lane in enumerate(lanes)]
        writes = [i not in failed and not accepted[i] for i in range(n)]
        reuse: list[list[int]] = [[] for _ in range(n)]
        detectors = [StepDetector(tokenizer=v_tok) for _ in range(n)]
        complete = [""] * n  # "step" / "eos" where the reused prefix already is the whole step
        for i, lane in enumerate(lanes):
            if not writes[i] or not drafting[i]:
                continue
            assert scored is not None
            cfg, v_params = lane.run.config.stepwise, lane.run.params["verifier"]
            if cfg.reuse_draft_prefix and v_params.greedy and v_params.repetition_penalty == 1.0:
                reuse[i] = spans[i][:_greedy_prefix(scored.rows[i], spans[i])]
            spec.truncate(i, length=spec_len[i], logits=spec_logits[i])
            ver.truncate(i, length=ver_len[i] + len(reuse[i]), logits=scored.rows[i][len(reuse[i])])
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
        # 4. Commit each lane's step, report it, and see whether the lane is done.
        finished = []
        for i, lane in enumerate(lanes):
            run, traj = lane.run, lane.traj
            run.timer.seconds["speculate"] += speculated - started
            run.timer.seconds["verify"] += verified - speculated
            run.timer.seconds["fallback"] += fell_back - verified
            if i in failed:
                finished.append(i)
                continue
            candidates = []
            if drafting[i]:
                assert drafts is not None and scored is not None
                candidates = [Candidate(text=drafts[i].text, tokens=len(drafts[i].tokens),
                                        score=round(float(scored.scores[i]), 4), accepted=bool(accepted[i]))]
            if accepted[i]:
                assert drafts is not None
                tokens, text, author, out_finish = drafts[i].tokens, drafts[i].text, "speculator", drafts[i].finish
            else:
                if complete[i]:
                    tokens, out_finish = reuse[i], complete[i]
                else:
                    assert outs is not None
                    run.tokens["verifier"] += len(outs[i].tokens)
                    tokens, out_finish = reuse[i] + outs[i].tokens, outs[i].finish
                text, author = v_tok.decode(tokens), "verifier"
                spec.defer(i, run.convert(tokens, src="verifier", dst="speculator"))
            traj.steps.append(list(tokens))
            traj.texts.append(text)
            step = StepTrace(index=len(lane.steps), author=author, text=text, tokens=len(tokens),
                             candidates=candidates, reused_tokens=0 if accepted[i] else len(reuse[i]))
            lane.steps.append(step)
            if run.on_step is not None:
                run.on_step(step)
            traj.finish = run.finish_after_step(traj=traj, out_finish=out_finish, max_steps=None)
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
