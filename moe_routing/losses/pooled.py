"""Hugging Face's load-balancing loss: one Switch-style loss pooled over every MoE layer of a forward.

Hugging Face's MoE models (Mixtral, Qwen2/3-MoE, OLMoE, ...) add ``router_aux_loss_coef *
load_balancing_loss_func(router_logits, E, k, attention_mask)`` to the language-model loss, where
``router_logits`` holds every MoE layer's [T, E] gate logits (``output_router_logits=True``). The function
(transformers, ``models/mixtral/modeling_mixtral.py::load_balancing_loss_func``) pools the layers before
forming the loss: with the rows of all L layers stacked (L*T rows, padding weighted 0),

    f_i = (top-k assignments to expert i) / (non-padding rows)      P_i = mean over rows of softmax(logits)_i
    loss = E * sum_i f_i * P_i

f is not divided by k (it sums to k), and the expert choice is the top-k of ``softmax(logits)`` whatever the
router actually chose. For one layer this is ``k`` times our `switch_aux_loss` with ``count="topk"``; for several
layers it is not the sum of per-layer losses (pooled f and P mix layers). `hf_load_balancing_loss` computes
it from the logits `moe_routing.record_router_logits` collects, so an HF recipe's coefficient keeps its meaning:
build the layers with ``losses=[]`` and add ``router_aux_loss_coef * hf_load_balancing_loss(...)`` to the loss.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..validation import check_int


def hf_load_balancing_loss(logits_LTE: Sequence[Tensor], top_k: int,
                           attention_mask: Optional[Tensor] = None) -> Tensor:
    """Hugging Face's ``load_balancing_loss_func`` over the layers' router logits (a 0-d tensor in the graph).

    Args:
        logits_LTE: one [T, E] logits tensor per MoE layer call, e.g. from `record_router_logits`; all with the
            same T and E.
        top_k: k, experts per token (HF's ``num_experts_per_tok``).
        attention_mask: [B, S] or [T] with 1 (or True) at real tokens and 0 at padding, as HF's models take
            it (the opposite sense of ``RoutingContext.padding_mask``); None counts every row.

    Computed in float32 or the logits' wider dtype (HF computes in float32).
    """
    logits_LTE = list(logits_LTE)
    if not logits_LTE or not all(isinstance(t, Tensor) and t.dim() == 2 for t in logits_LTE):
        raise ValueError("logits_LTE must be a non-empty sequence of [T, E] tensors (one per MoE layer call)")
    T, E = logits_LTE[0].shape
    if any(t.shape != (T, E) for t in logits_LTE):
        raise ValueError(f"every layer's logits must have the same shape [T, E]; got "
                         f"{sorted({tuple(t.shape) for t in logits_LTE})}")
    check_int("top_k", top_k, 1, E)
    device = logits_LTE[0].device
    dtype = torch.promote_types(logits_LTE[0].dtype, torch.float32)
    if attention_mask is not None:
        if attention_mask.numel() != T:
            raise ValueError(f"attention_mask has {attention_mask.numel()} elements but each layer's logits have "
                             f"T={T} rows")
        w_T = attention_mask.reshape(-1).to(device=device, dtype=dtype)
    else:
        w_T = torch.ones(T, dtype=dtype, device=device)
    counts_E = torch.zeros(E, dtype=dtype, device=device)
    probs_E = torch.zeros(E, dtype=dtype, device=device)
    for logits_TE in logits_LTE:
        p_TE = logits_TE.to(device=device, dtype=dtype).softmax(-1)
        experts_N = p_TE.detach().topk(top_k, dim=-1).indices.reshape(-1)
        # index_add_, not a histogram or bincount: no output sized from data (no host sync)
        counts_E = counts_E.index_add(0, experts_N, w_T.repeat_interleave(top_k))
        probs_E = probs_E + (p_TE * w_T[:, None]).sum(0)
    rows = (w_T.sum() * len(logits_LTE)).clamp_min(1)  # all padding: 0, where HF divides 0 by 0
    return E * ((counts_E / rows) * (probs_E / rows)).sum()
