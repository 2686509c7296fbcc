"""One model's side of a reasoning run: its branches' tokens, their KV cache and the logits that follow them.

A strategy holds one Context per model (speculator, verifier) and moves both through the same operations:
fork a prefilled prompt into branches, decode a step, score or append tokens in one prefill pass, keep some
branches (gather), and drop a rejected step (truncate). Nothing is ever recomputed from the prompt.

Invariant: `tokens[b]` lists branch b's tokens. All but `pending[b]` are in the KV cache; the pending tokens
(the last token decode() sampled, see decode.py) are fed by the next forward, so committing a step costs no
forward of its own. `logits[b]` (the next-token logits after all of branch b's tokens) is valid only when the
branch has nothing pending; `decode_steps` flushes first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .cancel import CancelToken
from .decode import BranchOutput, decode
from .model import RoleModel
from .sampling import SamplingParams
from .tokenizer import StepDetector, Tokenizer


class Context:
    def __init__(self, *, model: RoleModel, tokenizer: Tokenizer, prompt: Sequence[int] | None = None,
                 prompts: Sequence[Sequence[int]] | None = None, room: int, cancel: CancelToken | None = None) -> None:
        """Prefill `prompt` as one branch, or `prompts` as one branch each (one ragged forward); `room` = tokens
        a branch may add after its prompt (checked up front).

        cancel: checked before each forward (prefill, extend, each decoded step), so a cancelled run stops soon.
        """
        self.model, self.tokenizer = model, tokenizer
        self.cancel = cancel
        if cancel is not None:
            cancel.check()
        rows = [list(p) for p in prompts] if prompts is not None else [list(prompt or [])]
        needed = max(len(p) for p in rows) + room
        self.cache = model.new_cache(branches=len(rows), capacity=min(needed, model.arch.max_context))
        self.cache.reserve(needed)  # a no-op when it fits; past the model's context, CacheLimitError with the numbers
        self.prompt_lens = [len(p) for p in rows]  # per branch: where its generated tokens start
        self.tokens: list[list[int]] = rows
        self.pending: list[list[int]] = [[] for _ in rows]
        self.logits: np.ndarray = model.forward(cache=self.cache, tokens=rows)  # [branches, vocab]
        self.forwards = 1  # model forwards run by this context (for the trace)

    @property
    def branches(self) -> int:
        return len(self.tokens)

    def length(self, b: int) -> int:
        return len(self.tokens[b])

    def generated(self, b: int) -> list[int]:
        """Branch b's tokens after the prompt."""
        return self.tokens[b][self.prompt_lens[b]:]

    def decode_to_end(self, *, params: SamplingParams, rng: np.random.Generator | Sequence[np.random.Generator],
                      max_tokens: Sequence[int],
                      next_step: Callable[[int, BranchOutput], int],
                      on_token: Callable[[int, int], None] | None = None) -> list[BranchOutput]:
        """Sample every branch step after step (its first step of at most max_tokens[b]) until next_step(b, step)
        returns 0 for it (or STOP_ALL for all); see decode(). Branches never wait for each other at step ends,
        and finished ones leave the batch as they go, so the context is spent afterwards: it holds no branches.
        Returns each branch's last step: finished (and handed to next_step), or cut by STOP_ALL (finish "").
        """
        self.flush()
        if self.cancel is not None:
            self.cancel.check()
        history = [list(t) for t in self.tokens] if params.repetition_penalty != 1.0 else None
        generated = [0] * self.branches

        def step_end(b: int, step: BranchOutput) -> int:
            generated[b] += len(step.tokens)
            return next_step(b, step)

        outs = decode(model=self.model, tokenizer=self.tokenizer, cache=self.cache, logits=self.logits,
                      params=params, rng=rng, max_tokens=max_tokens, history=history, on_token=on_token,
                      next_step=step_end, evict_finished=True)
        # Every forward fed one token of the branch that ran longest, whose first token needed none.
        ran = [g + (len(o.tokens) if not o.finish else 0) for g, o in zip(generated, outs, strict=True)]
        self.forwards += max(max(ran) - 1, 0)
        self.prompt_lens, self.tokens, self.pending, self.logits = [], [], [], self.logits[:0]
        return outs

    # -- branch bookkeeping -------------------------------------------------------------------------------------
    def gather(self, rows: Sequence[int]) -> None:
        """Keep, reorder or duplicate branches: new branch j is old branch rows[j] (the cache rows move along)."""
        rows = list(rows)
        self.cache.gather(rows)
        self.prompt_lens = [self.prompt_lens[r] for r in rows]
        self.tokens = [list(self.tokens[r]) for r in rows]
        self.pending = [list(self.pending[r]) for r in rows]
        self.logits = self.logits[rows]

    def concat(self, other: Context) -> None:
        """Append other's branches after this one's (a request joining a running batch); other is consumed."""
        self.cache.concat(other.cache)
        self.prompt_lens += other.prompt_lens
        self.tokens += other.tokens
        self.pending += other.pending
        self.logits = np.concatenate([self.logits, other.logits])
        self.forwards += other.forwards

    def truncate(self, b: int, *, length: int, logits: np.ndarray) -> None:
        """Drop branch b's tokens past `length` (a rejected step); `logits` [vocab] = the saved row after them."""
        cached = len(self.tokens[b]) - len(self.pending[b])
        if length > cached:
            raise ValueError(f"branch {b} has {cached} cached tokens; cannot keep {length}")
        self.cache.rewind(b, length)
        self.tokens[b] = self.tokens[b][:length]
        self.pending[b] = []
        self.logits[b] = logits

    # -- forwards -----------------------------------------------------------------------------------------------
    def extend(self, new: Sequence[Sequence[int]], *, with_rows: bool = False, values: bool = False
               ) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """Append new[b] to branch b in one forward (pending tokens go first) and refresh the logits.

        with_rows: also return, per branch, rows [len(new[b]) + 1, vocab]: row i is the logits that predict
        new[b][i] and the last row the logits after the last new token (what scoring needs).
        values: also return, per branch, the value head's output at each new token ([len(new[b])] with
        with_rows, else [1] at the last one).
        """
        feed = [self.pending[b] + list(new[b]) for b in range(self.branches)]
        if not any(feed):
            same = [self.logits[b][None] for b in range(self.branches)] if with_rows else None
            return same, ([np.zeros(0, np.float32)] * self.branches if values else None)
        if self.cancel is not None:
            self.cancel.check()
        if values:
            logits, head = self.model.forward(cache=self.cache, tokens=feed, all_logits=with_rows, values=True)
        else:
            logits, head = self.model.forward(cache=self.cache, tokens=feed, all_logits=with_rows), None
        self.forwards += 1
        rows: list[np.ndarray] | None = [] if with_rows else None
        heads: list[np.ndarray] | None = [] if values else None
        for b in range(self.branches):
            n_pending, n_feed = len(self.pending[b]), len(feed[b])
            self.tokens[b].extend(new[b])
            self.pending[b] = []
            if heads is not None and head is not None:
                heads.append(np.zeros(0, np.float32) if n_feed == 0 else
                             head[b, n_pending:n_feed] if with_rows else head[b:b + 1])
            if n_feed == 0:
                if rows is not None:
                    rows.append(self.logits[b][None])
                continue
            if rows is None:
                self.logits[b] = logits[b]
                continue
            # logits[b, j] follows fed token j; the row predicting the first new token follows the last
            # pending token, or is the branch's current row (not yet overwritten) when nothing was pending.
            first = logits[b, n_pending - 1][None] if n_pending else self.logits[b][None]
            branch_rows = np.concatenate([first, logits[b, n_pending:n_feed]])  # [len(new[b]) + 1, vocab]
            rows.append(branch_rows)
            self.logits[b] = branch_rows[-1]
        return rows, heads

    def defer(self, b: int, tokens: Sequence[int]) -> None:
        """Append tokens to branch b as pending: the next forward feeds them (no forward of their own)."""
        self.tokens[b].extend(tokens)
        self.pending[b].extend(tokens)

    def flush(self) -> None:
        """Feed pending tokens so that `logits` is valid for every branch."""
        if any(self.pending):
            self.extend([[] for _ in range(self.branches)])

    def decode_steps(self, *, params: SamplingParams, rng: np.random.Generator | Sequence[np.random.Generator],
                     max_tokens: int | Sequence[int], stop_at_step: bool = True,
                     detectors: list[StepDetector] | None = None, active: Sequence[bool] | None = None,
                     on_token: Callable[[int, int], None] | None = None) -> list[BranchOutput]:
        """Sample every (active) branch until its step ends (or eos / max_tokens); the tokens join the branches.

        The last token of each branch becomes pending. detectors: per-branch step detectors that already hold
        the step's first tokens (when those were appended another way), so a delimiter across them is found.
        rng / max_tokens per branch, active and on_token(branch, token): see decode().
        """
        self.flush()
        if self.cancel is not None:
            self.cancel.check()
        history = [list(t) for t in self.tokens] if params.repetition_penalty != 1.0 else None
        outs = decode(model=self.model, tokenizer=self.tokenizer, cache=self.cache, logits=self.logits,
                      params=params, rng=rng, max_tokens=max_tokens, stop_at_step=stop_at_step, history=history,
                      detectors=detectors, active=active, on_token=on_token)
        self.forwards += max(max(len(o.tokens) for o in outs) - 1, 0)
        for b, out in enumerate(outs):
            if out.tokens:
                self.tokens[b].extend(out.tokens)
                self.pending[b] = out.tokens[-1:]
        return outs
