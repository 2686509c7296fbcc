"""Sampling on hand-checkable vocabularies (like llama.cpp's tests/test-sampling.cpp) and against transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specreason_rt.errors import SpecReasonError
from specreason_rt.sampling import SamplingError, SamplingParams, log_softmax, processed_logprobs, sample

# Five tokens with probabilities 0.1, 0.2, 0.3, 0.4 and 0 (log(0) = -inf is allowed in logits).
PROBS = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
LOGITS = np.log(PROBS)[None, :]  # [1, 4]


def kept_probs(params: SamplingParams, logits: np.ndarray = LOGITS, history: list | None = None) -> np.ndarray:
    return np.exp(processed_logprobs(logits=logits, params=params, history=history))[0]


def test_log_softmax_is_stable_and_normalised() -> None:
    x = np.array([[1000.0, 1001.0, -np.inf], [0.0, 0.0, 0.0]], np.float32)
    out = log_softmax(x)
    assert np.all(np.isfinite(out[:, :2])) and out[0, 2] == -np.inf
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], np.log(1 / 3), rtol=1e-6)


def test_greedy_is_argmax_and_ignores_truncation() -> None:
    logits = np.array([[0.1, 2.0, 0.5, -1.0], [3.0, 0.0, 3.0, 1.0]], np.float32)
    tokens, logprobs = sample(logits=logits, params=SamplingParams(top_k=1, top_p=0.1, min_p=0.9),
                              rng=np.random.default_rng(0))
    assert tokens.tolist() == [1, 0]  # a tie goes to the lowest id
    assert tokens.dtype == np.int64 and logprobs.dtype == np.float32
    np.testing.assert_allclose(logprobs, log_softmax(logits)[[0, 1], [1, 0]], rtol=1e-6)


def test_greedy_does_not_consume_randomness() -> None:
    rng = np.random.default_rng(3)
    sample(logits=LOGITS, params=SamplingParams(), rng=rng)
    assert rng.random() == np.random.default_rng(3).random()


def test_top_k_keeps_exactly_k() -> None:
    for k, kept in [(1, [3]), (2, [2, 3]), (3, [1, 2, 3]), (4, [0, 1, 2, 3]), (10, [0, 1, 2, 3])]:
        p = kept_probs(SamplingParams(temperature=1.0, top_k=k))
        assert np.flatnonzero(p).tolist() == kept
        np.testing.assert_allclose(p[kept], PROBS[kept] / PROBS[kept].sum(), rtol=1e-5)


def test_top_k_ties_keep_lowest_ids() -> None:
    logits = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]], np.float32)
    p = kept_probs(SamplingParams(temperature=1.0, top_k=2), logits)
    assert np.flatnonzero(p).tolist() == [1, 2]
    np.testing.assert_allclose(p[[1, 2]], 0.5, rtol=1e-6)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # Sorted: 0.4, 0.3, 0.2, 0.1 -> cumulative 0.4, 0.7, 0.9, 1.0.
    cases = [(0.3, [3]), (0.39, [3]), (0.41, [2, 3]), (0.69, [2, 3]), (0.8, [1, 2, 3]), (0.95, [0, 1, 2, 3])]
    for top_p, kept in cases:
        p = kept_probs(SamplingParams(temperature=1.0, top_p=top_p))
        assert np.flatnonzero(p).tolist() == kept, top_p
        np.testing.assert_allclose(p[kept], PROBS[kept] / PROBS[kept].sum(), rtol=1e-5)


def test_top_p_ties_are_deterministic() -> None:
    logits = np.zeros((1, 4), np.float32)  # four tokens at 0.25: reaching 0.5 needs two, the lowest ids
    assert np.flatnonzero(kept_probs(SamplingParams(temperature=1.0, top_p=0.5), logits)).tolist() == [0, 1]


def test_top_k_then_top_p() -> None:
    # top-k 3 leaves 0.2, 0.3, 0.4 -> renormalised 2/9, 3/9, 4/9; top-p 0.6 then needs the top two (7/9).
    p = kept_probs(SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    assert np.flatnonzero(p).tolist() == [2, 3]
    np.testing.assert_allclose(p[[2, 3]], [3 / 7, 4 / 7], rtol=1e-5)


def test_min_p_threshold_is_relative_to_top_token() -> None:
    # Threshold = min_p * 0.4: 0.5 -> 0.2 keeps {0.2, 0.3, 0.4}; 0.76 -> 0.304 keeps {0.4}; 0.74 keeps {0.3, 0.4}.
    for min_p, kept in [(0.2, [0, 1, 2, 3]), (0.5, [1, 2, 3]), (0.74, [2, 3]), (0.76, [3]), (1.0, [3])]:
        assert np.flatnonzero(kept_probs(SamplingParams(temperature=1.0, min_p=min_p))).tolist() == kept, min_p


def test_repetition_penalty_positive_and_negative_logits() -> None:
    logits = np.array([[2.0, -2.0, 1.0, -1.0, 0.0]], np.float32)
    history = [np.array([0, 1, 1, 4])]  # duplicates count once
    expected = np.array([[1.0, -4.0, 1.0, -1.0, 0.0]], np.float32)  # 2/2, -2*2, untouched, untouched, 0/2
    np.testing.assert_allclose(processed_logprobs(logits=logits, params=SamplingParams(temperature=1.0,
                               repetition_penalty=2.0), history=history), log_softmax(expected), rtol=1e-6)
    # Greedy applies it too: token 0 (2.0 -> 1.0) now ties token 2 (1.0) and the lower id wins.
    tokens, logprobs = sample(logits=logits, params=SamplingParams(repetition_penalty=2.0), history=history,
                              rng=np.random.default_rng(0))
    assert tokens.tolist() == [0]
    tokens, _ = sample(logits=logits, params=SamplingParams(repetition_penalty=3.0), history=history,
                       rng=np.random.default_rng(0))
    assert tokens.tolist() == [2]
    # The returned logprob is the model's own (raw logits), not the penalised one.
    np.testing.assert_allclose(logprobs, log_softmax(logits)[0, [0]], rtol=1e-6)


def test_history_is_per_branch() -> None:
    logits = np.tile(np.array([[3.0, 2.0, 0.0]], np.float32), (2, 1))
    tokens, _ = sample(logits=logits, params=SamplingParams(repetition_penalty=10.0),
                       history=[np.array([0]), np.array([], np.int64)], rng=np.random.default_rng(0))
    assert tokens.tolist() == [1, 0]


def empirical_matches(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Frequencies within 5 standard deviations of the exact probabilities (binomial, n = len(tokens))."""
    n = len(tokens)
    freq = np.bincount(tokens, minlength=len(probs)) / n
    tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12
    assert np.all(np.abs(freq - probs) <= tol), (freq, probs, tol)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_softmax(temperature: float) -> None:
    n = 20_000
    logits = np.tile(LOGITS, (n, 1))  # n branches = n independent draws in one call
    tokens, _ = sample(logits=logits, params=SamplingParams(temperature=temperature), rng=np.random.default_rng(7))
    exact = np.exp(log_softmax(LOGITS[0].astype(np.float64) / temperature))
    empirical_matches(tokens, exact)


