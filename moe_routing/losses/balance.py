"""Load-balance losses: switch aux, sequence aux (DeepSeek-V3), global-batch aux, router z-loss.

Each formula is a pure function of a `RoutingDecision` plus masks; the loss classes hold a coefficient and are
what `MoELayer(losses=[...])` takes. Counts come from ``index_add_`` over routed pairs (padding pairs weighted 0),
never from a one-hot, a ``bincount`` or a boolean index: those size their output from the data, which syncs
the host on accelerators and breaks ``torch.compile`` graphs.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..decision import RoutingDecision
from ..validation import check_bool
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


def _mean_probs(p_TE: Tensor, valid_T: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(P_E, num_tokens)``: mean routing probability per expert over non-padding tokens, and their count."""
    if valid_T is None:
        # sum / T rather than mean: the same values, but the backward hands softmax a broadcast view of the [E]
        # gradient instead of materialising a [T, E] one
        # max(T, 1): an expert-parallel rank with no tokens still runs its layers (0, not 0/0)
        num_tokens = torch.tensor(float(p_TE.shape[0]), dtype=p_TE.dtype, device=p_TE.device)
        return p_TE.sum(0) / max(p_TE.shape[0], 1), num_tokens
    w_T = valid_T.to(p_TE.dtype)
    num_tokens = w_T.sum()
    return (p_TE * w_T[:, None]).sum(0) / num_tokens.clamp_min(1), num_tokens


def _all_reduce_counts(counts_E: Tensor, num_tokens: Tensor, group: Optional[Any]) -> tuple[Tensor, Tensor]:
    """Counts and token count summed over ``group`` (one all-reduce) when a process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts_E, num_tokens
    stats = torch.cat([counts_E, num_tokens.reshape(1)])
    dist.all_reduce(stats, group=group)
    return stats[:-1], stats[-1]


def switch_aux_loss(decision: RoutingDecision, top_k: int, valid_T: Optional[Tensor] = None,
                    group: Optional[Any] = None, global_batch: bool = False, count: str = "topk") -> Tensor:
    """``E * sum_i f_i * P_i`` with ``f_i = count_i / (T*k)`` and ``P_i = mean_t p_{t,i}`` (1.0 when balanced).

    ``count="topk"`` (default) counts the top-k of the unbiased scores when the router's choice is biased or
    group-limited (DeepSeek-V3 eq. 18, Megatron-Core); ``"chosen"`` counts the experts actually routed to.
    With ``global_batch`` and an initialised process group, counts and T are summed over ``group`` (data
    parallel) before forming f; P stays local so gradients stay local.
    """
    p_TE = decision.probs_TE
    counts_E = _pair_counts(decision, valid_T, p_TE.dtype, _check_count(count))
    P_E, num_tokens = _mean_probs(p_TE, valid_T)
    if global_batch:
        counts_E, num_tokens = _all_reduce_counts(counts_E, num_tokens, group)
    f_E = counts_E / (num_tokens * top_k).clamp_min(1)
    return decision.num_experts * (f_E * P_E).sum()


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


def _counting_forward(training: bool) -> bool:
    """Whether a forward adds to running counts: a training forward with grad enabled, and not the recomputation
    an activation checkpoint runs inside backward (that forward was already counted)."""
    return training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


class GlobalBatchAuxLoss(Loss):
    """Switch aux whose expert counts f are those of the global batch: summed over the data-parallel ``group``
    (default: the world) and, with ``accumulate`` (the default), over every micro-batch since the last optimizer
    step, as Megatron-Core's ``global_aux_loss`` does (`TopKRouter._apply_global_aux_loss` in
    megatron/core/transformer/moe/router.py; arXiv:2501.11873). P stays this micro-batch's local mean, so the
    gradient stays local.

    With ``accumulate`` each layer keeps the running counts (``LossInputs.state``, int64 [E + 2]: pair counts per
    expert, tokens, micro-batches) and `moe_routing.step` / `moe_routing.attach` zero them after each optimizer
    step (Megatron zeroes them in ``finalize_model_grads``); without a step they never restart. A training
    forward adds its (data-parallel summed) counts, then uses the running totals: micro-batch m of a step sees
    the counts of micro-batches 1..m. Evaluation and no-grad forwards use their own counts and add nothing;
    an activation-checkpoint recompute reuses the totals its forward saw. f is ``running counts / (k * running
    tokens)``; Megatron divides the mean count per micro-batch by the current micro-batch's token count, which
    is the same number whenever the micro-batches hold equal numbers of non-padding tokens.
    ``accumulate=False``: the counts of the current micro-batch only (summed over ``group``).
    ``count`` as in `SwitchAuxLoss`.
    """

    name = "global_aux"

    def __init__(self, coeff: float = 1e-2, group: Optional[Any] = None, count: str = "topk",
                 accumulate: bool = True) -> None:
        super().__init__(coeff)
        self.group = group
        self.count = _check_count(count)
        self.accumulate = check_bool("accumulate", accumulate)

    def init_state(self, num_experts: int, device: Optional[torch.device] = None) -> Optional[Tensor]:
        # int64: exact whole counts past float32's 2**24, and untouched by a cast of the model to bf16
        return torch.zeros(num_experts + 2, dtype=torch.int64, device=device) if self.accumulate else None

    def compute(self, inputs: LossInputs) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        d, state = inputs.decision, inputs.state
        if not self.accumulate:
            return switch_aux_loss(d, inputs.top_k, inputs.valid_T, group=self.group, global_batch=True,
                                   count=self.count)
        E = d.num_experts
        if state is None or state.shape != (E + 2,):
            raise ValueError(f"GlobalBatchAuxLoss(accumulate=True) needs this layer's running counts as "
                             f"LossInputs.state (an int64 [{E + 2}] tensor from init_state, as MoELayer passes), "
                             f"got {None if state is None else tuple(state.shape)}")
        p_TE = d.probs_TE
        P_E, num_tokens = _mean_probs(p_TE, inputs.valid_T)
        recompute = inputs.training and torch.is_grad_enabled() and not _counting_forward(inputs.training)
        if recompute:
            counts_E, num_tokens = state[:E].to(p_TE.dtype), state[E].to(p_TE.dtype)
        else:
            counts_E = _pair_counts(d, inputs.valid_T, p_TE.dtype, self.count)
            counts_E, num_tokens = _all_reduce_counts(counts_E, num_tokens, self.group)
            if _counting_forward(inputs.training):
                with torch.no_grad():
                    state[:E] += counts_E.round().to(torch.int64)
                    state[E] += num_tokens.round().to(torch.int64)
                    state[E + 1] += 1
                counts_E, num_tokens = state[:E].to(p_TE.dtype), state[E].to(p_TE.dtype)
        f_E = counts_E / (num_tokens * inputs.top_k).clamp_min(1)
        stats = {"global_aux_micro_batches": state[E + 1].detach().clone()}
        return E * (f_E * P_E).sum(), stats


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
