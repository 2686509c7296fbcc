"""Weight quantization of an exported fp32 graph with ONNX Runtime's own quantizers.

int8: dynamic quantization (int8 weights, activations quantized on the fly) of every MatMul — CPU.
int4: MatMulNBits, block 32, symmetric, accuracy_level 4 (int8 compute): on this CPU level 4 is
      2-3x faster per decode step than the default (DESIGN.md §5). The lm_head is already untied in our
      graph (its own MatMul initializer), so the quantizer covers it too.
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
