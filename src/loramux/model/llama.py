"""A Llama-family decoder over one flat batch of rows from many sequences and adapters.

Projections that read the same input run as one GEMM: q, k, v as `self_attn.qkv_proj` and gate, up
as `mlp.gate_up_proj` (`FusedLoraLinear`); o and down are `MultiLoraLinear`s. The state dict still
uses Hugging Face's names (`model.layers.N.self_attn.q_proj.weight`, ...): a transformers state dict
loads as it is (its q, k, v weights are concatenated on load) and `state_dict()` gives them back
separately. Adapters see each projection under its PEFT name through `LlamaModel.linear(layer, name)`.
All base weights are frozen.

`forward(batch)` runs each part of the batch under its own grad mode (the TRAIN part with autograd,
the other part without), the parts side by side through the layers, so that each linear's base GEMM
runs once for both (`merge_parts`); it returns the final hidden states of all rows, and
`logits(hidden)` projects only the rows the caller needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from loramux.config import LORA_TARGETS, ModelConfig
from loramux.batch import Batch, BatchPart
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.generations import AdapterGenerations
from loramux.lora.layer import FusedLoraLinear, LoraProjection, MultiLoraLinear
from loramux.lora.prepacked import FrozenLinear
from loramux.model.recompute import recomputed
from loramux.model.rope import apply_rotary, inverse_frequencies, rotary_tables
from loramux.native import paged_attention, rms_norm, rotary
from loramux.native.paged_attention import paged_attention_native
from loramux.native.rms_norm import rms_norm_native
from loramux.native.rotary import rotary_native


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, size]. Without autograd, one native pass where it runs (native/rms_norm)."""
        if not torch.is_grad_enabled() and rms_norm.accepts(x, self.weight):
            return rms_norm_native(x, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """As transformers': normalized in float32, rounded to x's dtype, then times the weight."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.to(torch.float32), self.weight.shape, eps=self.eps).to(x.dtype)


class StepContext:
    """Per-part values every layer needs, computed once per forward: the part, the KV cache, rotary
    tables, the adapters' generations."""

    def __init__(self, part: BatchPart, kv: PagedKVCache | None, cos: torch.Tensor, sin: torch.Tensor,
                 generations: AdapterGenerations) -> None:
        self.part, self.kv, self.cos, self.sin, self.generations = part, kv, cos, sin, generations

    @functools.cached_property
    def decodes_in_place(self) -> bool:
        """Whether the native kernel can read this part's decode rows' context in place: decided
        once, on the first layer that asks, for every layer of the step (the layers differ only in
        their queries, `paged_attention.takes_queries`)."""
        plan = self.part.attention
        return paged_attention.reads_in_place(self.kv, plan.decode_slots, plan.decode_mask)

    @functools.cached_property
    def rotates_in_place(self) -> bool:
        """Whether the native kernel can rotate this part's q and k heads (and write its K and V):
        decided once for every layer of the step, as `decodes_in_place` (the layers differ only
        in their rows, `rotary.takes_rows`)."""
        return rotary.takes_tables(self.cos, self.sin, self.kv)


Parts = Sequence[StepContext]  # one per part of the step, in the batch's order (graph-building first)


def each(ctxs: Parts, fn: Callable[..., torch.Tensor], *per_part: Sequence) -> list:
    """[fn(ctx, *items) for each part], each call under its part's grad mode (whatever the caller's)."""
    if len(ctxs) == 1 and ctxs[0].part.builds_graph == torch.is_grad_enabled():  # one part, in its mode already
        return [fn(ctxs[0], *(items[0] for items in per_part))]
    out = []
    for ctx, *items in zip(ctxs, *per_part):
        with torch.set_grad_enabled(ctx.part.builds_graph):
            out.append(fn(ctx, *items))
    return out


# A graph-building part merges its base GEMMs with the other part's only with at least this many
# rows. fp32 GEMMs (MKL, torch 2.13) compute each row the same whatever the row count only from 12
# rows on (with 9 to 11 a row's result depends on how many rows follow it), so a trained adapter's
# weights stay bitwise the same whether requests share its steps or not (tests/test_training.py);
# 16 leaves a margin for other CPUs' kernels.
MERGE_MIN_GRAPH_ROWS = 16


def linear(layer: FusedLoraLinear, xs: Sequence[torch.Tensor], ctxs: Parts, merge: bool) -> list[torch.Tensor]:
    """Each part's layer(x); with `merge` (decided once per step, `LlamaModel.forward`), the base
    GEMM runs once over all parts' rows (FusedLoraLinear.base_parts), each part's adapters on its own."""
    bases = layer.base_parts(xs, [c.part.builds_graph for c in ctxs]) if merge else [None] * len(xs)
    return each(ctxs, lambda ctx, x, base: layer(x, ctx.part.lora, ctx.part.builds_graph, ctx.generations, base), xs, bases)


def recomputed_parts(ctxs: Parts, tensors: Sequence[torch.Tensor],
                     recomputes: Sequence[Callable[[], torch.Tensor] | None]) -> AbstractContextManager:
    """`recomputed(tensor, recompute)` (model/recompute.py) for each graph-building part's tensor,
    entered in turn, so each part's hooks pass the other's tensors on to the hooks around them."""
    if not any(ctx.part.builds_graph for ctx in ctxs):
        return nullcontext()
    return _recomputed_parts(ctxs, tensors, recomputes)


@contextmanager
def _recomputed_parts(ctxs: Parts, tensors: Sequence[torch.Tensor],
                      recomputes: Sequence[Callable[[], torch.Tensor] | None]) -> Iterator[None]:
    with ExitStack() as stack:
        for ctx, tensor, recompute in zip(ctxs, tensors, recomputes):
            if ctx.part.builds_graph and recompute is not None:
                with torch.enable_grad():
                    stack.enter_context(recomputed(tensor, recompute))
        yield


def keep_hf_names(parent: nn.Module, fused: str) -> None:
    """`parent.<fused>` is a FusedLoraLinear; its state dict entries are those of its projections
    under their own names (`q_proj.weight`, `k_proj.weight`, ...), as in a Hugging Face checkpoint.
    Loading concatenates them into the fused weight; `state_dict()` splits it back (as views)."""
    layer: FusedLoraLinear = getattr(parent, fused)
    names = list(layer.projections)
    params = ("weight",) + (("bias",) if layer.bias is not None else ())

    def load(module, state_dict, prefix, *args) -> None:
        for param in params:
            keys = [f"{prefix}{name}.{param}" for name in names]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused}.{param}"] = torch.cat([state_dict.pop(k) for k in keys])

    def save(module, state_dict, prefix, local_metadata) -> None:
        for param in params:
            whole = state_dict.pop(f"{prefix}{fused}.{param}")
            for name, part in zip(names, whole.split(layer.sizes)):
                state_dict[f"{prefix}{name}.{param}"] = part

    parent.register_load_state_dict_pre_hook(load)
    parent.register_state_dict_post_hook(save)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, q, kv = config.hidden_size, config.q_size, config.kv_size
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj = FusedLoraLinear(h, (("q_proj", q), ("k_proj", kv), ("v_proj", kv)), config.qkv_bias, layer_idx)
        self.o_proj = MultiLoraLinear(q, h, config.o_bias, "o_proj", layer_idx)
        keep_hf_names(self, "qkv_proj")

    def forward(self, xs: Sequence[torch.Tensor], ctxs: Parts, merge: bool) -> list[torch.Tensor]:
        qkvs = linear(self.qkv_proj, xs, ctxs, merge)
        attended = each(ctxs, self._attend, qkvs)
        outs = [out for out, _ in attended]
        # the pieces are kept for attention's backward anyway: o_proj's adapters get their copy again
        with recomputed_parts(ctxs, outs, [gathered for _, gathered in attended]):
            return linear(self.o_proj, outs, ctxs, merge)

    def _attend(self, ctx: StepContext, qkv: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """One part's attention: qkv [T, q + 2 kv] -> (o_proj's input [T, q], a function that makes
        it again from what attention's backward keeps, or None for a pure decode part)."""
        T, H, KV = qkv.shape[0], self.num_heads, self.num_kv_heads
        qkv = qkv.view(T, H + 2 * KV, self.head_dim)  # heads of q, then k, then v
        plan = ctx.part.attention
        if not torch.is_grad_enabled() and ctx.rotates_in_place and rotary.takes_rows(qkv, ctx.cos):
            # one native call: q and k heads rotated in place, K and V written if every row writes
            rotary_native(qkv, H, ctx.cos, ctx.sin, ctx.kv, self.layer_idx, plan.write_slots if plan.writes_all_rows else None)
            q, k, v = qkv[:, :H], qkv[:, H : H + KV], qkv[:, H + KV :]
        else:
            qk = apply_rotary(qkv[:, : H + KV], ctx.cos, ctx.sin)  # q and k heads rotated in one go
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
            if plan.writes_all_rows:
                ctx.kv.write(self.layer_idx, plan.write_slots, k, v)
        if not plan.writes_all_rows and plan.write_rows.numel():
            ctx.kv.write(self.layer_idx, plan.write_slots, k[plan.write_rows], v[plan.write_rows])
        if plan.decodes_all_rows:  # a pure decode part: no scatter into a separate output
            return self._decode(q, ctx).reshape(T, -1), None
        pieces = []  # (rows, their attention output [rows, heads, D])
        if plan.decode_rows.numel():
            pieces.append((plan.decode_rows, self._decode(q[plan.decode_rows], ctx)))
        for span in plan.spans:
            rows = slice(span.start, span.end)
            if span.context_slots is None:
                ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                ks, vs = (t.transpose(0, 1) for t in ctx.kv.gather(self.layer_idx, span.context_slots))
            pieces.append((rows, _causal_attention(q[rows].transpose(0, 1), ks, vs, span.start_pos).transpose(0, 1)))

        def gathered() -> torch.Tensor:
            out = q.new_empty(T, self.num_heads, self.head_dim)
            for rows, piece in pieces:
                out[rows] = piece
            return out.reshape(T, -1)

        return gathered(), gathered

    def _decode(self, q: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """q [B, heads, D] of the decode rows -> [B, heads, D], each over its sequence's cached
        context: read in place from the pool where the native kernel runs (native/paged_attention;
        decode rows build no graph), else gathered [B, kv_heads, C, D], padded to the longest and
        masked, for one SDPA call (the reference)."""
        plan = ctx.part.attention
        if not torch.is_grad_enabled() and ctx.decodes_in_place and paged_attention.takes_queries(q, ctx.kv, plan.decode_slots):
            return paged_attention_native(q, ctx.kv, self.layer_idx, plan.decode_slots, plan.decode_mask)
        keys, values = ctx.kv.gather(self.layer_idx, plan.decode_slots)  # [B, C, kv_heads, D]
        attended = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=plan.decode_mask, enable_gqa=True
        )
        return attended.squeeze(2)


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
        self.gate_up_proj = FusedLoraLinear(h, (("gate_proj", i), ("up_proj", i)), b, layer_idx)
        self.down_proj = MultiLoraLinear(i, h, b, "down_proj", layer_idx)
        keep_hf_names(self, "gate_up_proj")

    def forward(self, xs: Sequence[torch.Tensor], ctxs: Parts, merge: bool) -> list[torch.Tensor]:
        gate_ups = each(ctxs, lambda ctx, y: self.gate_up_proj.split(y), linear(self.gate_up_proj, xs, ctxs, merge))
        hidden = each(ctxs, lambda ctx, gu: SiluAndMul.apply(*gu) if torch.is_grad_enabled() else F.silu(gu[0]) * gu[1], gate_ups)
        # gate and up are kept for SiluAndMul
        with recomputed_parts(ctxs, hidden, [lambda gate=gate, up=up: F.silu(gate) * up for gate, up in gate_ups]):
            return linear(self.down_proj, hidden, ctxs, merge)


class SiluAndMul(torch.autograd.Function):
    """silu(gate) * up that saves only gate and up for backward and recomputes silu there; autograd
    through F.silu and * would also keep silu(gate), one more [rows, intermediate] per layer."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
        return grad * up * (sig + silu * (1 - sig)), grad * silu


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx)

    def forward(self, xs: Sequence[torch.Tensor], ctxs: Parts, merge: bool) -> list[torch.Tensor]:
        attended = _after_norm(self.input_layernorm, xs, ctxs, lambda normed: self.self_attn(normed, ctxs, merge))
        xs = each(ctxs, lambda ctx, x, a: x + a, xs, attended)
        mlp = _after_norm(self.post_attention_layernorm, xs, ctxs, lambda normed: self.mlp(normed, ctxs, merge))
        return each(ctxs, lambda ctx, x, m: x + m, xs, mlp)


def _after_norm(norm: RMSNorm, xs: Sequence[torch.Tensor], ctxs: Parts,
                block: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """block([norm(x) of each part]); backward makes norm(x) again from x (which the norm's backward
    keeps anyway) instead of keeping it for the adapters' gradients."""
    normed = each(ctxs, lambda ctx, x: norm(x), xs)
    # backward runs without autograd: `reference` keeps it on the path the forward took
    with recomputed_parts(ctxs, normed, [lambda x=x: norm.reference(x) for x in xs]):
        return block(normed)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """The frozen base model. `adapter_generations` says which adapter weights changed since the
    linears cached copies of them; the adapter registry is its only writer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(config.rope, config.head_dim), persistent=False)
        self.requires_grad_(False)
        self.adapter_generations = AdapterGenerations()
        self._lm_head = FrozenLinear()
        # a step's parts share each base GEMM (FusedLoraLinear.base_parts); off: one GEMM per part
        self.merge_parts = True

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def linear(self, layer_idx: int, name: str) -> LoraProjection:
        """The projection `name` (PEFT's module name, e.g. "q_proj") of decoder layer `layer_idx`,
        where the registry installs an adapter's weights for it."""
        layer = self.model.layers[layer_idx]
        for fused in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if name in fused.projections:
                return fused.projections[name]
        raise KeyError(f"no linear named {name!r}; linears: {', '.join(LORA_TARGETS)}")

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns the final-normed hidden states [num_rows, hidden] of all rows of the batch. Each
        part runs under its own grad mode, whatever the caller's (not inference_mode, though)."""
        ctxs = [StepContext(part, batch.kv, *rotary_tables(part.positions, self.inv_freq, self.dtype), self.adapter_generations)
                for part in batch.parts]
        merge = self.merge_parts and len(batch.parts) > 1 and all(
            p.num_rows >= MERGE_MIN_GRAPH_ROWS for p in batch.parts if p.builds_graph)
        xs = each(ctxs, lambda ctx: self.model.embed_tokens(ctx.part.input_ids))
        for layer in self.model.layers:
            xs = layer(xs, ctxs, merge)
        hidden = each(ctxs, lambda ctx, x: self.model.norm(x), xs)
        with torch.set_grad_enabled(any(p.builds_graph for p in batch.parts)):
            return hidden[0] if len(hidden) == 1 else torch.cat(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self._lm_head(hidden, weight).float()

    def prepack_weights(self, enabled: bool) -> None:
        """Whether rows that build no graph use pre-packed copies of the frozen bf16 weights on CPU
        (lora/prepacked.py: faster GEMMs for a second copy of the weights)."""
        for frozen in [self._lm_head] + [m.base for m in self.modules() if isinstance(m, FusedLoraLinear)]:
            frozen.enabled = enabled
            if not enabled:
                frozen.release()
