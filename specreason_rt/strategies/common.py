"""State shared by every strategy for one run, and sampling whole trajectories step by step.

`Run` holds what one problem needs: the config, one RNG stream per model (so the speculator's draws never
shift the verifier's: a seed reproduces a run, and a strategy that lets the verifier write every step gives
exactly the verifier's own output), the prompts in each model's tokenizer, phase timers and counters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..answers import extract_answer
from ..bundle import Bundle
from ..cancel import CancelToken
from ..config import ReasonConfig
from ..context import Context
from ..decode import STOP_ALL, BranchOutput
from ..errors import CacheLimitError
from ..prompt import Prompt
from ..sampling import SamplingParams
from ..scoring import StepScorer
from ..tokenizer import StreamDecoder
from ..trace import Candidate, RunResult, StepTrace, Timer, TokenDelta

ROLE_STREAMS = {"speculator": 0, "verifier": 1}


@dataclass
class Trajectory:
    """One branch's solution so far: its steps (token ids in the sampling model's tokenizer) and texts."""

    steps: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # sampling model's log-prob of every token
    finish: str = ""  # "" while running, else RunResult.finish values
    quality: list[float] = field(default_factory=list)  # verifier score (0-9) per step, where scored

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.steps)


class Run:
    def __init__(self, *, bundle: Bundle, problem: str | Prompt, config: ReasonConfig,
                 on_step: Callable[[StepTrace], None] | None = None, cancel: CancelToken | None = None,
                 on_token: Callable[[TokenDelta], None] | None = None) -> None:
        """on_step(step) as each step is committed; on_token(delta) as the verifier writes a step's text (token
        by token) and as a draft is accepted (its whole text at once), before that step's on_step."""
        self.bundle, self.config, self.on_step, self.cancel = bundle, config, on_step, cancel
        self.on_token = on_token
        self.timer = Timer()
        self.rng = {role: np.random.default_rng([config.seed, stream]) for role, stream in ROLE_STREAMS.items()}
        self.params: dict[str, SamplingParams] = {"speculator": config.speculator, "verifier": config.verifier}
        self.tokens = dict.fromkeys(ROLE_STREAMS, 0)
        self.contexts: list[tuple[str, Context]] = []
        self.shared = bundle.manifest.tokenizers_shared
        self.prompt = Prompt.of(problem)
        self.prompts = {role: self.prompt.encode(bundle.tokenizers[role]) for role in bundle.models}
        self._scorer: StepScorer | None = None
        # The token budget of the solution: the configured one, capped by what fits every model's context.
        fits = min(m.arch.max_context - len(self.prompts[r]) - self._extra_room(r) for r, m in bundle.models.items())
        if fits < 1:
            raise CacheLimitError(f"the prompt leaves no room in the models' context ({fits} tokens); "
                                  "shorten the problem")
        self.budget = min(config.limits.max_tokens, fits)

    def _extra_room(self, role: str) -> int:
        uses_verifier_scores = self.config.strategy in ("stepwise", "best_of_n", "tree")
        return self.scorer.extra_room if role == "verifier" and uses_verifier_scores else 0

    @property
    def scorer(self) -> StepScorer:
        if self._scorer is None:
            self._scorer = StepScorer(config=self.config.score, model=self.bundle.models["verifier"],
                                      tokenizer=self.bundle.tokenizers["verifier"])
        return self._scorer

    def context(self, role: str) -> Context:
        """Prefill the prompt for `role` (one branch), with room for the whole token budget."""
        room = self.budget + self._extra_room(role)
        with self.timer.phase("prefill"):
            ctx = Context(model=self.bundle.models[role], tokenizer=self.bundle.tokenizers[role],
                          prompt=self.prompts[role], room=room, cancel=self.cancel)
        self.contexts.append((role, ctx))
        return ctx

    def convert(self, tokens: Sequence[int], *, src: str, dst: str) -> list[int]:
        """A span of `src`'s tokens in `dst`'s tokenizer: the same ids when shared, else via the text."""
        if self.shared or src == dst:
            return list(tokens)
        text = self.bundle.tokenizers[src].decode(tokens)
        return self.bundle.tokenizers[dst].encode(text, add_special_tokens=False)

    def step_budget(self, used: int) -> int:
        return min(self.config.limits.max_step_tokens, self.budget - used)

    def finish_after_step(self, *, traj: Trajectory, out_finish: str, max_steps: int | None) -> str:
        """Why a trajectory stops after its latest step, or "" to go on."""
        limits = self.config.limits
        if out_finish == "eos":
            return "eos"
        if limits.stop_on_answer and extract_answer(traj.text, fmt=self.config.answer.format) is not None:
            return "answer"
        if traj.tokens >= self.budget:
            return "budget"
        if limits.stop_on_repeat and len(traj.texts) >= 2 and traj.texts[-1].strip() == traj.texts[-2].strip():
            return "repeat"
        if max_steps is not None and len(traj.steps) >= max_steps:
            return "depth"
        return ""

    def result(self, *, strategy: str, traj: Trajectory, steps: list[StepTrace], seconds: float,
               candidates: list[Candidate] | None = None, details: dict | None = None) -> RunResult:
        forwards = dict.fromkeys(ROLE_STREAMS, 0)
        for role, ctx in self.contexts:
            forwards[role] += ctx.forwards
        return RunResult(strategy=strategy, answer=extract_answer(traj.text, fmt=self.config.answer.format),
                         text=traj.text, steps=steps, finish=traj.finish or "budget", seconds=seconds,
                         timings=dict(self.timer.seconds), tokens=dict(self.tokens), forwards=forwards,
                         candidates=candidates or [], config=self.config.to_json(), details=details or {})


