"""Sinkhorn router (S-BASE / Megatron-core's "sinkhorn" load balancing): balanced expert choice in training."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from .base import Router, check_finite_logits, forced_experts_TK


@torch.no_grad()
def sinkhorn(logits_TE: Tensor, valid_T: Optional[Tensor] = None, tol: float = 1e-4,
             max_iters: int = 100) -> tuple[Tensor, int, float]:
    """Sinkhorn-Knopp balancing of ``exp(logits_TE)`` in log space (no gradient).

    Finds row scalings ``u_T`` and column scalings ``v_E`` so that the plan ``P = u_t * exp(logits_te) * v_e``
    has every column summing to ``1/E`` and every row to ``1/T`` (T = non-padding tokens): each expert gets an
    equal share of the tokens. This is the iteration of Megatron-core's ``sinkhorn`` (rows then columns), run on
    ``log u`` and ``log v`` with logsumexp so large logits cannot overflow ``exp``.

    Each iteration ends on a column update, so columns are exact; it stops when the rows are within ``tol`` too,
    ``max_t |T * sum_e P_te - 1| <= tol``, or after ``max_iters`` iterations (the plan is then returned as is).
    Padding rows (``valid_T`` False) take no share of the columns; their rows are still normalised.

    Args:
        logits_TE: [T, E] router logits (computed in at least float32).
        valid_T: bool [T], False at padding, or None.
    Returns:
        (log_plan_TE [T, E] = log P, iterations run, final row error).
    """
    L = logits_TE.detach().to(torch.promote_types(logits_TE.dtype, torch.float32))
    T, E = L.shape
    num_valid = T if valid_T is None else int(valid_T.sum())
    log_col = L.new_zeros(E)
    if num_valid == 0:
        return L - torch.logsumexp(L, dim=1, keepdim=True), 0, 0.0
    L_col = L if valid_T is None else L.masked_fill(~valid_T[:, None], float("-inf"))
    log_T, log_E = math.log(num_valid), math.log(E)
    log_row = -log_T - torch.logsumexp(L, dim=1)
    err, it = math.inf, 0
    for it in range(1, max_iters + 1):
        log_col = -log_E - torch.logsumexp(L_col + log_row[:, None], dim=0)
        new_row = -log_T - torch.logsumexp(L + log_col, dim=1)
        # exp(log_row - new_row) = T * (row sum of the current plan): its distance from 1 is the row error
        drift = torch.expm1(log_row - new_row).abs()
        err = float((drift if valid_T is None else drift[valid_T]).max())
        if err <= tol or it == max_iters:
            break
        log_row = new_row
    return L + log_row[:, None] + log_col, it, err


class SinkhornRouter(Router):
    """Top-k router whose training-time choice is balanced by Sinkhorn iterations (Megatron-core, S-BASE).

    ``logits = x @ weight.T`` (``weight`` [E, D], no bias). Gate activation ``act`` = sigmoid when ``top_k == 1``,
    softmax over the E experts otherwise (as Megatron-core's ``sinkhorn_load_balancing``).

    - training: experts = top-k of the Sinkhorn plan of the logits (`sinkhorn`, float32 or higher, no gradient),
      gate weights = ``act(logits)`` gathered at those experts (not renormalised), so the gradient reaches the
      router through the gates only.
    - eval: experts = plain top-k of ``act(logits)``, same gate weights.

    Default losses: none (the Sinkhorn assignment balances the load by itself; Megatron-core asserts the aux loss
    coefficient is 0 with it). The Sinkhorn loop syncs the host once per iteration to test convergence.

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, E].
        tol: stop when every (non-padding) row of the plan sums to ``1/T`` within relative ``tol`` (1e-4).
        max_iters: cap on Sinkhorn iterations (100); columns are always exactly balanced on exit.
        init_std: std of the normal initialisation of ``weight``.
        strict: raise on non-finite logits on accelerators too (CPU always raises).
    ``decision.extra`` in training: ``sinkhorn_iters``, ``sinkhorn_error`` (final row error).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, tol: float = 1e-4,
                 max_iters: int = 100, init_std: float = 0.02, strict: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"tol must be a number, got {tol!r}")
        if not 0 < tol < math.inf:
            raise ValueError(f"tol must be > 0 and finite, got {tol!r}")
        if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
            raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std >= 0:
            raise ValueError(f"init_std must be a number >= 0, got {init_std!r}")
        self.top_k, self.tol, self.max_iters, self.strict = top_k, float(tol), max_iters, strict
        factory = {"device": device, "dtype": torch.float32 if dtype in (None, torch.float16, torch.bfloat16)
                   else dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def score_func(self) -> str:
        return "sigmoid" if self.top_k == 1 else "softmax"

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"tol={self.tol:g}, max_iters={self.max_iters}")

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object) -> RoutingDecision:
        T = x_TD.shape[0]
        logits_TE = x_TD @ self.weight.t()
        logits_TE, nonfinite = check_finite_logits(logits_TE, self.strict)
        scores_TE = logits_TE.sigmoid() if self.top_k == 1 else logits_TE.softmax(-1)
        extra = {} if nonfinite is None else {"nonfinite_tokens": nonfinite}

        idx_TK = forced_experts_TK(ctx, layer_key, T, self.top_k, self.num_experts, logits_TE.device)
        if idx_TK is None and self.training:
            pad_T = None if ctx is None else ctx.padding_T(T)
            valid_T = None if pad_T is None else ~pad_T.to(logits_TE.device)
            log_plan_TE, iters, err = sinkhorn(logits_TE, valid_T, self.tol, self.max_iters)
            idx_TK = log_plan_TE.topk(self.top_k, dim=-1).indices
            extra.update(sinkhorn_iters=torch.tensor(iters), sinkhorn_error=torch.tensor(err, dtype=torch.float64))
        elif idx_TK is None:
            idx_TK = scores_TE.detach().topk(self.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(1, idx_TK)
        return RoutingDecision.from_topk(idx_TK, gates_TK, logits_TE, scores_TE, self.score_func, extra)
