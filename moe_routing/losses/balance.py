"""Load-balance losses: switch aux, sequence aux (DeepSeek-V3), global-batch aux, router z-loss.

Each formula is a pure function of a `RoutingDecision` plus masks; the loss classes hold a coefficient and are
what `MoELayer(losses=[...])` takes. Counts come from ``index_add_`` over routed pairs (padding pairs weighted 0),
never from a one-hot, a ``bincount`` or a boolean index: those size their output from the data, which syncs
the host on accelerators and breaks ``torch.compile`` graphs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..decision import RoutingDecision
from .base import Loss, LossInputs


COUNTS = ("topk", "chosen")


def _check_count(count: str) -> str:
    if count not in COUNTS:
        raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
    return count


def _pair_counts(decision: RoutingDecision, valid_T: Optional[Tensor], dtype: torch.dtype,
                 count: str = "topk") -> Tensor:
    """[E] counted pairs per expert over non-padding tokens, in ``dtype`` (see `RoutingDecision.balance_pairs`)."""
    token_N, expert_N = decision.balance_pairs(chosen=count == "chosen")
    w_N = (torch.ones_like(expert_N, dtype=dtype) if valid_T is None
           else valid_T.to(dtype).index_select(0, token_N))
    return torch.zeros(decision.num_experts, dtype=dtype, device=expert_N.device).index_add_(0, expert_N, w_N)


def switch_aux_loss(decision: RoutingDecision, top_k: int, valid_T: Optional[Tensor] = None,
                    group: Optional[Any] = None, global_batch: bool = False, count: str = "topk") -> Tensor:
    """``E * sum_i f_i * P_i`` with ``f_i = count_i / (T*k)`` and ``P_i = mean_t p_{t,i}`` (1.0 when balanced).

    ``count="topk"`` (default) counts the top-k of the unbiased scores when the router's choice is biased or
    group-limited (DeepSeek-V3 eq. 18, Megatron-Core); ``"chosen"`` counts the experts actually routed to.
    With ``global_batch`` and an initialised process group, counts and T are summed over ``group`` (data
    parallel) before forming f; P stays local so gradients stay local.
    """
    E = decision.num_experts
    p_TE = decision.probs_TE
    counts_E = _pair_counts(decision, valid_T, p_TE.dtype, _check_count(count))
    if valid_T is None:
        num_tokens = torch.tensor(float(p_TE.shape[0]), dtype=p_TE.dtype, device=p_TE.device)
        # sum / T rather than mean: the same values, but the backward hands softmax a broadcast view of the [E]
        # gradient instead of materialising a [T, E] one
        P_E = p_TE.sum(0) / p_TE.shape[0]
    else:
        w_T = valid_T.to(p_TE.dtype)
        num_tokens = w_T.sum()
        P_E = (p_TE * w_T[:, None]).sum(0) / num_tokens.clamp_min(1)
    if global_batch and dist.is_available() and dist.is_initialized():
        stats = torch.cat([counts_E, num_tokens.reshape(1)])
        dist.all_reduce(stats, group=group)
        counts_E, num_tokens = stats[:E], stats[E]
    f_E = counts_E / (num_tokens * top_k).clamp_min(1)
    return E * (f_E * P_E).sum()


def sequence_aux_loss(decision: RoutingDecision, top_k: int, seq_T: Optional[Tensor], num_seqs: int,
                      valid_T: Optional[Tensor] = None, count: str = "topk") -> Tensor:
    """Switch aux per sequence on per-token-normalised scores, averaged over sequences (DeepSeek-V3 eqs. 17-20;
    ``count`` as in `switch_aux_loss`)."""
    if seq_T is None:
        return switch_aux_loss(decision, top_k, valid_T, count=count)
    E = decision.num_experts
    p_TE = decision.scores_TE / decision.scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    w_T = torch.ones_like(p_TE[:, 0]) if valid_T is None else valid_T.to(p_TE.dtype)
    token_N, expert_N = decision.balance_pairs(chosen=_check_count(count) == "chosen")
    pair_w = w_T[token_N]
    seq_N = seq_T[token_N]
    counts_SE = torch.zeros(num_seqs * E, dtype=p_TE.dtype, device=p_TE.device)
    counts_SE.index_add_(0, seq_N * E + expert_N, pair_w)
    counts_SE = counts_SE.view(num_seqs, E)
    tokens_S = torch.zeros(num_seqs, dtype=p_TE.dtype, device=p_TE.device).index_add_(0, seq_T, w_T)
    P_SE = torch.zeros(num_seqs, E, dtype=p_TE.dtype, device=p_TE.device).index_add_(0, seq_T, p_TE * w_T[:, None])
    denom_S = tokens_S.clamp_min(1)
    f_SE = counts_SE / (denom_S[:, None] * top_k)
    per_seq = E * (f_SE * (P_SE / denom_S[:, None])).sum(-1)
    present = (tokens_S > 0).to(p_TE.dtype)
    return (per_seq * present).sum() / present.sum().clamp_min(1)


def z_loss(decision: RoutingDecision, valid_T: Optional[Tensor] = None) -> Tensor:
    """``mean_t (logsumexp_j logits_{t,j})^2`` over non-padding tokens (ST-MoE router z-loss)."""
    z_T = torch.logsumexp(decision.logits_TE, dim=-1).square()
    if valid_T is None:
        return z_T.mean()
    w_T = valid_T.to(z_T.dtype)
    return (z_T * w_T).sum() / w_T.sum().clamp_min(1)


class SwitchAuxLoss(Loss):
    """Switch-Transformer auxiliary balance loss over the micro-batch. ``count``: "topk" (default: the top-k of the
    unbiased scores when the choice is biased or group-limited) or "chosen" (see `switch_aux_loss`)."""

    name = "switch_aux"

    def __init__(self, coeff: float = 1e-2, count: str = "topk") -> None:
        super().__init__(coeff)
        self.count = _check_count(count)

    def compute(self, inputs: LossInputs) -> Tensor:
        return switch_aux_loss(inputs.decision, inputs.top_k, inputs.valid_T, count=self.count)


class GlobalBatchAuxLoss(Loss):
    """Switch aux with expert counts summed over the data-parallel group (``group``; default world)."""

    name = "global_aux"

    def __init__(self, coeff: float = 1e-2, group: Optional[Any] = None, count: str = "topk") -> None:
        super().__init__(coeff)
        self.group = group
        self.count = _check_count(count)

    def compute(self, inputs: LossInputs) -> Tensor:
        return switch_aux_loss(inputs.decision, inputs.top_k, inputs.valid_T, group=self.group, global_batch=True,
                               count=self.count)


class SequenceAuxLoss(Loss):
    """DeepSeek-V3 sequence-wise balance loss (default coefficient 1e-4, the paper's alpha; ``count`` as in
    `SwitchAuxLoss`)."""

    name = "seq_aux"

    def __init__(self, coeff: float = 1e-4, count: str = "topk") -> None:
        super().__init__(coeff)
        self.count = _check_count(count)

    def compute(self, inputs: LossInputs) -> Tensor:
        return sequence_aux_loss(inputs.decision, inputs.top_k, inputs.seq_T, inputs.num_seqs, inputs.valid_T,
                                 count=self.count)


class ZLoss(Loss):
    """Router z-loss (ST-MoE); 1e-3 is the usual coefficient."""

    name = "z_loss"

    def __init__(self, coeff: float = 1e-3) -> None:
        super().__init__(coeff)

    def compute(self, inputs: LossInputs) -> Tensor:
        return z_loss(inputs.decision, inputs.valid_T)
