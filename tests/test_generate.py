"""Plain generation: token-identical to transformers' generate, seeded sampling, forked branches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specreason_rt.bundle import Bundle
from specreason_rt.decode import decode, generate
from specreason_rt.sampling import SamplingParams

GREEDY = SamplingParams()


def transformers_greedy(model, prompt: list[int], max_new_tokens: int, eos_ids: tuple[int, ...]
                        ) -> tuple[list[int], list[float]]:
    """Reference: transformers' generate on one unpadded prompt; tokens and their raw log-probs."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(eos_ids), pad_token_id=eos_ids[0], output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[tok]) for step, tok in zip(out.logits, tokens,
                                                                                         strict=False)]
    return tokens, logprobs


def assert_parity(bundle_dir: Path, hf_model, prompts: list[list[int]], max_new_tokens: int) -> None:
    bundle = Bundle(bundle_dir, roles=["verifier"])
    model, tok = bundle.models["verifier"], bundle.tokenizers["verifier"]
    ours = generate(model=model, tokenizer=tok, prompts=prompts, params=GREEDY, rng=np.random.default_rng(0),
                    max_tokens=max_new_tokens)
    for prompt, out in zip(prompts, ours, strict=True):
        ref_tokens, ref_logprobs = transformers_greedy(hf_model, prompt, max_new_tokens, model.generation.eos_ids)
        assert out.tokens == ref_tokens
        np.testing.assert_allclose(out.logprobs, ref_logprobs, atol=1e-4)


