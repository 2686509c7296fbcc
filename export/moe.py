"""Mixture-of-experts feed-forward blocks (qwen3_moe, gpt_oss) as one dense, traceable computation.

transformers runs an MoE block as a Python loop over the experts some token selected (`nonzero`, `where`,
`index_add_`). The TorchScript tracer would record that loop for the trace inputs' routing only: the exported
graph would run the experts the trace example happened to pick, for every input. So the graph computes every
expert for every token, and the router only decides the weights:

    router_logits   x @ W_router^T (+ b)                                 [branches, new, experts]
    routing         qwen3_moe: softmax over all experts, keep the top k (optionally renormalised to sum 1)
                    gpt_oss:   keep the top k logits, softmax over those k
    weights         the kept values scattered into a zero matrix         [branches, new, experts]
    experts         gate, up = x @ W_in (+ b), every expert at once      [branches, new, experts, inter]
                    qwen3_moe: silu(gate) * up
                    gpt_oss:   (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=l)
    out             (weights * act) as [branches, new, experts * inter] @ W_out (+ weights @ b_out)

The last line folds the weighted sum over experts into the down projection's contraction, so the block is two
large matmuls plus the router, with no per-expert graph nodes. A non-selected expert has weight exactly 0, so the
sum equals transformers' sparse one. Cost: all experts' FLOPs per token (experts / k times the sparse compute),
the price of a graph without data-dependent control flow (TopK and ScatterElements are plain ONNX ops).

The weights are read from the transformers modules once, when the decoder is built (`qwen3_moe_block`,
`gpt_oss_block`); what differs between transformers versions is in export/hf_compat.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .hf_compat import qwen3_moe_expert_weights

ROUTINGS = ("softmax_topk", "topk_softmax")
ACTIVATIONS = ("silu", "gpt_oss")


class DenseMoE(nn.Module):
    def __init__(self, *, router_weight: torch.Tensor, router_bias: torch.Tensor | None, w_in: torch.Tensor,
                 b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None, top_k: int,
                 routing: str, normalize_top_k: bool = False, activation: str = "silu", alpha: float = 1.702,
                 limit: float = 7.0) -> None:
        """router_weight [experts, hidden]; w_in [experts, 2, inter, hidden] (gate, up); b_in [experts, 2, inter];
        w_out [experts, inter, hidden] (input-major: act @ w_out[e]); b_out [experts, hidden]."""
        super().__init__()
        if routing not in ROUTINGS or activation not in ACTIVATIONS:
            raise ValueError(f"routing must be one of {ROUTINGS} and activation one of {ACTIVATIONS}")
        experts, _, inter, hidden = w_in.shape
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..{experts}, got {top_k}")
        self.experts, self.inter, self.top_k = experts, inter, top_k
        self.routing, self.normalize_top_k, self.activation = routing, normalize_top_k, activation
        self.alpha, self.limit = float(alpha), float(limit)
        self.router_weight = nn.Parameter(router_weight.detach().float().clone(), requires_grad=False)
        self.router_bias = None if router_bias is None else nn.Parameter(router_bias.detach().float().clone(),
                                                                         requires_grad=False)
        # [hidden, experts * 2 * inter]: one matmul for every expert's gate and up projections.
        self.w_in = nn.Parameter(w_in.detach().float().reshape(experts * 2 * inter, hidden).t().contiguous(),
                                 requires_grad=False)
        self.b_in = None if b_in is None else nn.Parameter(b_in.detach().float().reshape(-1).clone(),
                                                           requires_grad=False)
        # [experts * inter, hidden]: the down projections stacked along the contraction.
        self.w_out = nn.Parameter(w_out.detach().float().reshape(experts * inter, hidden).contiguous(),
                                  requires_grad=False)
        self.b_out = None if b_out is None else nn.Parameter(b_out.detach().float().clone(), requires_grad=False)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [..., experts]: the kept experts' weights, zero elsewhere."""
        logits = nn.functional.linear(x, self.router_weight, self.router_bias)  # [..., experts]
        if self.routing == "softmax_topk":
            values, index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)  # [..., k]
            if self.normalize_top_k:
                values = values / values.sum(dim=-1, keepdim=True)
        else:
            values, index = torch.topk(logits, self.top_k, dim=-1)
            values = torch.softmax(values, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, values)

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return nn.functional.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [branches, new, hidden] -> [branches, new, hidden]
        weights = self.route(x)  # [branches, new, experts]
        gate_up = x @ self.w_in  # [branches, new, experts * 2 * inter]
        if self.b_in is not None:
            gate_up = gate_up + self.b_in
        gate_up = gate_up.unflatten(-1, (self.experts, 2, self.inter))  # [branches, new, experts, 2, inter]
        act = self._act(gate_up[..., 0, :], gate_up[..., 1, :])  # [branches, new, experts, inter]
        out = (act * weights[..., None]).flatten(-2) @ self.w_out  # [branches, new, hidden]
        if self.b_out is not None:
            out = out + weights @ self.b_out
        return out


def qwen3_moe_block(mlp: nn.Module) -> nn.Module:
    """A qwen3_moe layer's feed-forward for the decoder: the DenseMoE of a sparse block, or the dense MLP as is
    (layers in mlp_only_layers or off decoder_sparse_step keep a plain Qwen3MoeMLP)."""
    if not hasattr(mlp, "experts"):
        return mlp
    router = mlp.gate  # 4.x: nn.Linear; 5.x: Qwen3MoeTopKRouter; both hold weight [experts, hidden]
    top_k = getattr(mlp, "top_k", None) or router.top_k
    normalize = getattr(mlp, "norm_topk_prob", None)
    normalize = router.norm_topk_prob if normalize is None else normalize
    w_in, w_out = qwen3_moe_expert_weights(mlp.experts)
    return DenseMoE(router_weight=router.weight, router_bias=None, w_in=w_in, b_in=None, w_out=w_out, b_out=None,
                    top_k=int(top_k), routing="softmax_topk", normalize_top_k=bool(normalize), activation="silu")


def gpt_oss_block(mlp: nn.Module) -> DenseMoE:
    """A gpt_oss layer's feed-forward (GptOssMLP: router with bias, experts with biases) as a DenseMoE."""
    experts = mlp.experts
    # gate_up_proj [experts, hidden, 2 * inter] with gate and up interleaved along the last axis (gate even).
    w_in = experts.gate_up_proj.unflatten(2, (-1, 2)).permute(0, 3, 2, 1)  # [experts, 2, inter, hidden]
    b_in = experts.gate_up_proj_bias.unflatten(1, (-1, 2)).transpose(1, 2)  # [experts, 2, inter]
    return DenseMoE(router_weight=mlp.router.weight, router_bias=mlp.router.bias, w_in=w_in, b_in=b_in,
                    w_out=experts.down_proj, b_out=experts.down_proj_bias, top_k=int(mlp.router.top_k),
                    routing="topk_softmax", activation="gpt_oss", alpha=float(experts.alpha),
                    limit=float(experts.limit))
