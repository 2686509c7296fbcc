"""Fused projections: the linear maps that read the same input become one MatMul, split after it.

A decode step is bound by reading weights, and ONNX Runtime pays a fixed cost per MatMul node (thread-pool
dispatch, a kernel prologue, one more output buffer). Transformers keeps q, k, v and the MLP's gate and up as
separate modules; the exported graph concatenates their weights once, at export:

    qkv      x @ [Wq | Wk | Wv] (+ [bq | bk | bv])  -> Split -> q, k, v      (SmolLM2: 960 output columns)
    gate/up  x @ [Wg | Wu]      (+ [bg | bu])       -> Split -> gate, up;   out = down(act(gate) * up)

so a llama-style layer runs 4 MatMuls instead of 7 (SmolLM2-135M: 151 per decode step instead of 211, the same
count as onnxruntime-genai's builder). The weights are stored input-major ([in, out]) so the graph's MatMul reads
the initializer directly (no Transpose, nothing for constant folding to duplicate), and int4 quantization
(MatMulNBits, export/quantize.py) sees one constant weight per fused MatMul.

Families whose checkpoints are already fused keep their module (phi3's qkv_proj and gate_up_proj, gpt_neox's
interleaved query_key_value); MLPs without a gate (gpt_neox, phi: fc1 -> act -> fc2) have nothing to fuse; the
mixture-of-experts blocks (export/moe.py) already run every expert's gate and up as one MatMul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FusedLinear", "GatedMLP", "fuse_mlp", "fuse_qkv"]


class FusedLinear(nn.Module):
    """Several nn.Linear of one input as one MatMul (+ one Add) and one Split."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        if len({m.in_features for m in linears}) != 1:
            raise ValueError("fused projections must read inputs of one size")
        self.sizes = [m.out_features for m in linears]
        # [in, sum(out)]: input-major, so the traced MatMul reads this initializer as is.
        weight = torch.cat([m.weight.detach().float() for m in linears], dim=0).t().contiguous()
        self.weight = nn.Parameter(weight, requires_grad=False)
        bias = None
        if any(m.bias is not None for m in linears):
            # A projection without bias adds zeros: one Add for all (qwen2 biases q, k, v; llama's mlp_bias all).
            bias = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                              for m in linears])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # The source modules read their rows of the fused copy from now on (same values): the export holds each
        # projection's weights once, not twice (a 3B model's q/k/v/gate/up are ~8 GB in fp32).
        start = 0
        for m in linears:
            if m.weight.dtype == weight.dtype and m.weight.device == weight.device:
                m.weight.data = self.weight.data[:, start:start + m.out_features].t()
            start += m.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: [branches, new, in] -> one tensor per projection, [branches, new, out_i]
        y = torch.matmul(x, self.weight)  # [branches, new, sum(out)]
        if self.bias is not None:
            y = y + self.bias
        return tuple(torch.split(y, self.sizes, dim=-1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused; `act` and `down` are the source module's own."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.act = mlp.act_fn
        self.down = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # each [branches, new, intermediate]
        return self.down(self.act(gate) * up)


def _is_linear(module: object) -> bool:
    return isinstance(module, nn.Linear)


def fuse_qkv(attn: nn.Module) -> FusedLinear | None:
    """q, k, v of an attention module with separate projections as one FusedLinear; None when there is nothing to
    fuse (already fused or interleaved checkpoints)."""
    parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if not all(_is_linear(p) for p in parts):
        return None
    return FusedLinear(parts)  # type: ignore[arg-type]


def fuse_mlp(mlp: nn.Module) -> nn.Module:
    """A gated MLP (gate_proj, up_proj, down_proj, act_fn: llama, qwen, gemma, olmo2, granite, stablelm, smollm3)
    as GatedMLP; any other feed-forward module unchanged."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(_is_linear(p) for p in parts) or not callable(getattr(mlp, "act_fn", None)):
        return mlp
    return GatedMLP(mlp)
