"""The exported forward: a Llama-family decoder with a branch dimension and a runtime-owned KV cache.

We trace our own forward over the Hugging Face model's weights instead of exporting transformers'
forward (or optimum's graph) because the bundle contract needs three things those graphs lack:
  * logits only at the positions the runtime asks for (`logits_index`): a 512-token prefill must not
    materialise [branches, 512, vocab];
  * the graph returns only the new tokens' keys/values; the runtime writes them into its own buffer,
    so nothing copies the whole cache into a fresh "present" tensor each step;
  * grouped-query attention by broadcasting the query groups over the shared KV heads, so the
    graph never materialises repeat_kv copies of the cache. Plain ONNX ops only (TensorRT-parsable).
The semantics of every input and output are documented in specreason_rt/manifest.py.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


class BranchDecoder(nn.Module):
    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        cfg = hf_model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.embed = hf_model.model.embed_tokens
        self.layers = hf_model.model.layers
        self.norm = hf_model.model.norm
        self.lm_head = hf_model.lm_head
        rotary = hf_model.model.rotary_emb
        # inv_freq and attention_scaling already include any rope scaling (llama3, yarn, ...) of the source.
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [branches, heads, new, head_dim]; cos/sin: [branches, 1, new, head_dim]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                logits_index: torch.Tensor, *past: torch.Tensor):
        # input_ids, position_ids: [branches, new]; attention_mask: [branches, past + new]
        # logits_index: [branches, k]; past: keys then values, each [branches, kv_heads, past, head_dim]
        n_layers = len(self.layers)
        past_keys, past_values = past[:n_layers], past[n_layers:]
        branches, new = input_ids.shape
        h = self.embed(input_ids)  # [branches, new, hidden]

        freqs = position_ids[..., None].float() * self.inv_freq  # [branches, new, head_dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [branches, 1, new, head_dim]
        cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

        # allowed[b, 0, 0, j, t]: new token j (slot past + j) may attend to key slot t.
        past_len = past_keys[0].shape[2]
        key_slot = torch.arange(attention_mask.shape[1], device=input_ids.device)
        query_slot = torch.arange(new, device=input_ids.device) + past_len
        causal = key_slot[None, :] <= query_slot[:, None]  # [new, total]
        allowed = causal[None] & (attention_mask[:, None, :] > 0)  # [branches, new, total]
        allowed = allowed[:, None, None]  # [branches, 1, 1, new, total]
        floor = torch.finfo(h.dtype).min

        new_keys, new_values = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(branches, new, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(branches, new, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(branches, new, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            new_keys.append(k)
            new_values.append(v)
            keys = torch.cat((pk, k), dim=2)[:, :, None]  # [branches, kv_heads, 1, total, head_dim]
            values = torch.cat((pv, v), dim=2)[:, :, None]
            # Query head h uses KV head h // groups (as transformers' repeat_kv): group the query heads.
            qg = q.reshape(branches, self.kv_heads, self.groups, new, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * attn.scaling  # [b, kv, g, new, total]
            scores = torch.where(allowed, scores, floor)
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, values)  # [branches, kv_heads, groups, new, head_dim]
            out = out.reshape(branches, self.heads, new, self.head_dim).transpose(1, 2)
            h = h + attn.o_proj(out.reshape(branches, new, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))

        # Only the requested positions go through the final norm and the vocab projection.
        index = logits_index[:, :, None].expand(-1, -1, h.shape[-1])
        picked = self.norm(torch.gather(h, 1, index))  # [branches, k, hidden]
        logits = self.lm_head(picked)  # [branches, k, vocab]
        return (logits, *new_keys, *new_values)