def test_tiny_model_batched_greedy_matches_transformers(any_tiny_bundle: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = [[1, 40, 41], [1, 50, 51, 52, 53, 54, 55], [1, 60]]  # different lengths in one batch
    assert_parity(any_tiny_bundle, hf, prompts, max_new_tokens=20)


def test_seeded_sampling_reproduces(any_tiny_bundle: Path) -> None:
    bundle = Bundle(any_tiny_bundle, roles=["speculator"])
    model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def run(seed: int) -> list[list[int]]:
        outs = generate(model=model, tokenizer=tok, prompts=[[1, 40, 41]], params=params,
                        rng=np.random.default_rng(seed), max_tokens=16, branches_per_prompt=4)
        return [o.tokens for o in outs]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert len({tuple(t) for t in first}) > 1  # forked branches sample independently


def test_forked_greedy_branches_equal_a_single_run(any_tiny_bundle: Path) -> None:
    bundle = Bundle(any_tiny_bundle, roles=["speculator"])
    model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
    single = generate(model=model, tokenizer=tok, prompts=[[1, 40, 41]], params=GREEDY,
                      rng=np.random.default_rng(0), max_tokens=12)[0]
    forked = generate(model=model, tokenizer=tok, prompts=[[1, 40, 41]], params=GREEDY,
                      rng=np.random.default_rng(0), max_tokens=12, branches_per_prompt=3)
    assert [o.tokens for o in forked] == [single.tokens] * 3


def test_decode_stops_each_branch_at_its_own_limit(any_tiny_bundle: Path) -> None:
    bundle = Bundle(any_tiny_bundle, roles=["speculator"])
    model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
    cache = model.new_cache(branches=2)
    logits = model.forward(cache=cache, tokens=[[1, 40], [1, 41, 42, 43]])
    outs = decode(model=model, tokenizer=tok, cache=cache, logits=logits, params=GREEDY,
                  rng=np.random.default_rng(0), max_tokens=5)
    for out in outs:
        assert out.finish in ("step", "eos", "length") and 1 <= len(out.tokens) <= 5
        # the last token is pending: the cache holds prompt + all but the last generated token
    assert cache.lengths.tolist() == [2 + len(outs[0].tokens) - 1, 4 + len(outs[1].tokens) - 1]


def test_generate_refuses_past_max_context(tiny_bundle: Path) -> None:
    from specreason_rt.errors import CacheLimitError

    bundle = Bundle(tiny_bundle, roles=["speculator"])
    model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
    with pytest.raises(CacheLimitError, match="max context"):
        generate(model=model, tokenizer=tok, prompts=[[1, 40]], params=GREEDY, rng=np.random.default_rng(0),
                 max_tokens=model.arch.max_context)


@pytest.mark.smollm2
def test_smollm2_batched_greedy_matches_transformers(smollm2_bundle: Path, smollm2_hf) -> None:
    """A real model: chat prompts of different lengths in one batch, 24 greedy tokens each."""
    tokenizer = Bundle(smollm2_bundle, roles=["verifier"]).tokenizers["verifier"]
    questions = ["What is 2+2?", "Name three colours of the rainbow, please.",
                 "Explain in one sentence why the sky looks blue during the day."]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    assert_parity(smollm2_bundle, smollm2_hf, prompts, max_new_tokens=24)


@pytest.mark.parametrize("role", ["speculator", "verifier"])
def test_builtin_batched_greedy_matches_transformers(builtin_bundle: Path, role: str) -> None:
    """The built-in pair: eight held-out problems in one ragged batch, solved exactly as transformers does."""
    from transformers import AutoModelForCausalLM

    from specreason_models import builtin_path
    from specreason_models.task import heldout_split

    bundle = Bundle(builtin_bundle, roles=[role])
    tok = bundle.tokenizers[role]
    prompts = [tok.encode_chat([{"role": "user", "content": p.question}]) for p in heldout_split(n=8)]
    assert len({len(p) for p in prompts}) > 1
    hf = AutoModelForCausalLM.from_pretrained(builtin_path(role)).eval()
    ours = generate(model=bundle.models[role], tokenizer=tok, prompts=prompts, params=GREEDY,
                    rng=np.random.default_rng(0), max_tokens=64)
    for prompt, out in zip(prompts, ours, strict=True):
        ref_tokens, ref_logprobs = transformers_greedy(hf, prompt, 64, bundle.models[role].generation.eos_ids)
        assert out.tokens == ref_tokens
        np.testing.assert_allclose(out.logprobs, ref_logprobs, atol=1e-4)


@pytest.mark.parametrize("role", ["speculator", "verifier"])
def test_evicting_finished_branches_changes_nothing_but_the_batch(builtin_bundle: Path, role: str) -> None:
    bundle = Bundle(builtin_bundle, roles=[role])
    model, tok = bundle.models[role], bundle.tokenizers[role]
    prompt = tok.encode_chat([{"role": "user", "content": "37+45*3"}])
    params = SamplingParams(temperature=3.0)  # hot, so branches end their first step at different lengths
    runs = []
    for evict in (False, True):
        cache = model.new_cache(branches=1, capacity=64)
        logits = model.forward(cache=cache, tokens=[prompt])
        cache.fork(8)
        outs = decode(model=model, tokenizer=tok, cache=cache, logits=np.repeat(logits, 8, axis=0), params=params,
                      rng=np.random.default_rng(11), max_tokens=40, stop_at_step=True, evict_finished=evict)
        runs.append((outs, cache.branches))
    (kept, rows_kept), (evicted, rows_evicted) = runs
    assert len({len(o.tokens) for o in kept}) > 1  # the branches did finish at different times
    assert [o.tokens for o in kept] == [o.tokens for o in evicted]
    for a, b in zip(kept, evicted, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert rows_kept == 8 and rows_evicted < 8


def test_branches_that_go_on_past_a_step_end_write_what_stepping_in_lockstep_writes(builtin_bundle: Path) -> None:
    """Context.decode_to_end (each branch starts its next step at once) against decode_steps called once per
    step for every branch (each step waits for the batch's longest): same tokens per branch and step, given a
    generator per branch, in fewer forwards."""
    from specreason_rt.context import Context

    bundle = Bundle(builtin_bundle, roles=["speculator"])
    model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
    prompt = tok.encode_chat([{"role": "user", "content": "37+45*3-12"}])
    params = SamplingParams(temperature=2.0)  # hot, so the branches' steps differ in length
    n, steps_each = 6, 3

    def context() -> Context:
        ctx = Context(model=model, tokenizer=tok, prompt=prompt, room=3 * 40)
        ctx.gather([0] * n)
        return ctx

    lockstep = context()
    rngs = [np.random.default_rng(300 + b) for b in range(n)]
    stepped: list[list[list[int]]] = [[] for _ in range(n)]
    ended = [False] * n  # eos ends a branch for good
    for _ in range(steps_each):
        outs = lockstep.decode_steps(params=params, rng=rngs, max_tokens=40, active=[not e for e in ended])
        for b, out in enumerate(outs):
            if out.tokens:
                stepped[b].append(out.tokens)
                ended[b] = out.finish == "eos"

    continuous = context()
    rngs = [np.random.default_rng(300 + b) for b in range(n)]
    written: list[list[list[int]]] = [[] for _ in range(n)]

    def next_step(b: int, out) -> int:
        written[b].append(out.tokens)
        return 40 if len(written[b]) < steps_each else 0

    continuous.decode_to_end(params=params, rng=rngs, max_tokens=[40] * n, next_step=next_step)
    assert written == stepped
    lengths = np.zeros((n, steps_each), np.int64)  # [branches, steps]: tokens per step, 0 after an eos
    for b, branch in enumerate(written):
        lengths[b, :len(branch)] = [len(s) for s in branch]
    assert continuous.forwards == lengths.sum(axis=1).max()  # the prefill, then one per token of the longest
    assert lockstep.forwards == lengths.max(axis=0).sum()  # each step as long as its longest branch's
    assert continuous.forwards < lockstep.forwards
    assert continuous.branches == 0
