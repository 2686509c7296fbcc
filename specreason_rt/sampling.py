"""Token sampling: a pure function of (logits, params, rng) (STYLE.md §4).

Terms used below:

    raw logits        the model's output row for one branch, untouched.
    processed logits  raw logits after the processors, in the order transformers' `generate` applies them:
                      repetition penalty -> temperature -> top-k -> top-p -> min-p. A processor *removes*
                      a token by setting its logit to -inf.
    processed logprobs  log-softmax of the processed logits: the distribution a token is drawn from.
    logprob           what `sample` returns beside each token: log-softmax of the RAW logits at that token, the
                      model's own probability, which scoring uses as local confidence (it does not depend on
                      the sampling knobs).

Greedy decoding is temperature 0 (and any temperature below MIN_TEMPERATURE: dividing float32 logits by a
tinier one overflows to inf and the draw turns into NaN; such a distribution is the argmax anyway): the argmax
of the penalised logits; top-k, top-p and min-p are ignored because they never remove the argmax. Ties (equal
logits) always go to the lowest token id, so every result is reproducible: greedy picks the lowest id among
the maxima, and top-k / top-p keep lower ids first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SpecReasonError

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (vLLM uses the same epsilon)


class SamplingError(SpecReasonError, ValueError):
    """Bad sampling parameters or inputs; the message says what to change."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off; else keep exactly the k most likely tokens
    top_p: float = 1.0  # 1 = off; else keep the smallest most-likely set whose probability reaches top_p
    min_p: float = 0.0  # 0 = off; else drop tokens with probability < min_p * (probability of the top token)
    # 1 = off; transformers semantics over the tokens already in the branch: logit / p if logit > 0 else logit * p
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise SamplingError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int | np.integer) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise SamplingError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                                f"got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax along the last axis; -inf entries stay -inf.

    Subtracting the row maximum keeps exp() in range; a row needs at least one finite entry.
    """
    top = np.max(logits, axis=-1, keepdims=True)
    shifted = logits - top
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _apply_repetition_penalty(logits: np.ndarray, *, penalty: float, history: list[np.ndarray] | None) -> None:
    """In place. logits: [branches, vocab]; history[b]: token ids already in branch b (duplicates allowed)."""
    if penalty == 1.0 or history is None:
        return
    for b, ids in enumerate(history):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            continue
        seen = logits[b, ids]
        # Dividing a positive logit and multiplying a negative one both make the token less likely (p > 1).
        logits[b, ids] = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly k tokens per row, lowest ids first among equal logits. logits: [branches, vocab]."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    # kth: [branches, 1], the k-th largest logit. Everything strictly above it stays; among the tokens equal
    # to it, the lowest ids fill the remaining slots (a deterministic tie rule, unlike an unstable sort).
    kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1:k]
    above = logits > kth
    equal = logits == kth
    slots = k - above.sum(axis=-1, keepdims=True)
    keep = above | (equal & (np.cumsum(equal, axis=-1) <= slots))
    return np.where(keep, logits, -np.inf).astype(logits.dtype)


def _top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest most-likely set of tokens whose probability reaches p. logits: [branches, vocab]."""
    if p >= 1.0:
        return logits
    # order: [branches, vocab], most likely first; the stable sort puts lower ids first among equal logits.
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = np.exp(log_softmax(np.take_along_axis(logits, order, axis=-1).astype(np.float64)))
    # A token stays when the mass strictly before it is still short of p, so the first token always stays and
    # the token that makes the mass reach p stays too. float64 keeps the running sum accurate over 50k tokens.
    before = np.cumsum(probs, axis=-1) - probs
    keep_sorted = before < p
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf).astype(logits.dtype)


def _min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's. logits: [branches, vocab]."""
    if min_p == 0.0:
        return logits
    probs = np.exp(log_softmax(logits))
    keep = probs >= min_p * probs.max(axis=-1, keepdims=True)  # the top token always passes (min_p <= 1)
    return np.where(keep, logits, -np.inf).astype(logits.dtype)


def _check_inputs(logits: np.ndarray, history: list[np.ndarray] | None) -> None:
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise SamplingError(f"logits must be [branches, vocab], got shape {logits.shape}; "
                            "take the last position's row per branch")
    if history is not None and len(history) != logits.shape[0]:
        raise SamplingError(f"history has {len(history)} entries but logits have {logits.shape[0]} branches; "
                            "pass one array of token ids per branch (or None)")


def processed_logprobs(*, logits: np.ndarray, params: SamplingParams,
                       history: list[np.ndarray] | None = None) -> np.ndarray:
    """The distribution `sample` draws from, as log-probabilities with -inf for removed tokens.

    logits: [branches, vocab]; history[b]: token ids already in branch b. Returns [branches, vocab] float32.
    For greedy params the distribution is a point mass: 0 at the (lowest-id) argmax, -inf elsewhere.
    """
    x = _penalized(logits, params=params, history=history)
    if params.greedy:
        out = np.full_like(x, -np.inf)
        out[np.arange(x.shape[0]), np.argmax(x, axis=-1)] = 0.0
        return out
    return log_softmax(_warp(x, params)).astype(np.float32, copy=False)


