"""The decoding primitive every strategy builds on, and plain `generate`.

`decode` advances a set of branches, one token per branch per forward, until each branch hits its own
stop: the end of a reasoning step (the manifest's step delimiter, found in the decoded text so it works
when the delimiter is split across tokens or merged into a larger one), a stop string, an eos token, or
its token limit. Finished branches stop consuming tokens while the others go on.

State convention (see model.py): when `decode` returns, each branch's last token is *pending* — sampled
but not yet in the KV cache. The next forward on that branch must feed it first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from .errors import ConfigError
from .kv_cache import KVCache
from .model import RoleModel
from .sampling import SamplingParams, sample
from .tokenizer import StepDetector, Tokenizer

FINISH_REASONS = ("step", "stop", "eos", "length")
STOP_ALL = -1  # next_step's answer that ends every branch at once (the others' unfinished steps are dropped)


@dataclasses.dataclass
class BranchOutput:
    tokens: list[int]  # generated token ids in order; the last one is pending (not yet in the cache)
    logprobs: list[float]  # the model's log-probability of each generated token (raw logits, no sampling warp)
    finish: str  # one of FINISH_REASONS
    text: str = ""  # decoded text of `tokens` (special tokens skipped)


def decode(*, model: RoleModel, tokenizer: Tokenizer, cache: KVCache, logits: np.ndarray, params: SamplingParams,
           rng: np.random.Generator | Sequence[np.random.Generator], max_tokens: int | Sequence[int],
           stop_at_step: bool = True, stop_strings: Sequence[str] = (),
           history: list[list[int]] | None = None, on_token: Callable[[int, int], None] | None = None,
           detectors: list[StepDetector] | None = None, evict_finished: bool = False,
           active: Sequence[bool] | None = None,
           next_step: Callable[[int, BranchOutput], int] | None = None) -> list[BranchOutput]:
    """Sample from `logits` [branches, vocab] (the rows after each branch's last cached token) onwards.

    history[b]: tokens already in branch b (for the repetition penalty); extended in place.
    on_token(branch, token) is called for every token as soon as it is sampled (for streaming).
    detectors[b]: branch b's step detector when the step began before this call (it holds the step's
    earlier tokens, so a delimiter that straddles them is found); fresh ones otherwise.
    evict_finished: drop finished branches from `cache` as decoding goes (the cache then holds only the
    branches still running when decode returns, none if all finished); for callers that discard the cache.
    rng and max_tokens may be given per branch (branches of different requests in one batch); active[b] False
    leaves branch b alone (no tokens, finish "", nothing fed).
    next_step(b, step): called as branch b ends a step (any finish, text decoded); when the step ended at its
    delimiter or token limit and next_step returns n > 0, branch b goes straight on with a new step of at
    most n tokens in the same batch, without waiting for the other branches; STOP_ALL ends every branch now
    (those cut mid-step keep finish ""). Each finished step is handed over through it; the returned list
    then holds each branch's last step, finished or cut.
    """
    branches = cache.branches
    limits = np.broadcast_to(np.asarray(max_tokens, np.int64), (branches,))  # [branches]
    if (limits < 1).any():
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    rngs = None if isinstance(rng, np.random.Generator) else list(rng)
    if rngs is not None and len(rngs) != branches:
        raise ConfigError(f"got {len(rngs)} generators for {branches} branches")
    history = history if history is not None else [[] for _ in range(branches)]
    eos = set(model.generation.eos_ids)
    outs = [BranchOutput(tokens=[], logprobs=[], finish="") for _ in range(branches)]
    if detectors is not None and len(detectors) != branches:
        raise ConfigError(f"got {len(detectors)} step detectors for {branches} branches")
    steps = detectors or [StepDetector(tokenizer=tokenizer, delimiter=model.generation.step_delimiter)
                          for _ in range(branches)]
    running = np.ones(branches, bool) if active is None else np.array(active, bool)  # [branches]
    if running.shape != (branches,):
        raise ConfigError(f"active must have one flag per branch ({branches})")
    if not running.any():
        return outs
    # The loop below runs once per token: per-branch state lives in Python lists (a few branches, where numpy's
    # per-call cost would be most of the time), the arrays are built once per forward.
    is_running: list[bool] = running.tolist()
    limit_of: list[int] = limits.tolist()
    branch_of_row: list[int] = list(range(branches))  # cache row j holds branch branch_of_row[j]
    last: list[int] = [0] * branches  # each branch's latest token: the next forward feeds it
    # Only the repetition penalty reads the history: skip turning it into arrays every step otherwise.
    needs_history = params.repetition_penalty != 1.0
    while True:
        # 1. Sample one token for every running branch (logits has one row per cache row).
        rows = [j for j, b in enumerate(branch_of_row) if is_running[b]]
        live = [branch_of_row[j] for j in rows]
        row_logits = logits if len(rows) == len(branch_of_row) else logits[rows]
        row_history = [np.asarray(history[b], np.int64) for b in live] if needs_history else None
        row_rng = rng if rngs is None else [rngs[b] for b in live]
        tokens, logprobs = sample(logits=row_logits, params=params, rng=row_rng, history=row_history)
        # 2. Record it and check this branch's stops, in order of precedence.
        stop_all = False
        for b, tok, lp in zip(live, tokens.tolist(), logprobs.tolist(), strict=True):
            out = outs[b]
            out.tokens.append(tok)
            out.logprobs.append(lp)
            last[b] = tok
            history[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            step_done = steps[b].push(tok)
            if tok in eos:
                out.finish = "eos"
            elif stop_at_step and step_done:
                out.finish = "step"
            elif stop_strings and any(s in tokenizer.decode(out.tokens) for s in stop_strings):
                out.finish = "stop"
            elif len(out.tokens) >= limit_of[b]:
                out.finish = "length"
            if out.finish and next_step is not None:
                out.text = tokenizer.decode(out.tokens)
                more = next_step(b, out)
                if more == STOP_ALL:
                    stop_all = True
                    break
                if more > 0 and out.finish in ("step", "length"):  # the next step starts in this batch
                    outs[b] = BranchOutput(tokens=[], logprobs=[], finish="")
                    steps[b] = StepDetector(tokenizer=tokenizer, delimiter=model.generation.step_delimiter)
                    limit_of[b] = more
                    continue
            if out.finish:
                is_running[b] = False
        n_running = 0 if stop_all else sum(is_running)
        if not n_running:
            break
        if evict_finished and 2 * n_running <= cache.branches:
            # Drop finished branches from the cache so the batch shrinks. A gather copies the cache, so it
            # runs only when at least half the rows are finished: the copies stay a bounded share of the work.
            keep = [j for j, b in enumerate(branch_of_row) if is_running[b]]
            cache.gather(keep)
            branch_of_row = [branch_of_row[j] for j in keep]
        # 3. One forward: running branches feed their new token, finished ones feed nothing.
        feed = [[last[b]] if is_running[b] else [] for b in branch_of_row]
        logits = model.forward(cache=cache, tokens=feed)
    for out in outs:
        out.text = tokenizer.decode(out.tokens)
    return outs


def generate(*, model: RoleModel, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams,
             rng: np.random.Generator, max_tokens: int, branches_per_prompt: int = 1,
             stop_strings: Sequence[str] = (), on_token: Callable[[int, int], None] | None = None,
             ) -> list[BranchOutput]:
    """Plain decoding until eos, a stop string or max_tokens (reasoning steps do not stop it).

    Prompts of different lengths share one batch. With branches_per_prompt = n > 1 (one prompt only),
    the prompt is prefilled once and its cache forked into n branches that sample independently.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one non-empty prompt")
    if branches_per_prompt < 1:
        raise ConfigError(f"branches_per_prompt must be >= 1, got {branches_per_prompt}")
    if branches_per_prompt > 1 and len(prompts) != 1:
        raise ConfigError("branches_per_prompt > 1 forks a single prompt; pass one prompt")
    longest = max(len(p) for p in prompts) + max_tokens
    cache = model.new_cache(branches=len(prompts), capacity=min(longest, model.arch.max_context))
    cache.reserve(longest)  # refuse up front rather than midway through decoding
    logits = model.forward(cache=cache, tokens=prompts)  # [prompts, vocab]
    history = [list(p) for p in prompts]
    if branches_per_prompt > 1:
        cache.fork(branches_per_prompt)
        logits = np.repeat(logits, branches_per_prompt, axis=0)  # [branches, vocab]
        history = [list(prompts[0]) for _ in range(branches_per_prompt)]
    return decode(model=model, tokenizer=tokenizer, cache=cache, logits=logits, params=params, rng=rng,
                  max_tokens=max_tokens, stop_at_step=False, stop_strings=stop_strings, history=history,
                  on_token=on_token, evict_finished=True)
