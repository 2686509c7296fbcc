"""Fused projections (export/fused.py) and the int4 embedding (export/quantize.py).

The parity of every family with its fused graph is tests/test_families.py's and tests/test_moe.py's job (each
export validated against transformers); here: the fused modules equal the modules they replace, the exported
graph has one weight MatMul per fused group, and int4 bundles store the embedding in 4 bits, sharing the tied
lm_head's blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from specreason_export.fused import FusedLinear, GatedMLP, fuse_mlp, fuse_qkv  # noqa: E402
from specreason_export.onnx_export import export_onnx  # noqa: E402
from specreason_export.quantize import INT4_BLOCK_SIZE, int4_blocks, quantize  # noqa: E402
from specreason_export.validate import DEFAULT_TOLERANCES, validate  # noqa: E402

from .test_families import one_torch_thread, prompts, tiny_model  # noqa: E402, F401  (an autouse fixture)


def weight_matmuls(path: Path) -> dict[str, int]:
    """Per op type, the nodes whose weight (input 1) is an initializer: the projections of the graph."""
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits") and node.input[1] in inits:
            out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def test_fused_linear_equals_the_separate_projections_with_and_without_bias() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.nn.Linear(8, 6, bias=True), torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=True)]
    for p in parts:
        torch.nn.init.normal_(p.weight, generator=g)
        if p.bias is not None:
            torch.nn.init.normal_(p.bias, generator=g)
    x = torch.randn(2, 3, 8, generator=g)  # [branches, new, in]
    before = [p(x) for p in parts]
    fused = FusedLinear(parts)
    for got, part, expected in zip(fused(x), parts, before, strict=True):
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(part(x), expected)  # the source module still computes the same
        # ... reading the fused copy: the weights are held once
        assert part.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="one size"):
        FusedLinear([torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)])


@pytest.mark.parametrize("family", ["llama", "gemma2", "stablelm"])
def test_gated_mlp_equals_the_source_mlp(family: str) -> None:
    model = tiny_model(family)
    mlp = model.model.layers[0].mlp
    fused = fuse_mlp(mlp)
    assert isinstance(fused, GatedMLP)
    x = torch.randn(2, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused(x), mlp(x))


@pytest.mark.parametrize(("family", "qkv_fusable"), [("phi3", False), ("gpt_neox", False), ("phi", True)])
def test_already_fused_or_gateless_modules_are_kept(family: str, qkv_fusable: bool) -> None:
    """phi3's checkpoints are fused already, gpt_neox's interleaved; gpt_neox's and phi's MLPs have no gate."""
    model = tiny_model(family)
    layer = model.base_model.layers[0]
    attn = getattr(layer, "self_attn", None) or layer.attention
    assert (fuse_qkv(attn) is not None) == qkv_fusable
    assert fuse_mlp(layer.mlp) is layer.mlp


# family: weight MatMuls per layer in the exported graph (+ 1 for the lm_head)
PER_LAYER = {"llama": 4, "qwen2": 4, "gemma2": 4, "phi3": 4, "gpt_neox": 4, "phi": 4}


@pytest.mark.parametrize("family", list(PER_LAYER))
def test_graph_has_one_matmul_per_fused_group(family: str, tmp_path: Path) -> None:
    """qkv, o, gate|up (or fc1), down: 4 weight MatMuls per layer, the lm_head one more (7 per layer unfused)."""
    model = tiny_model(family)
    path = tmp_path / "plain.onnx"
    export_onnx(model=model, out_path=path, attention="plain")
    layers = model.config.num_hidden_layers
    assert weight_matmuls(path) == {"MatMul": PER_LAYER[family] * layers + 1}


def test_qwen2_biases_survive_fusion(tmp_path: Path) -> None:
    """qwen2 biases q, k and v: the fused Add carries them (validation would fail without, the biases being
    random), and the llama mlp_bias/attention_bias variant fuses its biases too."""
    for family, overrides in (("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True})):
        model = tiny_model(family, **overrides)
        with torch.no_grad():  # biases large enough to matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
        path = tmp_path / f"{family}.onnx"
        export_onnx(model=model, out_path=path, attention="gqa")
        report = validate(model=model, onnx_path=path, attention="gqa", prompts=prompts(), precision="fp32",
                          tolerance=DEFAULT_TOLERANCES["fp32"])
        assert report["passed"] and report["max_abs_logit_diff"] < 1e-4, (family, report)


def int4_graph(model: Any, tmp: Path) -> tuple[Path, dict[str, Any]]:
    fp32, int4 = tmp / "fp32.onnx", tmp / "int4.onnx"
    export_onnx(model=model, out_path=fp32, attention="gqa")
    facts = quantize(src=fp32, dst=int4, precision="int4", external_data=False)
    return int4, facts


def float_tables(path: Path, vocab: int, hidden: int) -> list[str]:
    """Float initializers shaped like an embedding or an lm_head ([vocab, hidden] or [hidden, vocab])."""
    model = onnx.load(str(path))
    return [t.name for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == sorted([vocab, hidden])]


def test_int4_tied_embedding_reads_the_lm_head_blocks(tmp_path: Path) -> None:
    model = tiny_model("llama", tie_word_embeddings=True)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    path, facts = int4_graph(model, tmp_path)
    assert facts["embedding"].startswith("int4, shared")
    graph = onnx.load(str(path)).graph
    gbq = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and not [n for n in graph.node if n.op_type == "Gather" and "input_ids" in n.input]
    reshape = next(n for n in graph.node if n.output[0] == gbq[0].input[0])
    lm_head = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == reshape.input[0]]
    assert len(lm_head) == 1 and gbq[0].input[2] == lm_head[0].input[2]  # same blocks, same scales
    assert float_tables(path, vocab, hidden) == []
    # The rows the graph looks up are the lm_head's int4 blocks dequantized (default zero point 8).
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    blocks, scales = inits[reshape.input[0]], inits[gbq[0].input[2]]  # [vocab, nb, block/2], [vocab, nb]
    nibbles = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(vocab, hidden).astype(np.float32) - 8
    rows = nibbles * np.repeat(scales, INT4_BLOCK_SIZE, axis=1)  # [vocab, hidden]
    table = model.get_input_embeddings().weight.detach().numpy()  # [vocab, hidden]
    expected_blocks, expected_scales = int4_blocks(np.ascontiguousarray(table.T))  # the lm_head's [hidden, vocab]
    assert np.array_equal(blocks, expected_blocks) and np.array_equal(scales, expected_scales)
    assert np.abs(rows - table).max() <= 0.25 * np.abs(table).max()  # within the clipped int4 grid
    report = validate(model=model, onnx_path=path, attention="gqa", prompts=prompts(), precision="int4")
    assert report["passed"], report


def test_int4_untied_embedding_gets_its_own_blocks(tmp_path: Path) -> None:
    model = tiny_model("qwen3", tie_word_embeddings=False)
    path, facts = int4_graph(model, tmp_path)
    assert facts["embedding"].startswith("int4 (GatherBlockQuantized, its own")
    assert float_tables(path, model.config.vocab_size, model.config.hidden_size) == []
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    report = validate(model=model, onnx_path=path, attention="gqa", prompts=prompts(), precision="int4")
    assert report["passed"], report


def test_int4_embedding_stays_fp32_when_the_hidden_size_is_not_whole_blocks(tmp_path: Path) -> None:
    model = tiny_model("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                       tie_word_embeddings=True)
    path, facts = int4_graph(model, tmp_path)
    assert facts["embedding"].startswith("fp32 (hidden size 48")
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("GatherBlockQuantized") == 0


def test_int4_scale_search_is_round_to_nearest_or_closer() -> None:
    """The searched blocks are ONNX Runtime's round-to-nearest blocks when only its level is tried, and never
    further from the weights, block by block, with the whole search (hand-checkable: dequantize both)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    import specreason_export.quantize as q

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((128, 40)) * 0.05).astype(np.float32)  # [K, N]
    weight[:, 3] = 0.0  # an all-zero column: scale 0, every value the zero point
    rtn = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True))
    ort_blocks, ort_scales, _ = rtn.qbits_block_quant(weight.copy())

    def error(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:  # -> [N, K / block]
        nibbles = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*scales.shape, INT4_BLOCK_SIZE) - 8.0
        w = weight.T.reshape(*scales.shape, INT4_BLOCK_SIZE)
        return np.square(nibbles * scales[..., None] - w).sum(axis=-1)

    levels = q._SCALE_LEVELS
    try:
        q._SCALE_LEVELS = (-8.0,)
        blocks, scales = q.int4_blocks(weight)
    finally:
        q._SCALE_LEVELS = levels
    assert np.array_equal(blocks, ort_blocks) and np.array_equal(scales, ort_scales)
    blocks, scales = q.int4_blocks(weight)
    assert (error(blocks, scales) <= error(ort_blocks, ort_scales)).all()
    assert error(blocks, scales).sum() < 0.95 * error(ort_blocks, ort_scales).sum()
    assert (blocks[3] == 0x88).all() and not scales[3].any()
