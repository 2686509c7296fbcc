"""The exported forward: one decoder, every family (export/families.py), a branch dimension and a runtime-owned
KV cache.

We trace our own forward over the Hugging Face model's weights instead of exporting transformers'
forward (or optimum's graph) because the bundle contract needs three things those graphs lack:
  * logits only at the positions the runtime asks for (`logits_index`): a 512-token prefill must not
    materialise [branches, 512, vocab];
  * the graph returns only the new tokens' keys/values; the runtime writes them into its own buffer,
    so nothing copies the whole cache into a fresh "present" tensor each step;
  * grouped-query attention by broadcasting the query groups over the shared KV heads, so the
    graph never materialises repeat_kv copies of the cache. Plain ONNX ops only (TensorRT-parsable).
Three attention variants share everything else:
  * "plain" — standard ONNX ops only, for TensorRT and any execution provider; the graph returns the new
    tokens' keys/values and the runtime writes them into its cache.
  * "gqa"   — ONNX Runtime's GroupQueryAttention contrib op (per-branch lengths via `seqlens_k`), whose past and
    present caches are the *same* runtime-owned buffer bound with IO binding: a decode step copies no cache at
    all. Fastest on ONNX Runtime CPU/CUDA; needs head_dim % 16 == 0. Rotary runs inside the op when every rope
    table is full-width and static (llama: the fast path); partial rotary and longrope are applied in the graph
    and the op is called with do_rotary=0.
  * "prefix" — the plain variant plus a shared prefix segment per layer, `prefix_key/value.{i}`
    [1, kv_heads, prefix_tokens, head_dim]: the keys/values of a prompt that every branch forked from. Scores
    against the prefix come from one MatMul per KV head over all branches' queries at once
    ([kv_heads, branches * groups * new, head_dim] x [kv_heads, head_dim, prefix]), so the prefix is read once
    per forward and never copied per branch; scores against the per-branch past (the suffix after the prefix)
    and the new tokens are the plain variant's; one softmax runs over both. With prefix_tokens = 0 it computes
    exactly what the plain variant does (the runtime's path before a fork).
What a family changes (norm placement, qk-norm, windows, soft-caps, rope tables per layer, multipliers, fused
projections, the MLP module) is data in export/families.py; this file has no per-family branches.

Sliding windows are masked by the graph itself, from positions, so the runtime needs nothing: plain attention
compares query positions (position_ids) with key positions (cumsum(attention_mask) - 1: the cache has holes);
GroupQueryAttention gets local_window_size = window (measured: the same keys as transformers' mask; window - 1
fails validation).
An optional value head (specreason_models.value_head: an MLP ending in a sigmoid) adds the output `value`
[branches, logit_positions]: the head applied to the same final-norm hidden states the logits come from.
The semantics of every input and output are documented in specreason_rt/manifest.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .families import SUPPORTED_FAMILIES, Family, family_of, layer_windows
from .fused import FusedLinear, fuse_mlp, fuse_qkv
from .hf_compat import embedding_scale, rope_modules, rope_state, submodule

__all__ = ["ATTENTION_VARIANTS", "SUPPORTED_FAMILIES", "BranchDecoder", "Disabled"]

ATTENTION_VARIANTS = ("gqa", "plain", "prefix")


@dataclasses.dataclass(frozen=True)
class Disabled:
    """Features to leave out of the traced graph. Only tests use it: to prove that validation sees each one
    (an export without the feature must fail validation). Never set by the exporter."""

    windows: bool = False
    qk_norm: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    rope: bool = False  # no rotary embedding at all
    rope_tables: bool = False  # per-layer rope tables (local bases, no-rope layers, long factors) collapse to one
    embed_scale: bool = False
    sinks: bool = False
    prefix_windows: bool = False  # the prefix variant's window mask on the shared segment


class _GroupQueryAttention(torch.autograd.Function):
    """Emits com.microsoft GroupQueryAttention when traced for ONNX.

    The PyTorch forward only has to give the tracer tensors of the right shapes; what the op computes is
    checked end to end by the export's validation against the transformers model.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, heads, kv_heads, scale,  # type: ignore[override]
                rotary, window, softcap, sink=None):
        return torch.zeros_like(q), past_k.clone(), past_v.clone()

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, heads, kv_heads, scale, rotary, window,
                 softcap, sink=None):
        extra = (cos, sin) if rotary else ()
        if sink is not None:
            # head_sink is input 11: omitted optional inputs before it are encoded as "" (a None constant).
            def none():
                n = g.op("prim::Constant")
                n.setType(torch._C.OptionalType.ofTensor())
                return n
            extra = (*(extra or (none(), none())), none(), none(), sink)
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len, *extra,
            num_heads_i=heads, kv_num_heads_i=kv_heads, do_rotary_i=int(rotary), rotary_interleaved_i=0,
            scale_f=scale, local_window_size_i=window, softcap_f=softcap, outputs=3)
        # Give the tracer the output types (the op has no shape inference in torch): out is shaped like q,
        # the presents like the pasts they alias.
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