def test_removed_tokens_are_never_drawn() -> None:
    n = 5_000
    logits = np.tile(np.array([[1.0, -np.inf, 0.5, 3.0, 2.0]], np.float32), (n, 1))
    tokens, _ = sample(logits=logits, params=SamplingParams(temperature=1.5, top_k=3),
                       rng=np.random.default_rng(1))
    assert set(np.unique(tokens).tolist()) == {0, 3, 4}
    empirical_matches(tokens, kept_probs(SamplingParams(temperature=1.5, top_k=3), logits[:1]).astype(np.float64))


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(0).normal(size=(8, 100)).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    history = [np.arange(b, b + 10) for b in range(8)]
    runs = [sample(logits=logits, params=params, history=history, rng=np.random.default_rng(42)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    other = sample(logits=logits, params=params, history=history, rng=np.random.default_rng(43))
    assert not np.array_equal(runs[0][0], other[0])


def test_sample_leaves_logits_untouched() -> None:
    logits = np.array([[2.0, -2.0, 1.0]], np.float32)
    before = logits.copy()
    sample(logits=logits, params=SamplingParams(temperature=0.5, repetition_penalty=2.0), history=[np.array([0, 1])],
           rng=np.random.default_rng(0))
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("kwargs, hint", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=math.nan), "temperature must be"),
    (dict(top_k=-1), "top_k must be"),
    (dict(top_k=2.5), "top_k must be"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(min_p=-0.1), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"),
])
def test_invalid_params_raise_with_hint(kwargs: dict, hint: str) -> None:
    with pytest.raises(SamplingError, match=hint.replace("(", r"\(").replace("[", r"\[")):
        SamplingParams(**kwargs)


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(SamplingError, match=r"\[branches, vocab\]"):
        sample(logits=np.zeros(4, np.float32), params=SamplingParams(), rng=np.random.default_rng(0))
    with pytest.raises(SamplingError, match="one array of token ids per branch"):
        sample(logits=np.zeros((2, 4), np.float32), params=SamplingParams(), rng=np.random.default_rng(0),
               history=[np.array([1])])
    assert issubclass(SamplingError, SpecReasonError) and issubclass(SamplingError, ValueError)


