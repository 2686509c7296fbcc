"""Mixture-of-experts families (qwen3_moe, gpt_oss): the dense traceable MoE block against transformers' own,
and its ONNX graph routing per input (not the trace example's routing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def tiny_moe_model(family: str, *, seed: int = 0, layers: int = 2):
    """A tiny seeded model of `family`; the router weights are scaled up so the top-k choice is decisive."""
    from transformers import AutoModelForCausalLM, GptOssConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        cfg = GptOssConfig(**common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "truncate": False, "original_max_position_embeddings": 64})
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
        for layer in model.model.layers:
            router = layer.mlp.router if family == "gpt_oss" else layer.mlp.gate
            router.weight.mul_(25.0)  # decisive routing: ignoring top-k moves the output far
    return model


def moe_block(family: str, mlp):
    from specreason_export.moe import gpt_oss_block, qwen3_moe_block

    return qwen3_moe_block(mlp) if family == "qwen3_moe" else gpt_oss_block(mlp)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_dense_moe_equals_the_transformers_block(family: str) -> None:
    model = tiny_moe_model(family)
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64)  # [branches, new, hidden]
    for layer in model.model.layers:
        with torch.no_grad():
            ref = layer.mlp(x)
            ref = ref[0] if isinstance(ref, tuple) else ref  # gpt_oss returns (out, router scores)
            ours = moe_block(family, layer.mlp)(x)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # The routing matters: mixing all experts by the softmax weights gives a far different result.
        blend = moe_block(family, layer.mlp)
        blend.top_k = blend.experts
        with torch.no_grad():
            assert (blend(x) - ref).abs().max() > 100 * 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_onnx_moe_routes_each_input_itself(family: str, tmp_path: Path) -> None:
    """Traced on one input, the graph must choose experts per token on other inputs and other shapes."""
    import onnxruntime as ort

    model = tiny_moe_model(family)
    mlp = model.model.layers[0].mlp
    block = moe_block(family, mlp).eval()
    path = tmp_path / "moe.onnx"
    with torch.no_grad():
        torch.onnx.export(block, (torch.randn(2, 3, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "branches", 1: "new"}, "y": {0: "branches", 1: "new"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(2)
    x = torch.randn(4, 7, 64)
    with torch.no_grad():
        ref = mlp(x)
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    (ours,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert len({tuple(r) for r in block.route(x).reshape(-1, 8).ne(0).tolist()}) > 1  # tokens chose differently


# --- the families end to end: export, validation past the window, parity with transformers generate -------------

def sharp_moe_model(family: str):
    """tiny_moe_model with eager attention (the reference) and query/key weights sharpened as in test_families."""
    from .test_families import SHARP

    model = tiny_moe_model(family)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(SHARP):
                p.mul_(20.0)
            if name.endswith("sinks"):
                p.mul_(30.0)  # sinks that take a visible share of the attention
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_family_exports_and_validates(family: str, tmp_path: Path) -> None:
    from specreason_export.families import check_config, family_of
    from specreason_export.validate import reference_continuations

    from .test_families import export_and_validate, prompts

    model = sharp_moe_model(family)
    check_config(config=model.config, where=family)
    features = family_of(family).features(model.config)
    assert "moe" in features and ("attention_sinks" in features) == (family == "gpt_oss")
    for attention in ("plain", "gqa"):
        report = export_and_validate(model, tmp_path, attention)
        assert report["passed"], (attention, report)
        assert report["max_abs_logit_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
        if family == "gpt_oss":
            assert report["smallest_window"] == 8 and report["longest_context"] > 8
    prompt = prompts()[0]
    ours = reference_continuations(model=model, prompts=[prompt], tokens=9)[0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, min_new_tokens=9)
    assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("attention", ["plain", "gqa"])
def test_gpt_oss_without_sinks_fails_validation(attention: str, tmp_path: Path) -> None:
    from specreason_export.graph import Disabled

    from .test_families import export_and_validate

    model = sharp_moe_model("gpt_oss")
    report = export_and_validate(model, tmp_path, attention, disabled=Disabled(sinks=True))
    assert not report["passed"] and report["max_abs_logit_diff"] > 0.1, report
