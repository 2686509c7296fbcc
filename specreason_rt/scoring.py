"""How the verifier judges speculated steps and trajectories, and how scores combine.

Every verifier score is on the paper's 0-9 scale (SCALE_MAX), whatever the mode:

  likelihood  the verifier's own log-probabilities of the step's tokens (read in the same prefill pass that
              caches the step). average: 9 x the geometric-mean token probability; greedy: 9 x the weakest
              token's probability (one token the verifier finds implausible sinks the step).
  judge       the paper's judge: the judge prompt is appended after the step and the score is read from the
              verifier's logits of the ten digit tokens "0".."9" at its end: one forward, no decoding.
              greedy: the most likely digit; average: the expected digit. The judge prompt is dropped from the
              cache afterwards (truncate), the step stays.
  head        a value head exported inside the verifier graph (the seed's confidence MLP on the hidden state):
              9 x its sigmoid output at the step's last token.

A trajectory (best_of_n, tree leaves) is scored in one batched pass: likelihood and head score each of its
steps and keep the weakest (a chain is as sound as its weakest step); judge reads one score at its end.
The combined score of a trajectory (the seed's three parts, weights in ScoreConfig) is
    (local_weight * local + consistency_weight * consistency + verify_weight * quality) / sum of weights
with local = the speculator's geometric-mean token probability, consistency = the share of trajectories with
the same final answer, quality = verifier score / 9; all three in [0, 1].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import SCALE_MAX, ScoreConfig
from .context import Context
from .errors import ConfigError
from .model import RoleModel
from .sampling import log_softmax
from .tokenizer import Tokenizer

# Tokens per branch per forward when a pass needs every position's logits: bounds the logits buffer
# (branches x CHUNK x vocab floats) on large vocabularies.
CHUNK = 128


@dataclass
class SpanScores:
    scores: np.ndarray  # [branches] 0-9
    rows: list[np.ndarray]  # per branch [len(span) + 1, vocab]: the logits predicting each span token, then after
    logprobs: list[np.ndarray]  # per branch [len(span)]: the verifier's log-probability of each span token


class StepScorer:
    def __init__(self, *, config: ScoreConfig, model: RoleModel, tokenizer: Tokenizer) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        if config.mode == "head" and not getattr(model, "has_value_head", False):
            raise ConfigError("score mode 'head' needs a verifier exported with a value head "
                              "(specreason-export --value-head FILE); use 'likelihood' or 'judge'")
        self.judge_suffix: list[int] = []
        self.digit_ids = np.zeros(10, np.int64)
        if config.mode == "judge":
            for d in range(10):
                ids = tokenizer.encode(str(d), add_special_tokens=False)
                if len(ids) != 1:
                    raise ConfigError(f"judge mode reads the score from single digit tokens, but the verifier's "
                                      f"tokenizer splits {d!r} into {ids}; use 'likelihood'")
                self.digit_ids[d] = ids[0]
            self.judge_suffix = tokenizer.encode(config.judge_prompt, add_special_tokens=False)

    @property
    def extra_room(self) -> int:
        """Tokens a scoring pass may add to a branch beyond the scored span (the judge prompt)."""
        return len(self.judge_suffix)

    # -- the pieces of a score ----------------------------------------------------------------------------------
    def _from_logprobs(self, logprobs: np.ndarray) -> float:
        if logprobs.size == 0:
            return 0.0
        x = float(logprobs.min()) if self.config.method == "greedy" else float(logprobs.mean())
        return SCALE_MAX * float(np.exp(x))

    def _from_judge_row(self, row: np.ndarray) -> float:
        digit_logits = row[self.digit_ids].astype(np.float64)  # [10]
        if self.config.method == "greedy":
            return float(np.argmax(digit_logits))
        p = np.exp(digit_logits - digit_logits.max())
        return float((p / p.sum()) @ np.arange(10))

    def _append_scored(self, ctx: Context, spans: Sequence[Sequence[int]]
                       ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Append spans[b] to verifier branch b; per branch the rows predicting its tokens (then the row
        after), their log-probs, and the value head at each token (empty without a head)."""
        want_values = self.config.mode == "head"
        longest = max(len(s) for s in spans)
        logps: list[list[np.ndarray]] = [[] for _ in spans]
        heads: list[list[np.ndarray]] = [[] for _ in spans]
        rows: list[np.ndarray] = []
        for start in range(0, max(longest, 1), CHUNK):
            pieces = [list(s[start:start + CHUNK]) for s in spans]
            chunk_rows, values = ctx.extend(pieces, with_rows=True, values=want_values)
            assert chunk_rows is not None
            rows = chunk_rows
            for b, piece in enumerate(pieces):
                if piece:
                    lp = log_softmax(rows[b][:-1])  # [len(piece), vocab]
                    logps[b].append(lp[np.arange(len(piece)), piece])
                    if values is not None:
                        heads[b].append(values[b])
        # Only the last chunk's rows are kept: enough for short spans (steps) whose rows fit one chunk.
        return rows, [np.concatenate(x) if x else np.zeros(0, np.float32) for x in logps], \
            [np.concatenate(x) if x else np.zeros(0, np.float32) for x in heads]

    def _judge(self, ctx: Context, rows: list[np.ndarray]) -> np.ndarray:
        """Append the judge prompt, read each branch's digit logits, then drop the prompt from the cache."""
        before = [len(t) for t in ctx.tokens]
        after_span = [r[-1].copy() for r in rows]  # [vocab] each: the logits after the span, kept for later
        judge_rows, _ = ctx.extend([self.judge_suffix] * ctx.branches, with_rows=True)
        assert judge_rows is not None
        scores = np.array([self._from_judge_row(r[-1]) for r in judge_rows])
        for b in range(ctx.branches):
            ctx.truncate(b, length=before[b], logits=after_span[b])
        return scores

    # -- what strategies call -----------------------------------------------------------------------------------
    def score_steps(self, ctx: Context, spans: Sequence[Sequence[int]]) -> SpanScores:
        """Append step spans[b] to verifier branch b in one prefill pass and score each (0-9).

        The spans stay in the verifier's cache (an accepted step costs nothing more); truncate a branch to
        drop a rejected one. Spans must fit one chunk (CHUNK tokens), as steps do. An empty span leaves its
        branch alone and scores NaN (branches of other requests in a batch that have nothing to verify).
        """
        if all(len(s) == 0 for s in spans) or max(len(s) for s in spans) > CHUNK:
            raise ConfigError(f"steps to score must have 1..{CHUNK} tokens; lower limits.max_step_tokens")
        rows, logps, heads = self._append_scored(ctx, spans)
        if self.config.mode == "judge":
            scores = self._judge(ctx, rows)
        elif self.config.mode == "head":
            scores = np.array([SCALE_MAX * float(h[-1]) if len(h) else np.nan for h in heads])
        else:
            scores = np.array([self._from_logprobs(lp) for lp in logps])
        scores[[len(s) == 0 for s in spans]] = np.nan
        return SpanScores(scores=scores, rows=rows, logprobs=logps)

    def score_trajectories(self, ctx: Context, steps: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
        """Append each branch's whole trajectory (its steps) in one batched pass; quality 0-9 per branch."""
        if any(not any(branch) for branch in steps):
            raise ConfigError("a trajectory to score is empty")
        scores = TrajectoryScores(scorer=self, ctx=ctx)
        scores.append(steps)
        return scores.quality()


class TrajectoryScores:
    """Whole-trajectory quality, read as steps arrive: `append` puts new steps into verifier branch b (one
    batched pass per call, so a worker thread can verify the steps written so far while the speculator
    writes the next ones), `quality` reads the score once every step is in. Same numbers as one pass over
    each whole trajectory: likelihood and head score each step from its own tokens, judge reads its prompt
    after the last step."""

    def __init__(self, *, scorer: StepScorer, ctx: Context) -> None:
        self.scorer, self.ctx = scorer, ctx
        self.steps: list[list[float]] = [[] for _ in range(ctx.branches)]  # per branch: each scored step's score

    def append(self, steps: Sequence[Sequence[Sequence[int]]]) -> None:
        """steps[b]: the new steps of branch b (verifier tokens; none for a branch with nothing new)."""
        spans = [[t for step in branch for t in step] for branch in steps]
        if not any(spans):
            return
        _, logps, heads = self.scorer._append_scored(self.ctx, spans)
        mode = self.scorer.config.mode
        for b, branch in enumerate(steps):
            at = 0
            for step in branch:
                if step and mode == "head":
                    self.steps[b].append(SCALE_MAX * float(heads[b][at + len(step) - 1]))
                elif step and mode == "likelihood":
                    self.steps[b].append(self.scorer._from_logprobs(logps[b][at:at + len(step)]))
                at += len(step)

    def quality(self, keep: Sequence[int] | None = None) -> np.ndarray:
        """Quality 0-9 of branches `keep` (all by default; the context keeps only those): the weakest step's
        score, or the judge's score after the whole trajectory."""
        rows = list(range(self.ctx.branches)) if keep is None else list(keep)
        if len(rows) != self.ctx.branches:
            self.ctx.gather(rows)
        if self.scorer.config.mode == "judge":
            return self.scorer._judge(self.ctx, [self.ctx.logits[b][None] for b in range(self.ctx.branches)])
        return np.array([min(self.steps[b], default=0.0) for b in rows])  # nothing to score: 0


@dataclass
class ChainScores:
    scores: list[np.ndarray]  # per branch [steps]: each step's 0-9 score
    rows: list[np.ndarray]  # per branch [total tokens + 1, vocab]: logits predicting each token, then the one after
    starts: list[np.ndarray]  # per branch [steps + 1]: where each step starts in the branch's span, then its end


def score_chains(scorer: StepScorer, ctx: Context, chains: Sequence[Sequence[Sequence[int]]]) -> ChainScores:
    """Append chains[b] (a few consecutive steps) to verifier branch b in one prefill pass and score every step.

    Multi-step lookahead: step i's score is read exactly as score_steps would read it after steps 0..i-1 were
    committed (likelihood: its tokens' log-probs; head: the value at its last token), because a causal model's
    logits at a token do not depend on what follows it. Spans longer than CHUNK run as consecutive passes.
    The chains stay in the cache; truncate a branch to drop the steps it rejects. Judge mode needs one
    judge prompt per step and is refused (config.py checks it first).
    """
    if scorer.config.mode == "judge":
        raise ConfigError("score mode 'judge' cannot score several steps in one pass; use 'likelihood' or 'head'")
    spans = [[t for step in chain for t in step] for chain in chains]
    want_values = scorer.config.mode == "head"
    rows: list[list[np.ndarray]] = [[] for _ in spans]
    heads: list[list[np.ndarray]] = [[] for _ in spans]
    for start in range(0, max(max((len(s) for s in spans), default=0), 1), CHUNK):
        pieces = [s[start:start + CHUNK] for s in spans]
        chunk_rows, values = ctx.extend(pieces, with_rows=True, values=want_values)
        assert chunk_rows is not None
        for b, piece in enumerate(pieces):
            if not piece:
                continue
            # chunk_rows[b]: [len(piece) + 1, vocab]; its first row repeats the previous chunk's last one
            rows[b].append(chunk_rows[b] if not rows[b] else chunk_rows[b][1:])
            if values is not None:
                heads[b].append(values[b])
        if start == 0:
            for b, piece in enumerate(pieces):
                if not piece:  # an empty chain: the branch's current row only
                    rows[b].append(chunk_rows[b][:1])
    out_scores, out_rows, out_starts = [], [], []
    for b, chain in enumerate(chains):
        branch_rows = np.concatenate(rows[b])  # [len(spans[b]) + 1, vocab]
        starts = np.concatenate([[0], np.cumsum([len(step) for step in chain])]).astype(np.int64)  # [steps + 1]
        value = np.concatenate(heads[b]) if heads[b] else np.zeros(0, np.float32)  # [len(spans[b])] (head mode)
        scores = np.zeros(len(chain))
        if len(spans[b]):
            logp = log_softmax(branch_rows[:-1])[np.arange(len(spans[b])), spans[b]]  # [len(spans[b])]
        for i in range(len(chain)):
            lo, hi = int(starts[i]), int(starts[i + 1])
            if want_values:
                scores[i] = SCALE_MAX * float(value[hi - 1]) if hi > lo else np.nan
            else:
                scores[i] = scorer._from_logprobs(logp[lo:hi]) if hi > lo else 0.0
        out_scores.append(scores)
        out_rows.append(branch_rows)
        out_starts.append(starts)
    return ChainScores(scores=out_scores, rows=out_rows, starts=out_starts)


def local_confidence(logprobs: Sequence[float]) -> float:
    """Geometric-mean probability of a trajectory's tokens under the model that sampled them, in [0, 1]."""
    return float(np.exp(np.mean(logprobs))) if len(logprobs) else 0.0


def consistency(answers: Sequence[str | None]) -> np.ndarray:
    """Per trajectory, the share of all trajectories that reach its answer (0 for no answer)."""
    counts = Counter(a for a in answers if a is not None)
    return np.array([counts[a] / len(answers) if a is not None else 0.0 for a in answers])


def combine(*, local: np.ndarray, consistent: np.ndarray, quality: np.ndarray, config: ScoreConfig) -> np.ndarray:
    """The seed's combined score in [0, 1]; quality is the verifier's 0-9 score."""
    w = np.array([config.local_weight, config.consistency_weight, config.verify_weight], np.float64)
    parts = np.stack([local, consistent, np.asarray(quality) / SCALE_MAX])  # [3, branches]
    return np.asarray((w @ parts) / w.sum())
