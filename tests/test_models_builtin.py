"""The committed built-in pair loads and solves what models/builtin/accuracy.json says; the recipe learns."""

from __future__ import annotations

import json

import pytest
import torch

from specreason_models import BUILTIN_DIR, BUILTIN_NAMES, builtin_path
from specreason_models.configs import preset
from specreason_models.evaluate import accuracy, load
from specreason_models.task import TaskConfig, heldout_split
from specreason_models.train import train_model

SUBSET = 200  # held-out problems re-evaluated here: enough for a +-0.07 margin, quick on 2 cores
MARGIN = 0.07  # ~2.5 binomial standard errors at n=200 around an accuracy of 0.5


def _recorded() -> dict:
    return json.loads((BUILTIN_DIR / "accuracy.json").read_text())


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_directory_is_complete(name):
    path = builtin_path(name)
    for file in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (path / file).is_file(), f"{path / file} is missing"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_verifier_is_the_bigger_model():
    spec = json.loads((builtin_path("speculator") / "config.json").read_text())
    ver = json.loads((builtin_path("verifier") / "config.json").read_text())
    assert ver["num_hidden_layers"] >= 4 * spec["num_hidden_layers"]
    assert spec["vocab_size"] == ver["vocab_size"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_reaches_recorded_accuracy(name):
    torch.set_num_threads(2)
    model, tok = load(builtin_path(name))
    assert next(model.parameters()).dtype == torch.float32
    recorded = _recorded()[name]
    # The split of the task the committed pair was measured on (accuracy.json records it).
    task = TaskConfig(**_recorded()["task"])
    got = accuracy(model=model, tok=tok, problems=heldout_split(n=SUBSET, config=task), batch=100)
    # The recorded subset value is exact (greedy decoding is deterministic); the margin absorbs float
    # differences between machines and the gap to the full-split number.
    assert abs(got - recorded[f"heldout_accuracy_first_{SUBSET}"]) <= MARGIN
    assert abs(got - recorded["heldout_accuracy"]) <= MARGIN


@pytest.mark.slow
def test_training_recipe_reduces_loss():
    torch.set_num_threads(1)
    p = preset("tiny")
    # 80 steps: 50 of warmup, then enough at the peak rate to leave the uniform-guess loss (ln 101 = 4.6) far behind
    _, losses = train_model(p=p, seed=0, steps=80, log=lambda _: None)
    assert len(losses) == 80
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


@pytest.mark.slow
def test_training_is_reproducible_by_seed():
    torch.set_num_threads(1)
    p = preset("tiny")
    _, a = train_model(p=p, seed=1, steps=5, log=lambda _: None)
    _, b = train_model(p=p, seed=1, steps=5, log=lambda _: None)
    assert a == b


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights_with_a_curriculum(tmp_path):
    """The v2 recipe's shape: weights from a trained folder (--init), chains growing from short to long."""
    from specreason_models.train import curriculum, save_model

    torch.set_num_threads(1)
    p = preset("tiny")
    model, losses = train_model(p=p, seed=0, steps=60, curriculum_start=2, ramp_fraction=0.5, log=lambda _: None)
    save_model(model=model, out_dir=tmp_path / "tiny", meta={"role": "tiny"})
    _, again = train_model(p=p, seed=0, steps=3, init=tmp_path / "tiny", log=lambda _: None)
    _, scratch = train_model(p=p, seed=0, steps=3, log=lambda _: None)
    assert again[0] < 0.8 * scratch[0]  # it starts where the first run left off, not from random weights
    grow = curriculum(start=4, top=12, ramp_steps=100)
    assert [grow(b) for b in (0, 50, 100, 500)] == [4, 8, 12, 12]
