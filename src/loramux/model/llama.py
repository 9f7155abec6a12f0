"""A Llama-family decoder over one flat batch of rows from many sequences and adapters.

Module names mirror Hugging Face's (`model.layers.N.self_attn.q_proj`, ...) so that a transformers
state dict loads as it is and PEFT adapter keys map one to one. Every linear is a
`MultiLoraLinear`; all base weights are frozen.

`forward(batch)` runs each part of the batch under its own grad mode (the TRAIN part with autograd,
the other part without) and returns the final hidden states of all rows; `logits(hidden)` projects
only the rows the caller needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loramux.config import ATTENTION_LINEARS, ModelConfig
from loramux.engine.batch import Batch, BatchPart
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.layer import MultiLoraLinear
from loramux.model.rope import apply_rotary, inverse_frequencies, rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class StepContext:
    """Per-part values every layer needs, computed once per forward: the part, the KV cache, rotary
    tables, the adapters' weights version."""

    def __init__(self, part: BatchPart, kv: PagedKVCache | None, cos: torch.Tensor, sin: torch.Tensor, weights_version: int) -> None:
        self.part, self.kv, self.cos, self.sin, self.weights_version = part, kv, cos, sin, weights_version

    def linear(self, layer: MultiLoraLinear, x: torch.Tensor) -> torch.Tensor:
        return layer(x, self.part.lora, self.part.builds_graph, self.weights_version)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, q, kv = config.hidden_size, config.q_size, config.kv_size
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = MultiLoraLinear(h, q, config.qkv_bias, "q_proj", layer_idx)
        self.k_proj = MultiLoraLinear(h, kv, config.qkv_bias, "k_proj", layer_idx)
        self.v_proj = MultiLoraLinear(h, kv, config.qkv_bias, "v_proj", layer_idx)
        self.o_proj = MultiLoraLinear(q, h, config.o_bias, "o_proj", layer_idx)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        q = ctx.linear(self.q_proj, x).view(T, self.num_heads, self.head_dim)
        k = ctx.linear(self.k_proj, x).view(T, self.num_kv_heads, self.head_dim)
        v = ctx.linear(self.v_proj, x).view(T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        plan = ctx.part.attention
        if plan.write_rows.numel():
            ctx.kv.write(self.layer_idx, plan.write_slots, k[plan.write_rows], v[plan.write_rows])
        out = q.new_empty(T, self.num_heads, self.head_dim)
        if plan.decode_rows.numel():
            # [B, heads, 1, D] over each sequence's cached context [B, kv_heads, C, D], padded and masked
            keys = ctx.kv.k[self.layer_idx][plan.decode_slots].transpose(1, 2)
            values = ctx.kv.v[self.layer_idx][plan.decode_slots].transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                q[plan.decode_rows].unsqueeze(2), keys, values, attn_mask=plan.decode_mask, enable_gqa=True
            )
            out[plan.decode_rows] = attended.squeeze(2)
        for span in plan.spans:
            rows = slice(span.start, span.end)
            if span.context_slots is None:
                ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                ks = ctx.kv.k[self.layer_idx][span.context_slots].transpose(0, 1)
                vs = ctx.kv.v[self.layer_idx][span.context_slots].transpose(0, 1)
            out[rows] = _causal_attention(q[rows].transpose(0, 1), ks, vs, span.start_pos).transpose(0, 1)
        return ctx.linear(self.o_proj, out.reshape(T, -1))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """q [heads, L, D] at positions [start_pos, start_pos + L); k, v [kv_heads, start_pos + L, D].
    Called with a batch dimension of 1: on CPU, 3-D inputs fall back to the unfused math kernel,
    which keeps the whole [heads, L, L] probability matrix for backward."""
    L, context = q.shape[1], k.shape[1]
    q, k, v = q[None], k[None], v[None]
    if L == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[0]
    if context == L:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0]
    allowed = torch.arange(context, device=q.device)[None, :] <= torch.arange(start_pos, start_pos + L, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)[0]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = MultiLoraLinear(h, i, b, "gate_proj", layer_idx)
        self.up_proj = MultiLoraLinear(h, i, b, "up_proj", layer_idx)
        self.down_proj = MultiLoraLinear(i, h, b, "down_proj", layer_idx)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return ctx.linear(self.down_proj, F.silu(ctx.linear(self.gate_proj, x)) * ctx.linear(self.up_proj, x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """The frozen base model. `weights_version` is bumped by whoever changes adapter weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(config.rope, config.head_dim), persistent=False)
        self.requires_grad_(False)
        self.weights_version = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def linear(self, layer_idx: int, name: str) -> MultiLoraLinear:
        layer = self.model.layers[layer_idx]
        return getattr(layer.self_attn if name in ATTENTION_LINEARS else layer.mlp, name)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns the final-normed hidden states [num_rows, hidden] of all rows of the batch."""
        hidden = [self._forward_part(part, batch.kv) for part in batch.parts]
        with torch.set_grad_enabled(any(p.builds_graph for p in batch.parts)):
            return hidden[0] if len(hidden) == 1 else torch.cat(hidden)

    def _forward_part(self, part: BatchPart, kv: PagedKVCache | None) -> torch.Tensor:
        # The part's kind decides, whatever the caller's grad mode (not inference_mode, though).
        with torch.set_grad_enabled(part.builds_graph):
            cos, sin = rotary_tables(part.positions, self.inv_freq, self.dtype)
            ctx = StepContext(part, kv, cos, sin, self.weights_version)
            x = self.model.embed_tokens(part.input_ids)
            for layer in self.model.layers:
                x = layer(x, ctx)
            return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
