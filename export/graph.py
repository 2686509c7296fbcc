"""The exported forward: a Llama-family decoder with a branch dimension and a runtime-owned KV cache.

We trace our own forward over the Hugging Face model's weights instead of exporting transformers'
forward (or optimum's graph) because the bundle contract needs three things those graphs lack:
  * logits only at the positions the runtime asks for (`logits_index`): a 512-token prefill must not
    materialise [branches, 512, vocab];
  * the graph returns only the new tokens' keys/values; the runtime writes them into its own buffer,
    so nothing copies the whole cache into a fresh "present" tensor each step;
  * grouped-query attention by broadcasting the query groups over the shared KV heads, so the
    graph never materialises repeat_kv copies of the cache. Plain ONNX ops only (TensorRT-parsable).
Two attention variants share everything else:
  * "plain" — standard ONNX ops only, for TensorRT and any execution provider; the graph returns the new
    tokens' keys/values and the runtime writes them into its cache.
  * "gqa"   — ONNX Runtime's GroupQueryAttention contrib op (rotary inside, per-branch lengths via
    `seqlens_k`), whose past and present caches are the *same* runtime-owned buffer bound with IO binding:
    a decode step copies no cache at all. Fastest on ONNX Runtime CPU/CUDA; needs head_dim % 16 == 0.
An optional value head (specreason_models.value_head: an MLP ending in a sigmoid) adds the output `value`
[branches, logit_positions]: the head applied to the same final-norm hidden states the logits come from.
The semantics of every input and output are documented in specreason_rt/manifest.py.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
ATTENTION_VARIANTS = ("gqa", "plain")


class _GroupQueryAttention(torch.autograd.Function):
    """Emits com.microsoft GroupQueryAttention when traced for ONNX.

    The PyTorch forward only has to give the tracer tensors of the right shapes; what the op computes is
    checked end to end by the export's validation against the transformers model.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, heads, kv_heads, scale):  # type: ignore[override]
        return torch.zeros_like(q), past_k.clone(), past_v.clone()

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, heads, kv_heads, scale):
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin,
            num_heads_i=heads, kv_num_heads_i=kv_heads, do_rotary_i=1, rotary_interleaved_i=0, scale_f=scale,
            outputs=3)
        # Give the tracer the output types (the op has no shape inference in torch): out is shaped like q,
        # the presents like the pasts they alias.
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class BranchDecoder(nn.Module):
    def __init__(self, hf_model: nn.Module, *, attention: str = "plain", value_head: nn.Module | None = None) -> None:
        super().__init__()
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        self.attention = attention
        cfg = hf_model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.embed = hf_model.model.embed_tokens
        self.layers = hf_model.model.layers
        self.norm = hf_model.model.norm
        self.lm_head = hf_model.lm_head
        self.value_head = value_head  # maps [..., hidden] -> [...] in [0, 1]
        rotary = hf_model.model.rotary_emb
        # inv_freq and attention_scaling already include any rope scaling (llama3, yarn, ...) of the source.
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        if attention == "gqa":
            # GroupQueryAttention reads cos/sin per position from these tables: [max_context, head_dim / 2].
            angles = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * self.inv_freq[None]
            self.register_buffer("cos_cache", angles.cos() * self.rope_scale, persistent=False)
            self.register_buffer("sin_cache", angles.sin() * self.rope_scale, persistent=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [branches, heads, new, head_dim]; cos/sin: [branches, 1, new, head_dim]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, *args: torch.Tensor):
        if self.attention == "gqa":
            return self.forward_gqa(*args)
        return self.forward_plain(*args)

    def _logits(self, h: torch.Tensor, logits_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Only the requested positions go through the final norm, the vocab projection and the value head.
        index = logits_index[:, :, None].expand(-1, -1, h.shape[-1])
        picked = self.norm(torch.gather(h, 1, index))  # [branches, k, hidden]
        if self.value_head is None:
            return (self.lm_head(picked),)  # logits [branches, k, vocab]
        return self.lm_head(picked), self.value_head(picked)  # and value [branches, k]

    def forward_gqa(self, input_ids: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                    logits_index: torch.Tensor, *past: torch.Tensor):
        # input_ids: [branches, new]; seqlens_k: [branches] int32 = tokens in the branch after this call - 1
        # total_sequence_length: [] int32 = max over branches of (seqlens_k + 1)
        # past: keys then values, each [branches, kv_heads, capacity, head_dim] — shared with the outputs
        n_layers = len(self.layers)
        past_keys, past_values = past[:n_layers], past[n_layers:]
        h = self.embed(input_ids)  # [branches, new, hidden]
        present_keys, present_values = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            out, k, v = _GroupQueryAttention.apply(
                attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), pk, pv, seqlens_k, total_sequence_length,
                self.cos_cache, self.sin_cache, self.heads, self.kv_heads, float(attn.scaling))
            present_keys.append(k)
            present_values.append(v)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (*self._logits(h, logits_index), *present_keys, *present_values)

    def forward_plain(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
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

        return (*self._logits(h, logits_index), *new_keys, *new_values)
