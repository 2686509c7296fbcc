"""The verifier's value head: trained in models/, exported inside the graph (output `value`), read by the runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from specreason_models import builtin_path
from specreason_models.candidates import Example, speculator_examples
from specreason_models.evaluate import load
from specreason_models.task import heldout_split
from specreason_models.value_head import (
    FILE_NAME,
    SAMPLE_TEMPERATURE,
    ValueHead,
    features,
    load_value_head,
    roc_auc,
    save_value_head,
)
from specreason_rt.bundle import Bundle
from specreason_rt.errors import ConfigError
from specreason_rt.manifest import load_manifest

from .test_export_cli import assert_nothing_written, assert_one_line_error, run_export


@pytest.fixture(scope="module")
def heldout_speculator_steps() -> list[Example]:
    """Real candidates: the built-in speculator's sampled steps on held-out problems (ragged lengths)."""
    torch.set_num_threads(2)
    speculator, tok = load(builtin_path("speculator"))
    return speculator_examples(speculator=speculator, tok=tok, problems=heldout_split(n=400),
                               rng=np.random.default_rng(0), temperature=SAMPLE_TEMPERATURE)


def runtime_values(bundle: Path, examples: list[Example]) -> np.ndarray:
    """The ONNX `value` at each example's last token: one ragged prefill of context + candidate per branch."""
    verifier = Bundle(bundle, roles=["verifier"]).models["verifier"]
    out = []
    for start in range(0, len(examples), 100):
        chunk = examples[start:start + 100]
        cache = verifier.new_cache(branches=len(chunk), capacity=64)
        _, values = verifier.forward(cache=cache, tokens=[e.context + e.candidate for e in chunk], values=True)
        assert values.shape == (len(chunk),) and values.dtype == np.float32
        out.append(values)
    return np.concatenate(out)  # [examples]


def test_builtin_bundle_carries_the_committed_head(builtin_bundle: Path) -> None:
    entry = load_manifest(builtin_bundle).models["verifier"]
    assert "value" in [o["name"] for o in entry.io["outputs"]]
    assert entry.value_head is not None and entry.value_head["input_size"] == entry.architecture.hidden
    assert entry.value_head["metrics"]["heldout_speculator"]["auc"] > 0.6
    assert entry.validation["max_abs_value_diff"] <= 1e-4
    assert load_manifest(builtin_bundle).models["speculator"].value_head is None


