"""Weight quantization of an exported fp32 graph with ONNX Runtime's own quantizers.

int8: dynamic quantization (int8 weights, activations quantized on the fly) of every MatMul — CPU.
int4: MatMulNBits, block 32, symmetric, accuracy_level 4 (int8 compute): on this CPU level 4 is
      2-3x faster per decode step than the default (DESIGN.md §5). The lm_head is already untied in our
      graph (its own MatMul initializer), so the quantizer covers it too; the embedding stays fp32 (a
      Gather reads one row per token). This is the format onnxruntime-genai's builder writes, and
      `specreason bench quality` measured it at least as close to fp32 as genai's int4 model (SmolLM2-135M:
      greedy agreement 70.4% vs 69.7%, perplexity 1.181x vs 1.192x fp32). Variants measured against it are
      in BENCHMARKS.md ("int4 quality"): block 16 or an 8-bit lm_head gain ~3 points of agreement for more
      bytes per step; asymmetric and k-quant raise perplexity; HQQ's float zero points are nearly lossless
      on a Q4_1 GGUF source but have no int8 kernel in ONNX Runtime 1.32 (over 10x slower decode).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ExportError

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


def quantize(*, src: Path, dst: Path, precision: str, external_data: bool) -> None:
    # ONNX Runtime's quantizers log advice on the root logger ("consider pre-processing") that does not
    # apply to weight-only/dynamic quantization of a decoder; keep the CLI output to our own stages.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize(src=src, dst=dst, precision=precision, external_data=external_data)
    except ImportError as e:
        raise ExportError(f"{precision} quantization needs the package {e.name!r}: "
                          "pip install 'specreason-rt[export]'") from e
    finally:
        root.setLevel(level)


def _quantize(*, src: Path, dst: Path, precision: str, external_data: bool) -> None:
    import onnx

    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=external_data)
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=INT4_BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)
    else:
        raise ValueError(f"quantize() handles int8 and int4, not {precision!r}")
