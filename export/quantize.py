"""Weight quantization of an exported fp32 graph with ONNX Runtime's own quantizers.

int8: dynamic quantization (int8 weights, activations quantized on the fly) of every MatMul — CPU.
int4: MatMulNBits, block 32, symmetric, accuracy_level 4 (int8 compute): on this CPU level 4 is
      2-3x faster per decode step than the default (DESIGN.md §5). The lm_head is already untied in our
      graph (its own MatMul initializer), so the quantizer covers it too. The embedding is int4 as well
      (`_embedding_int4`): a GatherBlockQuantized (com.microsoft, CPU in ONNX Runtime >= 1.20; uint8 data
      packed two 4-bit values per byte, block 32 along the hidden axis, float scales, default zero point 8)
      dequantizes only the rows a step looks up. With tied embeddings (SmolLM2) it reads the lm_head's own
      int4 blocks through a Reshape, so the vocabulary matrix is stored once, in 4 bits (SmolLM2-135M: the
      113 MB fp32 embedding is gone); an untied embedding gets its own int4 copy, quantized by the same
      kernel. This is the format onnxruntime-genai's builder writes; only the scales differ: each block's is
      searched for the least squared error (`int4_blocks`). SmolLM2-135M, `specreason bench quality`: greedy
      agreement with fp32 71.7% vs genai's 69.7%, perplexity 1.143x vs 1.192x, 86.5 MB per model like
      genai's (BENCHMARKS.md "int4 quality"). Variants measured there: block 16 or an 8-bit
      lm_head gain ~3 points of agreement for more bytes per step; asymmetric and k-quant raise perplexity;
      HQQ's float zero points are nearly lossless on a Q4_1 GGUF source but have no int8 kernel in ONNX
      Runtime 1.32 (over 10x slower decode).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


def quantize(*, src: Path, dst: Path, precision: str, external_data: bool) -> dict[str, Any]:
    """Write the quantized graph of `src` to `dst`; return the format facts recorded in the manifest
    (models.ROLE.validation.quantization)."""
    # ONNX Runtime's quantizers log advice on the root logger ("consider pre-processing") and every node they
    # visit (INFO) that does not apply to weight-only/dynamic quantization of a decoder; keep the CLI output to
    # our own stages. The int4 quantizer's module calls logging.basicConfig(level=INFO) when imported, so it is
    # imported before the root level is lowered.
    try:
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    except ImportError as e:
        raise ExportError(f"{precision} quantization needs the package {e.name!r}: "
                          "pip install 'specreason-rt[export]'") from e
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return _quantize(src=src, dst=dst, precision=precision, external_data=external_data)
    except ImportError as e:
        raise ExportError(f"{precision} quantization needs the package {e.name!r}: "
                          "pip install 'specreason-rt[export]'") from e
    finally:
        root.setLevel(level)


def _quantize(*, src: Path, dst: Path, precision: str, external_data: bool) -> dict[str, Any]:
    import onnx

    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=external_data)
        return {"format": "dynamic int8 (MatMulInteger)", "per_channel": True, "embedding": "fp32"}
    if precision != "int4":
        raise ValueError(f"quantize() handles int8 and int4, not {precision!r}")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    found = _find_embedding(model.graph)
    searched = _searched_blocks(model.graph)  # from the fp32 weights, before the quantizer drops them
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    _replace_blocks(graph=quantizer.model.model.graph, searched=searched)
    embedding = "fp32"
    if found is not None:
        embedding = _embedding_int4(graph=quantizer.model.model.graph, gather=found[0], lm_head_output=found[1],
                                    quantizer=quantizer.node_quantizer)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)
    return {"format": "MatMulNBits", "bits": 4, "block_size": INT4_BLOCK_SIZE, "symmetric": True,
            "accuracy_level": INT4_ACCURACY_LEVEL, "scales": "searched per block (least squares)",
            "embedding": embedding}


# Per block, the scale maps the weight of largest magnitude (`peak`) to one of these levels: -8 is ONNX Runtime's
# round-to-nearest (tried first, so a tie keeps it); past -8 (or past +7, the peak's sign flipped) the peak is
# clipped and the other 31 weights get a finer grid.
_SCALE_LEVELS = (-8.0, *np.linspace(-8.25, -10.0, 8), *np.linspace(7.0, 9.0, 9))
_SEARCH_COLUMNS = 4096  # output columns per numpy pass: bounds the temporaries to ~4096 x K floats each


def int4_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks of a MatMul weight [K, N] (K a multiple of the block) in MatMulNBits' layout: blocks
    [N, K / block, block / 2] uint8 (value + 8, two per byte, low nibble first) and scales [N, K / block].

    Each block's scale is the one of _SCALE_LEVELS with the least squared reconstruction error of that block: the
    same format, kernel and bytes as round-to-nearest, closer weights (SmolLM2-135M: BENCHMARKS.md "int4 quality").
    ONNX Runtime's quantizer has no such search for this format (its RTN config with a search needs Intel's
    neural-compressor), so it is done here, in numpy.
    """
    k, n = weight.shape
    blocks = np.empty((n, k // INT4_BLOCK_SIZE, INT4_BLOCK_SIZE // 2), np.uint8)
    scales = np.empty((n, k // INT4_BLOCK_SIZE), np.float32)
    for start in range(0, n, _SEARCH_COLUMNS):
        w = np.ascontiguousarray(weight[:, start:start + _SEARCH_COLUMNS].T, dtype=np.float32)  # [cols, K]
        w = w.reshape(w.shape[0], -1, INT4_BLOCK_SIZE)  # [cols, blocks, block]
        at = np.abs(w).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(w, at, axis=-1)  # [cols, blocks, 1], signed
        best_err = np.full(peak.shape[:2], np.inf, np.float32)
        best_q = np.zeros(w.shape, np.int8)
        best_s = np.zeros(peak.shape[:2], np.float32)
        for level in _SCALE_LEVELS:
            s = peak / np.float32(level)  # [cols, blocks, 1]
            safe = np.where(s == 0, np.float32(1), s)  # an all-zero block: q = 0 at any scale
            q = np.clip(np.rint(w / safe), -8, 7)
            err = np.square(q * s - w).sum(axis=-1)  # [cols, blocks]
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s[..., 0], best_s)
            best_q = np.where(better[..., None], q.astype(np.int8), best_q)
        u = (best_q + 8).astype(np.uint8)
        blocks[start:start + w.shape[0]] = u[..., 0::2] | (u[..., 1::2] << 4)
        scales[start:start + w.shape[0]] = best_s
    return blocks, scales


def _searched_blocks(graph: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per MatMul output name: int4_blocks of its constant [K, N] weight (K whole blocks; others keep the
    quantizer's own blocks)."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    out = {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2 and weight.dims[0] % INT4_BLOCK_SIZE == 0:
            out[node.output[0]] = int4_blocks(numpy_helper.to_array(weight))
    return out


def _replace_blocks(*, graph: Any, searched: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the searched blocks and scales into the MatMulNBits nodes that replaced those MatMuls."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.output[0] not in searched:
            continue
        for name, array in zip(node.input[1:3], searched[node.output[0]], strict=True):
            old = inits[name]
            if list(old.dims) != list(array.shape):
                raise ExportError(f"int4 blocks of {node.name}: the quantizer wrote {list(old.dims)}, "
                                  f"the search {list(array.shape)}")
            old.CopyFrom(numpy_helper.from_array(array, name))


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _find_embedding(graph: Any) -> tuple[str, str | None] | None:
    """In the fp32 graph: the embedding Gather's output name (a Gather of `input_ids` from a [vocab, hidden]
    initializer), and the output of the lm_head MatMul when its weight is that embedding transposed (tied: the
    tracer folded the transpose into a second initializer), else None for the lm_head. None: no such Gather."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2]
    if len(gathers) != 1:
        return None
    gather = gathers[0]
    vocab, hidden = inits[gather.input[0]].dims
    table = None
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or list(weight.dims) != [hidden, vocab]:
            continue
        table = numpy_helper.to_array(inits[gather.input[0]]) if table is None else table  # [vocab, hidden]
        if np.array_equal(numpy_helper.to_array(weight), table.T):
            return gather.output[0], node.output[0]
    return gather.output[0], None


def _embedding_int4(*, graph: Any, gather: str, lm_head_output: str | None, quantizer: Any) -> str:
    """Replace the embedding Gather (output `gather`) by GatherBlockQuantized over int4 blocks in MatMulNBits'
    layout: [vocab, hidden / block, block / 2] uint8 viewed as [vocab, hidden / 2], scales [vocab, hidden / block].
    Tied (lm_head_output names the lm_head's MatMulNBits): the lm_head's blocks and scales themselves. Returns
    what the manifest records about the embedding."""
    from onnx import helper, numpy_helper

    inits = _initializers(graph)
    node = next(n for n in graph.node if n.op_type == "Gather" and n.output[0] == gather)
    vocab, hidden = inits[node.input[0]].dims
    if hidden % INT4_BLOCK_SIZE:
        # The packed row would include the padding of its last block; keep the exact fp32 rows instead.
        return f"fp32 (hidden size {hidden} is not a multiple of the int4 block {INT4_BLOCK_SIZE})"
    lm_head = None
    if lm_head_output is not None:
        lm_head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == lm_head_output), None)
    name = node.input[0]
    new_inits = []
    if lm_head is not None:
        blocks, scales = lm_head.input[1], lm_head.input[2]  # [vocab, hidden / block, block / 2], [vocab, nb]
        what = "int4, shared with the tied lm_head (GatherBlockQuantized on the lm_head's MatMulNBits blocks)"
    else:
        table = numpy_helper.to_array(inits[name])  # [vocab, hidden]
        # The quantizer's own kernel on the transposed table: the same blocks a MatMul [hidden, vocab] would get.
        packed, scale, _ = quantizer.qbits_block_quant(np.ascontiguousarray(table.T))
        blocks, scales = name + "_Q4", name + "_scales"
        new_inits = [numpy_helper.from_array(packed, blocks), numpy_helper.from_array(scale, scales)]
        what = "int4 (GatherBlockQuantized, its own blocks: the lm_head is not tied)"
    rows = name + "_Q4_rows"
    shape = numpy_helper.from_array(np.array([vocab, hidden // 2], np.int64), name + "_Q4_rows_shape")
    nodes = [
        helper.make_node("Reshape", [blocks, shape.name], [rows], name=node.name + "_Q4_rows"),
        helper.make_node("GatherBlockQuantized", [rows, node.input[1], scales], [gather], name=node.name + "_Q4",
                         domain="com.microsoft", bits=4, block_size=INT4_BLOCK_SIZE, gather_axis=0,
                         quantize_axis=1),
    ]
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for i, n in enumerate(nodes):
        graph.node.insert(at + i, n)
    if not any(name in n.input for n in graph.node):
        graph.initializer.remove(inits[name])
    graph.initializer.extend([*new_inits, shape])
    return what
