"""Read-ME's pre-gating router (Cai et al., "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts
with System Co-Design", NeurIPS 2024, arXiv 2410.19123; code: VITA-Group/READ-ME,
``src/transformers/models/llama/modeling_llama.py``, ``cluster_predictor_class``).

Read-ME decouples routing from the model: a small causal transformer over the token ids (its embedding copied
from the model's) predicts each token's expert once, before the model runs, and every MoE layer uses that
choice. The whole batch's routing is then known ahead of the blocks, so expert loading and batching can be
scheduled early (the paper's pre-fetching and lookahead scheduling).

Here the split keeps the library's rules: `PreGatingRouter` computes the plan (``plan(ids, ctx)`` writes it into
the `RoutingContext`), and the `PreGatedRouter` inside each `MoELayer` only reads it back as its
`RoutingDecision`; dispatch stays in the layer. Deviations: the reference's attention has RoPE; ours relies
on the causal mask alone (no position signal beyond order), and it allows top-k with gates = softmax over the
k chosen logits (at k = 1, Read-ME's unweighted single expert, gate 1). Read-ME trains the pre-gate to
imitate per-token oracle choices (`PreGatingRouter.distillation_loss`); it is not trained here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..control import moe_layers, routing_context
from ..decision import RoutingContext, RoutingDecision
from ..routers.base import Router, forced_experts_TK, softmax_over_chosen
from ..validation import check_int

#: the key of the pre-computed plan in ``RoutingContext.layer_state``
PLAN_KEY = "pregate_plan"


class _Block(nn.Module):
    """Pre-norm causal self-attention + MLP, both residual (the reference's predictor block)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h_BSD: Tensor) -> Tensor:
        B, S, D = h_BSD.shape
        q, k, v = (t.view(B, S, self.num_heads, -1).transpose(1, 2)
                   for t in self.qkv(self.attn_norm(h_BSD)).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        h_BSD = h_BSD + self.out(o)
        return h_BSD + self.fc2(F.silu(self.fc1(self.mlp_norm(h_BSD))))


class PreGatingRouter(nn.Module):
    """Token ids [B, S] -> expert logits [B, S, E], causal (token t sees tokens <= t), ahead of the model.

    Args:
        vocab_size: V.  num_experts: E.  top_k: experts per token.
        dim: width (default: the embedding's, else 128).  num_layers, num_heads: the predictor's depth and heads
            (2 and 2 as in the reference).
        embedding: an [V, D'] embedding to start from (the model's; its first ``dim`` columns are copied).
    """

    def __init__(self, vocab_size: int, num_experts: int, top_k: int = 1, *, dim: Optional[int] = None,
                 num_layers: int = 2, num_heads: int = 2, embedding: Optional[nn.Embedding] = None,
                 device=None) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 1)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.top_k = check_int("top_k", top_k, 1, num_experts)
        check_int("num_layers", num_layers, 0)
        check_int("num_heads", num_heads, 1)
        if dim is None:
            dim = embedding.embedding_dim if embedding is not None else 128
        check_int("dim", dim, 1)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.embed = nn.Embedding(vocab_size, dim, device=device)
        if embedding is not None:
            if embedding.num_embeddings != vocab_size or embedding.embedding_dim < dim:
                raise ValueError(f"embedding is [{embedding.num_embeddings}, {embedding.embedding_dim}]; need "
                                 f"[{vocab_size}, >= {dim}]")
            with torch.no_grad():
                self.embed.weight.copy_(embedding.weight[:, :dim].float())
        self.blocks = nn.ModuleList(_Block(dim, num_heads) for _ in range(num_layers)).to(device)
        self.norm = nn.RMSNorm(dim, eps=1e-6, device=device)
        self.proj = nn.Linear(dim, num_experts, device=device)

    def forward(self, ids_BS: Tensor) -> Tensor:
        if not isinstance(ids_BS, Tensor) or ids_BS.is_floating_point() or ids_BS.dim() != 2:
            raise TypeError(f"ids must be an integer tensor [B, S], got {getattr(ids_BS, 'shape', type(ids_BS))}")
        h = self.embed(ids_BS)
        for block in self.blocks:
            h = block(h)
        return self.proj(self.norm(h)).float()

    def plan(self, ids_BS: Tensor, ctx: RoutingContext) -> Tensor:
        """Route every token once and store the plan in ``ctx`` for all `PreGatedRouter` layers; returns the
        logits [B, S, E] (for a distillation or balance loss)."""
        if not isinstance(ctx, RoutingContext):
            raise TypeError(f"ctx must be a RoutingContext, got {type(ctx).__name__}")
        logits_TE = self(ids_BS).reshape(-1, self.num_experts)
        experts_TK = logits_TE.detach().topk(self.top_k, dim=-1).indices
        ctx.layer_state[PLAN_KEY] = (experts_TK, logits_TE)
        return logits_TE.view(*ids_BS.shape, self.num_experts)

    def run(self, model: nn.Module, ids_BS: Tensor, *args, **kwargs):
        """``model(ids_BS, *args, **kwargs)`` with its routing planned here first."""
        with routing_context(model) as ctx:
            self.plan(ids_BS, ctx)
            return model(ids_BS, *args, **kwargs)

    @staticmethod
    def distillation_loss(logits_BSE: Tensor, target_experts: Tensor) -> Tensor:
        """Read-ME's objective for the pre-gate: cross-entropy to each token's target expert (int [B, S] or
        [T]: e.g. a trained per-layer router's top-1 choice)."""
        return F.cross_entropy(logits_BSE.reshape(-1, logits_BSE.shape[-1]), target_experts.reshape(-1).long())


class PreGatedRouter(Router):
    """The router of a pre-gated layer: reads the choice `PreGatingRouter.plan` stored in the context.

    Gates: softmax over the k chosen logits (1 at k = 1). Routing replay (``ctx.forced_experts``) overrides the
    plan for its layer. Without a plan in the context it raises, naming what to call.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__(hidden_size, num_experts, top_k)

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object,
              backend: str = "torch") -> RoutingDecision:
        plan = None if ctx is None else ctx.layer_state.get(PLAN_KEY)
        if plan is None:
            raise RuntimeError("a pre-gated MoE layer found no routing plan: run the model as "
                               "pregate_router.run(model, ids), or inside `with mr.routing_context(model) as ctx:` "
                               "after pregate_router.plan(ids, ctx)")
        experts_TK, logits_TE = plan
        T = x_TD.shape[0]
        if logits_TE.shape != (T, self.num_experts) or experts_TK.shape[1] != self.top_k:
            raise ValueError(f"the routing plan is for {logits_TE.shape[0]} tokens, {logits_TE.shape[1]} experts, "
                             f"k={experts_TK.shape[1]}; this layer has {T} tokens, E={self.num_experts}, "
                             f"k={self.top_k}")
        forced = forced_experts_TK(ctx, layer_key, T, self.top_k, self.num_experts, x_TD.device)
        experts_TK = (experts_TK if forced is None else forced).to(x_TD.device)
        logits_TE = logits_TE.to(device=x_TD.device, dtype=self.math_dtype)
        return RoutingDecision.from_topk(experts_TK, softmax_over_chosen(experts_TK, logits_TE), logits_TE,
                                         logits_TE.softmax(-1))


def pregate(model: nn.Module, vocab_size: Optional[int] = None, top_k: Optional[int] = None, *,
            embedding: Optional[nn.Embedding] = None, **router_kwargs) -> PreGatingRouter:
    """Make every `MoELayer` of ``model`` pre-gated: one `PreGatingRouter` (returned) decides for all of them.

    Each layer's router is replaced by a `PreGatedRouter` (its learned gate, if any, is dropped: Read-ME's
    layers share one decision). The layers must share E (and k, unless ``top_k`` is given). ``embedding``
    (default: ``model.get_input_embeddings()`` or ``model.embed``) seeds the pre-gate's embedding and gives
    ``vocab_size``. ``router_kwargs`` go to `PreGatingRouter` (``dim``, ``num_layers``, ``num_heads``). Run the
    model with ``pre.run(model, ids)``.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ValueError("model has no MoELayer to pre-gate (convert its FFNs first: upcycle / carve)")
    Es = {layer.num_experts for layer in layers}
    ks = {layer.top_k for layer in layers}
    if len(Es) != 1:
        raise ValueError(f"pre-gated layers share one decision, so they need one expert count; got {sorted(Es)}")
    if top_k is None:
        if len(ks) != 1:
            raise ValueError(f"the layers use different top_k {sorted(ks)}; pass top_k")
        top_k = ks.pop()
    E = Es.pop()
    if embedding is None:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else getattr(model, "embed", None)
    if vocab_size is None:
        if not isinstance(embedding, nn.Embedding):
            raise ValueError("pass vocab_size (or embedding=): the model exposes no input embedding")
        vocab_size = embedding.num_embeddings
    device = layers[0].experts.w_up.device
    pre = PreGatingRouter(vocab_size, E, top_k, embedding=embedding if isinstance(embedding, nn.Embedding) else None,
                          device=device, **router_kwargs)
    for layer in layers:
        layer.router = PreGatedRouter(layer.hidden_size, E, top_k)
        layer.top_k = top_k
    return pre