@dataclasses.dataclass
class _RopeTable:
    inv_freq: torch.Tensor  # [rotary_dim / 2]
    scale: float  # transformers' attention_scaling (yarn, longrope): multiplies cos and sin
    long_inv_freq: torch.Tensor | None = None  # longrope: used when a branch's max position + 1 > original_max
    original_max: int = 0

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])


def _rope_table(rotary: nn.Module, layer_type: str | None = None) -> _RopeTable:
    # longrope: transformers switches to the long factors per forward (dynamic_rope_update), when max(position) + 1
    # exceeds original_max_position_embeddings; the graph does the same per branch (parity with generate).
    inv_freq, scale, long_inv_freq, original = rope_state(rotary, layer_type)
    return _RopeTable(inv_freq=inv_freq, scale=scale, long_inv_freq=long_inv_freq, original_max=original)


class BranchDecoder(nn.Module):
    def __init__(self, hf_model: nn.Module, *, attention: str = "plain", value_head: nn.Module | None = None,
                 disabled: Disabled | None = None) -> None:
        super().__init__()
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        cfg = hf_model.config
        family = family_of(cfg.model_type)
        if family is None:
            raise ValueError(f"unsupported family {cfg.model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        off = disabled or Disabled()
        self.family: Family = family
        self.attention = attention
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads
        paths = family.paths
        base = getattr(hf_model, paths["base"])
        self.embed = getattr(base, paths["embed"])
        self.layers = getattr(base, paths["layers"])
        self.norm = getattr(base, paths["final_norm"])
        self.lm_head = submodule(hf_model, paths["lm_head"])
        self.value_head = value_head  # maps [..., hidden] -> [...] in [0, 1]
        # Projections that read one input run as one MatMul each (export/fused.py): q/k/v, and the MLP's gate/up.
        self.mlps = nn.ModuleList([fuse_mlp(family.mlp(layer)) for layer in self.layers])
        self.qkv_projs = nn.ModuleList()  # owns the fused weights; _qkv finds a layer's by its attention module
        self._fused_qkv: dict[nn.Module, FusedLinear] = {}
        if family.qkv == "split":
            for layer in self.layers:
                attn = getattr(layer, paths["attn"])
                fused = fuse_qkv(attn)
                if fused is not None:
                    self.qkv_projs.append(fused)
                    self._fused_qkv[attn] = fused

        # Family data resolved against this config.
        self.block = "parallel" if family.is_parallel(cfg) else family.block
        # A scaled embedding module (gemma3; gemma2 in transformers 5.x) multiplies by itself: the graph looks up
        # its plain rows and applies that factor, so the factor is one datum (and can be left out in tests).
        self.scaled_embedding = embedding_scale(self.embed)
        scale = self.scaled_embedding if self.scaled_embedding is not None else family.embed_scale(cfg)
        self.embed_scale = 1.0 if off.embed_scale else float(scale)
        self.residual_scale = float(family.residual_scale(cfg))
        self.logit_divisor = float(family.logit_divisor(cfg))
        self.qk_norm = None if off.qk_norm else family.qk_norm_in(cfg)
        self.attn_softcap = None if off.attn_softcap else getattr(cfg, "attn_logit_softcapping", None)
        self.final_softcap = None if off.final_softcap else getattr(cfg, "final_logit_softcapping", None)
        self.windows: list[int | None] = layer_windows(family=family, config=cfg)
        if off.windows:
            self.windows = [None] * len(self.layers)
        self.sinks = family.sinks and not off.sinks
        self.prefix_windows = not off.prefix_windows

        # Rope tables and which one each layer uses (None: the layer has no rope).
        # The rope module lives on the decoder body; stablelm keeps one per attention module (all equal).
        rotary = getattr(base, "rotary_emb", None) or getattr(self.layers[0], paths["attn"]).rotary_emb
        self.tables = [_rope_table(m, t) for m, t in rope_modules(rotary=rotary, base=base, local=family.local_rope)]
        self.layer_rope: list[int | None] = []
        no_rope = getattr(cfg, family.no_rope_field, None) if family.no_rope_field else None
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers)
        for i in range(len(self.layers)):
            if no_rope is not None and not no_rope[i]:
                self.layer_rope.append(None)
            elif family.local_rope and types[i] == "sliding_attention":  # as gemma3's attn.is_sliding
                self.layer_rope.append(1)
            else:
                self.layer_rope.append(0)
        if off.rope_tables:
            self.layer_rope = [0] * len(self.layers)
            self.tables = [dataclasses.replace(self.tables[0], long_inv_freq=None)]
        if off.rope:
            self.layer_rope = [None] * len(self.layers)
        # GroupQueryAttention rotates inside the op only for full-width static tables; otherwise the graph does.
        self.rope_in_op = all(t.rotary_dim == self.head_dim and t.long_inv_freq is None for t in self.tables)
        if attention == "gqa" and self.rope_in_op:
            # GroupQueryAttention reads cos/sin per position from these tables: [max_context, head_dim / 2].
            positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None]
            for i, t in enumerate(self.tables):
                angles = positions * t.inv_freq[None]
                self.register_buffer(f"cos_cache{i}", angles.cos() * t.scale, persistent=False)
                self.register_buffer(f"sin_cache{i}", angles.sin() * t.scale, persistent=False)

    def forward(self, *args: torch.Tensor):
        if self.attention == "gqa":
            return self.forward_gqa(*args)
        if self.attention == "prefix":
            return self.forward_prefix(*args)
        return self.forward_plain(*args)

    # --- pieces shared by both variants ---------------------------------------------------------------------

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.scaled_embedding is not None:
            h = nn.functional.embedding(input_ids, self.embed.weight)  # [branches, new, hidden], unscaled rows
        else:
            h = self.embed(input_ids)  # [branches, new, hidden]
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    def _logits(self, h: torch.Tensor, logits_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Only the requested positions go through the final norm, the vocab projection and the value head.
        index = logits_index[:, :, None].expand(-1, -1, h.shape[-1])
        picked = self.norm(torch.gather(h, 1, index))  # [branches, k, hidden]
        logits = self.lm_head(picked)  # [branches, k, vocab]
        if self.logit_divisor != 1.0:
            logits = logits / self.logit_divisor
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        if self.value_head is None:
            return (logits,)
        return logits, self.value_head(picked)  # and value [branches, k]

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected and qk-normed q [branches, new, heads * head_dim], k and v [branches, new, kv_heads * head_dim]."""
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        b, n = x.shape[:2]
        if self.family.qkv == "fused":
            qkv = attn.qkv_proj(x)
            q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
        elif self.family.qkv == "interleaved":
            qkv = attn.query_key_value(x).view(b, n, self.heads, 3 * self.head_dim)  # per head [q | k | v]
            q, k, v = (qkv[..., i * self.head_dim:(i + 1) * self.head_dim].reshape(b, n, q_size) for i in range(3))
        elif attn in self._fused_qkv:
            q, k, v = self._fused_qkv[attn](x)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if self.qk_norm is None:
            return q, k, v
        q_norm, k_norm = (getattr(attn, name) for name in self.family.qk_norm_modules)
        if self.qk_norm == "whole":
            return q_norm(q), k_norm(k), v
        q = q.view(b, n, self.heads, self.head_dim)
        k = k.view(b, n, self.kv_heads, self.head_dim)
        if self.qk_norm == "head_first":  # the module takes [branches, heads, new, head_dim]
            q, k = q_norm(q.transpose(1, 2)).transpose(1, 2), k_norm(k.transpose(1, 2)).transpose(1, 2)
        else:
            q, k = q_norm(q), k_norm(k)
        return q.reshape(b, n, q_size), k.reshape(b, n, kv_size), v

    def _rope_angles(self, positions: torch.Tensor, seq_len: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per rope table: cos, sin [branches, 1, new, rotary_dim] at positions [branches, new]; seq_len
        [branches]: tokens in each branch after this call (longrope's switch)."""
        pos = positions.float()[..., None]  # [branches, new, 1]
        out = []
        for t in self.tables:
            inv = t.inv_freq  # [rotary_dim / 2]
            if t.long_inv_freq is not None:
                # Per branch, as transformers per forward (max position + 1 > original max: long factors), so a
                # branch matches transformers generate: cached keys keep the factors they were computed with.
                long = (seq_len > t.original_max)[:, None, None]  # [branches, 1, 1]
                inv = torch.where(long, t.long_inv_freq, t.inv_freq)  # [branches, 1, rotary_dim / 2]
            freqs = pos * inv  # [branches, new, rotary_dim / 2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [branches, 1, new, rotary_dim]
            out.append((angles.cos() * t.scale, angles.sin() * t.scale))
        return out

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [branches, heads, new, head_dim]; cos/sin: [branches, 1, new, rotary_dim]; rotate_half convention,
        # dims past rotary_dim (partial rotary) pass through.
        dim = cos.shape[-1]
        partial = dim < x.shape[-1]
        rot = x[..., :dim] if partial else x  # full rotary traces no slice
        half = dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, x[..., dim:]), dim=-1) if partial else out

    def _block(self, i: int, h: torch.Tensor, attend) -> torch.Tensor:
        """One layer's residual wiring (families.py, `block`); attend(x) -> attention output [b, new, hidden]."""
        layer, norms, r = self.layers[i], self.family.norms, self.residual_scale
        mlp = self.mlps[i]
        if self.block == "parallel":
            x = getattr(layer, norms["input"])(h)
            # gpt_neox normalises the MLP's input with its own norm; phi and stablelm (no such module) reuse x
            post = getattr(layer, norms["post_attn"], None) if "post_attn" in norms else None
            mlp_in = post(h) if post is not None else x
            return h + attend(x) + mlp(mlp_in)
        if self.block == "sandwich":
            h = h + getattr(layer, norms["post_attn"])(attend(getattr(layer, norms["input"])(h)))
            return h + getattr(layer, norms["post_ff"])(mlp(getattr(layer, norms["pre_ff"])(h)))
        if self.block == "post":
            h = h + getattr(layer, norms["post_attn"])(attend(h))
            return h + getattr(layer, norms["post_ff"])(mlp(h))
        attn_out = attend(getattr(layer, norms["input"])(h))
        h = h + (attn_out * r if r != 1.0 else attn_out)  # granite's residual multiplier; no op traced at 1
        mlp_out = mlp(getattr(layer, norms["post_attn"])(h))
        return h + (mlp_out * r if r != 1.0 else mlp_out)

    def _attn_module(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.family.paths["attn"])

    def _sink(self, attn: nn.Module) -> torch.Tensor | None:
        """The attention sink logits [heads] (families.py `sinks`), or None."""
        return attn.sinks.float() if self.sinks else None

    def _scaling(self, attn: nn.Module) -> float:
        return float(getattr(attn, "scaling", self.head_dim ** -0.5))

    # --- the two variants -----------------------------------------------------------------------------------

    def forward_gqa(self, input_ids: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                    logits_index: torch.Tensor, *past: torch.Tensor):
        # input_ids: [branches, new]; seqlens_k: [branches] int32 = tokens in the branch after this call - 1
        # total_sequence_length: [] int32 = max over branches of (seqlens_k + 1)
        # past: keys then values, each [branches, kv_heads, capacity, head_dim] — shared with the outputs
        n_layers = len(self.layers)
        past_keys, past_values = past[:n_layers], past[n_layers:]
        branches, new = input_ids.shape
        h = self._embed(input_ids)
        angles: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not self.rope_in_op:
            # The runtime feeds every row `new` tokens, so row b's tokens sit at seqlens_k[b] + 1 - new + j.
            positions = (seqlens_k.long()[:, None] + 1 - new) + torch.arange(new, device=input_ids.device)[None]
            # The padded tail of a ragged row counts here (the op's inputs do not say which tokens are padding):
            # a batched prefill of rows on both sides of longrope's switch takes the long factors for all of them.
            angles = self._rope_angles(positions, seqlens_k.long() + 1)
        present_keys, present_values = [], []
        for i, (pk, pv) in enumerate(zip(past_keys, past_values, strict=True)):
            attn = self._attn_module(i)
            table = self.layer_rope[i]

            def attend(x: torch.Tensor, attn=attn, table=table, pk=pk, pv=pv, window=self.windows[i]
                       ) -> torch.Tensor:
                q, k, v = self._qkv(attn, x)
                rotary = self.rope_in_op and table is not None
                if not self.rope_in_op and table is not None:
                    cos, sin = angles[table]
                    q = self._rope(q.view(branches, new, self.heads, self.head_dim).transpose(1, 2), cos, sin)
                    k = self._rope(k.view(branches, new, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
                    q = q.transpose(1, 2).reshape(branches, new, self.heads * self.head_dim)
                    k = k.transpose(1, 2).reshape(branches, new, self.kv_heads * self.head_dim)
                t = table or 0
                cos_cache = getattr(self, f"cos_cache{t}", None) if rotary else None
                sin_cache = getattr(self, f"sin_cache{t}", None) if rotary else None
                out, kk, vv = _GroupQueryAttention.apply(
                    q, k, v, pk, pv, seqlens_k, total_sequence_length, cos_cache, sin_cache, self.heads,
                    self.kv_heads, self._scaling(attn), rotary, -1 if window is None else window,
                    float(self.attn_softcap or 0.0), self._sink(attn))
                present_keys.append(kk)
                present_values.append(vv)
                return getattr(attn, self.family.paths["o_proj"])(out)

            h = self._block(i, h, attend)
        return (*self._logits(h, logits_index), *present_keys, *present_values)

    def forward_plain(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                      logits_index: torch.Tensor, *past: torch.Tensor):
        # input_ids, position_ids: [branches, new]; attention_mask: [branches, past + new]
        # logits_index: [branches, k]; past: keys then values, each [branches, kv_heads, past, head_dim]
        n_layers = len(self.layers)
        return self._forward_masked(input_ids, position_ids, attention_mask, logits_index,
                                    past[:n_layers], past[n_layers:], None, None)

    def forward_prefix(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                       logits_index: torch.Tensor, *past: torch.Tensor):
        # As forward_plain, and after the past keys and values the prefix keys then values, each
        # [1, kv_heads, prefix, head_dim]: tokens at positions 0 .. prefix - 1, seen by every branch. The past
        # (and attention_mask, position_ids' origin) covers the tokens after the prefix.
        n = len(self.layers)
        return self._forward_masked(input_ids, position_ids, attention_mask, logits_index,
                                    past[:n], past[n:2 * n], past[2 * n:3 * n], past[3 * n:])

    def _forward_masked(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_index: torch.Tensor, past_keys: tuple[torch.Tensor, ...],
                        past_values: tuple[torch.Tensor, ...], prefix_keys: tuple[torch.Tensor, ...] | None,
                        prefix_values: tuple[torch.Tensor, ...] | None):
        branches, new = input_ids.shape
        h = self._embed(input_ids)
        # prefix: [] tokens before the per-branch past (0 without a prefix segment)
        prefix = prefix_keys[0].shape[2] if prefix_keys is not None else 0
        seq_len = attention_mask.sum(dim=1) + prefix  # [branches]: real tokens per branch after this call
        angles = self._rope_angles(position_ids, seq_len)
        if all(t is None for t in self.layer_rope) and all(w is None for w in self.windows):
            # Nothing reads positions (a test's rope-less graph): keep position_ids a graph input all the same.
            h = h + position_ids[..., None].to(h.dtype) * 0.0

        # allowed[b, 0, 0, j, t]: new token j (slot past + j) may attend to key slot t.
        past_len = past_keys[0].shape[2]
        key_slot = torch.arange(attention_mask.shape[1], device=input_ids.device)
        query_slot = torch.arange(new, device=input_ids.device) + past_len
        causal = key_slot[None, :] <= query_slot[:, None]  # [new, total]
        allowed = causal[None] & (attention_mask[:, None, :] > 0)  # [branches, new, total]
        masks: dict[int | None, torch.Tensor] = {None: allowed[:, None, None]}  # [branches, 1, 1, new, total]
        # Every prefix token precedes every new token: only sliding windows mask the prefix.
        prefix_masks: dict[int | None, torch.Tensor | None] = {None: None}
        key_pos = torch.cumsum(attention_mask, dim=1) - 1 + prefix  # [branches, total]: the cache has holes
        for window in {w for w in self.windows if w is not None}:
            # transformers: a query at position i sees keys at positions > i - window.
            near = position_ids[:, :, None] - key_pos[:, None, :] < window  # [branches, new, total]
            masks[window] = (allowed & near)[:, None, None]
            if prefix_keys is not None and self.prefix_windows:
                prefix_pos = torch.arange(prefix, device=input_ids.device)  # [prefix]
                prefix_masks[window] = (position_ids[:, :, None] - prefix_pos[None, None, :] < window)[:, None, None]
        floor = torch.finfo(h.dtype).min

        new_keys, new_values = [], []
        for i, (pk, pv) in enumerate(zip(past_keys, past_values, strict=True)):
            attn = self._attn_module(i)
            table = self.layer_rope[i]
            shared = (prefix_keys[i], prefix_values[i]) if prefix_keys is not None and prefix_values is not None \
                else None
            prefix_mask = prefix_masks.get(self.windows[i])  # None: nothing masks the prefix (or there is none)

            def attend(x: torch.Tensor, attn=attn, table=table, pk=pk, pv=pv, mask=masks[self.windows[i]],
                       shared=shared, prefix_mask=prefix_mask) -> torch.Tensor:
                q, k, v = self._qkv(attn, x)
                q = q.view(branches, new, self.heads, self.head_dim).transpose(1, 2)
                k = k.view(branches, new, self.kv_heads, self.head_dim).transpose(1, 2)
                v = v.view(branches, new, self.kv_heads, self.head_dim).transpose(1, 2)
                if table is not None:
                    cos, sin = angles[table]
                    q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                new_keys.append(k)
                new_values.append(v)
                keys = torch.cat((pk, k), dim=2)[:, :, None]  # [branches, kv_heads, 1, total, head_dim]
                values = torch.cat((pv, v), dim=2)[:, :, None]
                # Query head h uses KV head h // groups (as transformers' repeat_kv): group the query heads.
                qg = q.reshape(branches, self.kv_heads, self.groups, new, self.head_dim)
                scores = torch.matmul(qg, keys.transpose(-1, -2)) * self._scaling(attn)  # [b, kv, g, new, total]
                if self.attn_softcap:
                    scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
                scores = torch.where(mask, scores, floor)
                if shared is not None:
                    # All branches' queries of one KV head form the rows of one product with that head's prefix
                    # keys: [kv, branches * groups * new, head_dim] x [kv, head_dim, prefix] (no per-branch copy).
                    rows = qg.transpose(0, 1).reshape(self.kv_heads, branches * self.groups * new, self.head_dim)
                    # reshape, not [0]: indexing traces to a Gather that copies the prefix every forward, a
                    # reshape aliases it
                    prefix_k = shared[0].reshape(self.kv_heads, -1, self.head_dim)  # [kv, prefix, head_dim]
                    pre = torch.matmul(rows, prefix_k.transpose(-1, -2)) * self._scaling(attn)  # [kv, rows, P]
                    pre = pre.reshape(self.kv_heads, branches, self.groups, new, -1).transpose(0, 1)
                    if self.attn_softcap:
                        pre = torch.tanh(pre / self.attn_softcap) * self.attn_softcap
                    if prefix_mask is not None:
                        pre = torch.where(prefix_mask, pre, floor)  # [b, kv, g, new, prefix]
                    scores = torch.cat((pre, scores), dim=-1)  # [b, kv, g, new, prefix + total]
                if self.sinks:
                    # gpt-oss: a per-head sink logit joins the softmax denominator and is dropped after it.
                    sink = self._sink(attn).reshape(1, self.kv_heads, self.groups, 1, 1).expand(
                        branches, -1, -1, new, 1)
                    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
                else:
                    probs = torch.softmax(scores, dim=-1)
                if shared is None:
                    out = torch.matmul(probs, values)  # [branches, kv_heads, groups, new, head_dim]
                else:
                    pre_probs = probs[..., :prefix].transpose(0, 1).reshape(
                        self.kv_heads, branches * self.groups * new, -1)  # [kv, rows, prefix]
                    prefix_v = shared[1].reshape(self.kv_heads, -1, self.head_dim)  # [kv, prefix, head_dim]
                    pre_out = torch.matmul(pre_probs, prefix_v)  # [kv, rows, head_dim]
                    pre_out = pre_out.reshape(self.kv_heads, branches, self.groups, new, self.head_dim).transpose(0, 1)
                    out = pre_out + torch.matmul(probs[..., prefix:], values)  # [b, kv, g, new, head_dim]
                out = out.reshape(branches, self.heads, new, self.head_dim).transpose(1, 2)
                return getattr(attn, self.family.paths["o_proj"])(out.reshape(branches, new, -1))

            h = self._block(i, h, attend)

        return (*self._logits(h, logits_index), *new_keys, *new_values)