def _penalized(logits: np.ndarray, *, params: SamplingParams, history: list[np.ndarray] | None) -> np.ndarray:
    """Checked float32 logits [branches, vocab] with 1. the repetition penalty applied (also for greedy, as in
    transformers). Copied only when the penalty writes into them: the caller's array stays untouched."""
    _check_inputs(logits, history)
    if params.repetition_penalty == 1.0 or history is None:
        return np.asarray(logits, dtype=np.float32)
    x = np.array(logits, dtype=np.float32, copy=True)
    _apply_repetition_penalty(x, penalty=params.repetition_penalty, history=history)
    return x


def _warp(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """2. Temperature, 3. top-k, 4. top-p, 5. min-p on (penalised) logits [branches, vocab]; each sees the
    previous one's output, as in generate. Unnormalised: removed tokens are -inf."""
    if params.temperature != 1.0:
        x = x / np.float32(params.temperature)
    x = _top_k(x, params.top_k)
    x = _top_p(x, params.top_p)
    return _min_p(x, params.min_p)


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def _inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the first token whose cumulative probability exceeds u * total (an inverse-CDF draw).

    probs: [branches, vocab] float32, unnormalised, 0 for removed tokens (which, adding nothing to the sum,
    are never the first to exceed it); u: [branches] uniform in [0, 1). Returns [branches] int64.
    A full float64 cumsum over a 50k vocabulary costs ~0.5 ms per row (cumsum does not vectorise), so the
    sum runs in two levels: block totals (a vectorised reduction), a cumsum over the blocks, and a cumsum
    inside the one block that holds the target. Sums are float64, accurate over the whole vocabulary.
    """
    branches, vocab = probs.shape
    if vocab <= 16 * CDF_BLOCK:
        # Small vocabularies: one vectorised float64 cumsum is cheaper than the per-row block search.
        cdf = np.cumsum(probs, axis=-1, dtype=np.float64)  # [branches, vocab]
        tokens = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=-1)
        off = (tokens >= vocab) | (probs[np.arange(branches), np.minimum(tokens, vocab - 1)] == 0)
        if off.any():  # rounding put the target at the very end: the last token with any probability
            last = vocab - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
            tokens = np.where(off, last, tokens)
        return tokens.astype(np.int64)
    n_blocks = -(-vocab // CDF_BLOCK)
    padded = np.zeros((branches, n_blocks * CDF_BLOCK), np.float32)  # [branches, n_blocks * CDF_BLOCK]
    padded[:, :vocab] = probs
    block_cdf = np.cumsum(padded.reshape(branches, n_blocks, CDF_BLOCK).sum(axis=-1, dtype=np.float64),
                          axis=-1)  # [branches, n_blocks]
    tokens = np.empty(branches, np.int64)
    for b in range(branches):
        target = u[b] * block_cdf[b, -1]
        j = min(int(np.searchsorted(block_cdf[b], target, side="right")), n_blocks - 1)
        start = block_cdf[b, j - 1] if j else 0.0
        inner = start + np.cumsum(padded[b, j * CDF_BLOCK:(j + 1) * CDF_BLOCK], dtype=np.float64)
        t = j * CDF_BLOCK + int(np.searchsorted(inner, target, side="right"))
        if t >= vocab or probs[b, t] == 0:
            # Rounding put the target at the very end: take the last token that has any probability.
            t = vocab - 1 - int(np.argmax(probs[b, ::-1] > 0))
        tokens[b] = t
    return tokens


def sample(*, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | Sequence[np.random.Generator],
           history: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one token per branch.

    logits: [branches, vocab] float32; history[b]: token ids already in branch b (for the repetition penalty).
    Returns tokens [branches] int64 and logprobs [branches] float32, the log-softmax of the RAW logits at the
    chosen tokens. Greedy params draw nothing from rng; otherwise exactly one uniform per branch, so the same
    seed gives the same tokens. rng may be one generator per branch (branches of different requests sharing a
    batch keep their own streams: a request samples the same tokens batched or alone).
    """
    x = _penalized(logits, params=params, history=history)  # [branches, vocab]
    if params.greedy and x is logits:
        # Greedy on unpenalised logits: the chosen token is the row's max, so its log-probability is
        # -log(sum(exp(x - max))). This runs once per decoded token: the fewest numpy calls.
        top = x.max(axis=-1, keepdims=True)  # [branches, 1]
        lse = np.log(np.exp(x - top).sum(axis=-1))  # [branches]: logsumexp minus the max
        return x.argmax(axis=-1).astype(np.int64), (-lse).astype(np.float32)
    rows = np.arange(logits.shape[0])
    if params.greedy:
        tokens = np.argmax(x, axis=-1)  # where processed_logprobs puts its point mass, without building it
    else:
        # The draw needs the warped distribution only up to a constant: exp(z - max z), no normalisation.
        z = _warp(x, params)  # [branches, vocab]
        probs = np.exp(z - z.max(axis=-1, keepdims=True))  # float32 (vectorised); exactly 0 for removed tokens
        if isinstance(rng, np.random.Generator):
            u = np.asarray(rng.random(size=logits.shape[0]))
        else:
            u = np.array([g.random() for g in rng])  # [branches]: one draw from each branch's own stream
        tokens = _inverse_cdf(probs, u)
    tokens = tokens.astype(np.int64)  # [branches]
    # The log-probability of each chosen token under the RAW logits: only its logsumexp is needed.
    x = np.asarray(logits, dtype=np.float32)
    top = x.max(axis=-1)  # [branches]
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))  # [branches]
    return tokens, (x[rows, tokens] - lse).astype(np.float32)