class StepStream:
    """One step's text for `run.on_token` as `role` writes it (nothing is decoded when no one listens).

    The verifier's tokens stream as it writes them; a speculator streams only where its text is final as
    written (the speculator-alone baseline), never a draft that the verifier may still reject."""

    def __init__(self, run: Run, *, index: int, role: str = "verifier") -> None:
        self.run, self.index, self.role = run, index, role
        self.decoder = StreamDecoder(tokenizer=run.bundle.tokenizers[role]) if run.on_token else None

    def push(self, tokens: Sequence[int]) -> None:
        if self.decoder is None or self.run.on_token is None:
            return
        text = "".join(self.decoder.push(t) for t in tokens)
        if text:
            self.run.on_token(TokenDelta(step=self.index, author=self.role, text=text))

    def on_token(self, branch: int, token: int) -> None:  # decode()'s callback; branch: the caller maps it
        self.push([token])


def sample_trajectories(run: Run, ctx: Context, *, role: str, trajs: list[Trajectory],
                        max_steps: int | None, phase: str = "speculate", stream: bool = False,
                        enough: int | None = None, on_step: Callable[[int, Trajectory], None] | None = None,
                        ) -> list[Trajectory]:
    """Continue trajectory i on context branch i, step after step, until each one finishes.

    The branches decode as one batch but never wait for each other at step ends: a branch that ends a step
    starts its next one in the same forward. (Stepping them in lockstep made every step as long as the
    longest branch's, and best-of-4 ran 1.4-1.6x the forwards its longest trajectory needs.) Finished
    trajectories leave the batch as they go, so later forwards run on fewer branches; the context is spent
    afterwards (it holds no branches).
    enough: once this many of the trajectories have finished, the others stop where they are (finish
    "stopped"; their unfinished step is dropped).
    on_step(i, trajectory i) as each step joins it (from this thread, inside the decode loop: keep it short).
    """
    rows = [i for i, t in enumerate(trajs) if not t.finish]  # context branch j continues trajectory rows[j]
    if not rows:
        return trajs
    if len(rows) != ctx.branches:
        ctx.gather(rows)
    # stream: the text is final as written (one trajectory of one model), so it goes out token by token and
    # step by step through run.on_token / run.on_step instead of at the end.
    live = stream and len(trajs) == 1
    step_stream = [StepStream(run, index=len(trajs[0].steps), role=role) if live and run.on_token else None]
    finished = [len(trajs) - len(rows)]

    def on_token(branch: int, token: int) -> None:
        if step_stream[0] is not None:
            step_stream[0].push([token])

    def next_step(j: int, out: BranchOutput) -> int:
        traj = trajs[rows[j]]
        traj.steps.append(out.tokens)
        traj.texts.append(out.text)
        traj.logprobs.extend(out.logprobs)
        run.tokens[role] += len(out.tokens)
        if on_step is not None:
            on_step(rows[j], traj)
        if live and run.on_step is not None:
            run.on_step(StepTrace(index=len(traj.steps) - 1, author=role, text=out.text, tokens=len(out.tokens)))
        traj.finish = run.finish_after_step(traj=traj, out_finish=out.finish, max_steps=max_steps)
        if traj.finish:
            finished[0] += 1
            return STOP_ALL if enough is not None and finished[0] >= enough else 0
        if run.cancel is not None:
            run.cancel.check()  # between steps, as when each step was its own decode call
        if step_stream[0] is not None:
            step_stream[0] = StepStream(run, index=len(traj.steps), role=role)
        return run.step_budget(traj.tokens)

    with run.timer.phase(phase):
        last = ctx.decode_to_end(params=run.params[role], rng=run.rng[role], next_step=next_step,
                                 max_tokens=[run.step_budget(trajs[i].tokens) for i in rows],
                                 on_token=on_token if step_stream[0] is not None else None)
    for i, out in zip(rows, last, strict=True):
        if not trajs[i].finish:  # stopped by `enough`: its unfinished step was generated, then dropped
            trajs[i].finish = "stopped"
            run.tokens[role] += len(out.tokens)
    return trajs


def trajectory_steps(traj: Trajectory, *, author: str) -> list[StepTrace]:
    return [StepTrace(index=i, author=author, text=text, tokens=len(tokens))
            for i, (text, tokens) in enumerate(zip(traj.texts, traj.steps, strict=True))]