# Parameter sets compared with transformers' own processors, in generate's order.
TRANSFORMERS_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=10),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=0.6, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(temperature=2.0, top_k=5, top_p=0.5, repetition_penalty=0.8),
]


@pytest.mark.parametrize("params", TRANSFORMERS_CASES)
def test_matches_transformers_logits_processors(params: SamplingParams) -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    branches, vocab, seen = 4, 64, 12
    logits = (rng.normal(size=(branches, vocab)) * 3).astype(np.float32)  # [branches, vocab]
    history = rng.integers(0, vocab, size=(branches, seen))  # [branches, seen]; the same length, as in a batch

    chain = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
    if params.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=params.top_p))
    if params.min_p:
        chain.append(MinPLogitsWarper(min_p=params.min_p))
    ref = chain(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    ref_logprobs = torch.log_softmax(ref, dim=-1).numpy()

    ours = processed_logprobs(logits=logits, params=params, history=list(history))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref_logprobs))  # the same tokens removed
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], ref_logprobs[finite], rtol=1e-5, atol=1e-5)


def test_two_level_inverse_cdf_matches_the_full_cumsum() -> None:
    from specreason_rt.sampling import _inverse_cdf

    rng = np.random.default_rng(3)
    for vocab in (5, 256, 1000, 49152):
        probs = rng.random((4, vocab)).astype(np.float32) ** 8  # peaked, like real distributions
        probs[:, rng.random(vocab) < 0.3] = 0  # removed tokens
        probs[0, :-1] = 0  # only the last token left
        for _ in range(20):
            u = rng.random(4)
            cdf = np.cumsum(probs.astype(np.float64), axis=-1)
            expected = (cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1)
            got = _inverse_cdf(probs, u)
            assert (probs[np.arange(4), got] > 0).all()
            assert (got == np.minimum(expected, vocab - 1)).all() or np.allclose(
                cdf[np.arange(4), got], cdf[np.arange(4), np.minimum(expected, vocab - 1)], rtol=1e-9)


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 5e-6])
def test_tiny_temperature_is_greedy_not_nan(temperature: float) -> None:
    """Issue 11 finding 12: x / 1e-39 overflows float32 to inf and the draw became NaN (pad tokens)."""
    logits = np.array([[1.0, 3.0, 2.0, 3.0], [-5.0, 0.5, 0.25, -1.0]], np.float32)
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    tokens, logprobs = sample(logits=logits, params=params, rng=np.random.default_rng(0))
    assert tokens.tolist() == [1, 1] and np.isfinite(logprobs).all()
    assert not SamplingParams(temperature=1e-4).greedy


def test_sampling_params_refuse_non_numbers() -> None:
    with pytest.raises(SamplingError, match="temperature must be a number"):
        SamplingParams(temperature="0.5")  # type: ignore[arg-type]