def test_runtime_value_equals_torch_head_on_a_ragged_batch(builtin_bundle: Path,
                                                           heldout_speculator_steps: list[Example]) -> None:
    from transformers import LlamaForCausalLM

    examples = heldout_speculator_steps[:100]
    assert len({len(e.context + e.candidate) for e in examples}) > 5  # ragged
    head, _ = load_value_head(builtin_path("verifier") / FILE_NAME)
    verifier = LlamaForCausalLM.from_pretrained(builtin_path("verifier"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = head(features(verifier=verifier, examples=examples)).numpy()
    np.testing.assert_allclose(runtime_values(builtin_bundle, examples), ref, atol=1e-4)


def test_head_separates_real_speculator_mistakes(builtin_bundle: Path,
                                                 heldout_speculator_steps: list[Example]) -> None:
    """Measured 0.62 on 1000 held-out problems (value_head.json); 400 here (about 50 wrong steps) leave about
    +-0.04 around it, and a head that learned nothing sits at 0.5."""
    labels = np.array([e.label for e in heldout_speculator_steps])
    assert 0 < labels.sum() < len(labels)
    assert roc_auc(scores=runtime_values(builtin_bundle, heldout_speculator_steps), labels=labels) > 0.55


@pytest.fixture(scope="module")
def tiny_head_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random head for the tiny test Llama (hidden 64)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("head") / FILE_NAME
    save_value_head(head=ValueHead(d_model=64, hidden=16), path=path, report={"recipe": {"note": "random"}})
    return path


@pytest.mark.parametrize("attention", ["gqa", "plain"])
def test_value_matches_torch_at_every_position(tmp_path: Path, capsys, tiny_llama_dir: Path, tiny_head_file: Path,
                                               attention: str) -> None:
    """Ragged prefill, a decode step, then several new tokens per branch on a cache (gqa's per-branch path)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir),
                           "--out", str(out), "--attention", attention, "--value-head", str(tiny_head_file))
    assert code == 0, err
    verifier = Bundle(out, roles=["verifier"]).models["verifier"]
    assert verifier.has_value_head
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    head, _ = load_value_head(tiny_head_file)
    seqs = [[1, 40, 41], [1, 50, 51, 52, 53, 54], [1, 60]]
    cache = verifier.new_cache(branches=3, capacity=16)
    got = [[] for _ in seqs]
    logits, values = verifier.forward(cache=cache, tokens=seqs, all_logits=True, values=True)
    assert logits.shape[:2] == values.shape == (3, 6)
    for b, s in enumerate(seqs):
        got[b] += list(values[b, :len(s)])
    for feed in ([[70], [71], [72]], [[80, 81], [82], [83, 84, 85]]):
        _, values = verifier.forward(cache=cache, tokens=feed, all_logits=True, values=True)
        for b, t in enumerate(feed):
            seqs[b] = seqs[b] + t
            got[b] += list(values[b, :len(t)])
    with torch.no_grad():
        for b, s in enumerate(seqs):
            ref = head(hf.model(torch.tensor([s])).last_hidden_state)[0].numpy()
            np.testing.assert_allclose(np.array(got[b]), ref, atol=1e-4)
    assert load_manifest(out).models["verifier"].validation["max_abs_value_diff"] <= 1e-4


def test_values_without_a_head_raise(tiny_bundle: Path) -> None:
    verifier = Bundle(tiny_bundle, roles=["verifier"]).models["verifier"]
    assert not verifier.has_value_head
    with pytest.raises(ConfigError, match="export the verifier with a value head"):
        verifier.forward(cache=verifier.new_cache(), tokens=[[1, 40]], values=True)


def test_old_manifest_without_value_head_loads(tmp_path: Path, tiny_bundle: Path) -> None:
    dst = tmp_path / "old"
    shutil.copytree(tiny_bundle, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for entry in data["models"].values():
        entry.pop("value_head", None)
    (dst / "manifest.json").write_text(json.dumps(data))
    assert load_manifest(dst).models["verifier"].value_head is None
    assert not Bundle(dst, roles=["verifier"]).models["verifier"].has_value_head


def test_head_of_the_wrong_hidden_size_is_one_line(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir),
                           "--out", str(out), "--value-head", str(builtin_path("verifier") / FILE_NAME))
    assert_one_line_error(code, err, "--value-head", "size 96", "hidden size 64", "--value-head none")
    assert_nothing_written(out)


def test_value_head_that_is_not_a_head(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "head.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "b"
    code, err = run_export(capsys, "--out", str(out), "--value-head", str(bad))
    assert_one_line_error(code, err, "--value-head", "not a readable safetensors file")
    assert_nothing_written(out)


def test_value_head_none_exports_no_value_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    code, err = run_export(capsys, "--out", str(out), "--value-head", "none")
    assert code == 0, err
    entry = load_manifest(out).models["verifier"]
    assert entry.value_head is None and "value" not in [o["name"] for o in entry.io["outputs"]]
    assert "max_abs_value_diff" not in entry.validation


def test_steps_with_and_without_values_interleave(tmp_path: Path, capsys, tiny_llama_dir: Path,
                                                  tiny_head_file: Path) -> None:
    """A reused gqa binding that once fetched `value` still returns logits from plain `forward` calls."""
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir),
                           "--out", str(out), "--attention", "gqa", "--value-head", str(tiny_head_file))
    assert code == 0, err
    # Two engines, so each keeps its own binding for its own cache across calls.
    reference, verifier = (Bundle(out, roles=["verifier"]).models["verifier"] for _ in range(2))
    a, b = reference.new_cache(branches=2), verifier.new_cache(branches=2)
    prompts = [[1, 40, 41], [1, 50]]
    plain_a = reference.forward(cache=a, tokens=prompts)
    logits_b, _ = verifier.forward(cache=b, tokens=prompts, values=True)
    np.testing.assert_allclose(plain_a, logits_b, atol=1e-6)
    for values in (False, True, False):
        ref = reference.forward(cache=a, tokens=[[60], [61]])
        got = verifier.forward(cache=b, tokens=[[60], [61]], values=True)[0] if values else verifier.forward(
            cache=b, tokens=[[60], [61]])
        assert got.shape == ref.shape == (2, verifier.arch.vocab_size)
        np.testing.assert_allclose(got, ref, atol=1e-5)
