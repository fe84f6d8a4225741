"""Sinkhorn router (S-BASE / Megatron-core's "sinkhorn" load balancing): balanced expert choice in training."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..decision import RoutingContext
from ..validation import check_float, check_int
from .base import GatedRouter


STOP_RULES = ("rows", "megatron")
_FLOOR_ULPS = 64   # a row error below this many ulps of the dtype is rounding noise
_STALL_ITERS = 10  # iterations without a new best row error before the loop stops at the floor


def _check_stop_rule(stop_rule: str) -> str:
    if stop_rule not in STOP_RULES:
        raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {stop_rule!r}")
    return stop_rule


@torch.no_grad()
def sinkhorn(logits_TE: Tensor, valid_T: Optional[Tensor] = None, tol: float = 1e-4,
             max_iters: int = 100, stop_rule: str = "rows") -> tuple[Tensor, int, float]:
    """Sinkhorn-Knopp balancing of ``exp(logits_TE)`` in log space (no gradient).

    Finds row scalings ``u_T`` and column scalings ``v_E`` so that the plan ``P = u_t * exp(logits_te) * v_e``
    has every column summing to ``1/E`` and every row to ``1/T`` (T = non-padding tokens): each expert gets an
    equal share of the tokens. This is the iteration of Megatron-core's ``sinkhorn`` (rows then columns), run on
    ``log u`` and ``log v`` with logsumexp so large logits cannot overflow ``exp``.

    Each iteration ends on a column update, so columns are exact. ``stop_rule="rows"`` (ours, the default) stops
    when the rows are within ``tol`` too, ``max_t |T * sum_e P_te - 1| <= tol``; ``"megatron"`` when the column
    scalings stop moving, ``mean_e |v_e - v_e_previous| <= tol`` (Megatron-core's rule, which has no iteration
    cap and measures v in its own scale, so its error depends on the logits' magnitude). Either way it stops
    after ``max_iters`` iterations (the plan is then returned as is),
    or when the row error has not improved for `_STALL_ITERS` iterations: it has reached the rounding floor of
    the logits' dtype (a ``tol`` below ``_FLOOR_ULPS`` ulps of it warns once per call site).
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
    floor = _FLOOR_ULPS * torch.finfo(L.dtype).eps
    if tol < floor:
        warnings.warn(f"sinkhorn tol={tol:g} is below what {L.dtype} resolves (~{floor:.1g}); it stops when the "
                      "row error stops improving instead", UserWarning, stacklevel=3)
    _check_stop_rule(stop_rule)
    err, best, stalled, it = math.inf, math.inf, 0, 0
    for it in range(1, max_iters + 1):
        prev_col = log_col
        log_col = -log_E - torch.logsumexp(L_col + log_row[:, None], dim=0)
        new_row = -log_T - torch.logsumexp(L + log_col, dim=1)
        if stop_rule == "megatron":
            err = float((log_col.exp() - prev_col.exp()).abs().mean())
        else:
            # exp(log_row - new_row) = T * (row sum of the current plan): its distance from 1 is the row error
            drift = torch.expm1(log_row - new_row).abs()
            err = float((drift if valid_T is None else drift[valid_T]).max())
        stalled = 0 if err < best else stalled + 1
        best = min(best, err)
        if err <= tol or it == max_iters or stalled >= _STALL_ITERS:
            break
        log_row = new_row
    return L + log_row[:, None] + log_col, it, err


class SinkhornRouter(GatedRouter):
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
        stop_rule: "rows" (default: the row error above) or "megatron" (Megatron-core's rule, mean absolute
            change of the column scalings; kept under ``max_iters`` here, where Megatron has no cap).
        init_std: std of the normal initialisation of ``weight``.
        strict: raise on non-finite logits on accelerators too (CPU always raises).
    ``decision.extra`` in training: ``sinkhorn_iters``, ``sinkhorn_error`` (final row error).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, tol: float = 1e-4,
                 max_iters: int = 100, stop_rule: str = "rows", init_std: float = 0.02, strict: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        self.tol = check_float("tol", tol, 0.0, low_inclusive=False)
        self.max_iters = check_int("max_iters", max_iters, 1)
        self.stop_rule = _check_stop_rule(stop_rule)
        self.scores_normalized = top_k != 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tol={self.tol:g}, max_iters={self.max_iters}"

    def default_losses(self) -> list:
        return []

    def scores(self, logits_TE: Tensor) -> Tensor:
        return logits_TE.sigmoid() if self.top_k == 1 else logits_TE.softmax(-1)

    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        return scores_TE.topk(self.top_k, dim=-1).indices

    def choose(self, logits_TE: Tensor, scores_TE: Tensor, forced_TK: Optional[Tensor],
               ctx: Optional[RoutingContext], backend: str) -> tuple[Tensor, Tensor, dict]:
        if forced_TK is not None or not self.training:
            return super().choose(logits_TE, scores_TE, forced_TK, ctx, backend)
        pad_T = None if ctx is None else ctx.padding_T(logits_TE.shape[0])
        valid_T = None if pad_T is None else ~pad_T.to(logits_TE.device)
        log_plan_TE, iters, err = sinkhorn(logits_TE, valid_T, self.tol, self.max_iters, self.stop_rule)
        experts_TK = log_plan_TE.topk(self.top_k, dim=-1).indices
        extra = {"sinkhorn_iters": torch.tensor(iters), "sinkhorn_error": torch.tensor(err, dtype=torch.float64)}
        return experts_TK, self.gates(experts_TK, logits_TE, scores_TE), extra
