"""ReMoE's load-balanced L1 regulariser on ReLU router outputs."""
from __future__ import annotations

import torch
from torch import Tensor

from ..decision import RoutingDecision
from .balance import Loss, LossInputs


def relu_l1_loss(decision: RoutingDecision, top_k: int, valid_T=None) -> Tensor:
    """``(1/T) sum_t sum_e f_e R_te`` with ``f_e = (E / (k T)) #{t : R_te > 0}`` (no gradient through f)."""
    R_TE = decision.scores_TE
    if valid_T is not None:
        R_TE = R_TE[valid_T]
    T, E = R_TE.shape
    if T == 0:
        return R_TE.sum()
    f_E = (E / (top_k * T)) * (R_TE.detach() > 0).sum(0).to(R_TE.dtype)
    return (R_TE * f_E).sum() / T


class ReLUL1Loss(Loss):
    """``lambda * relu_l1_loss`` with lambda the router's adaptive ``l1_coeff`` (times ``coeff``, default 1)."""

    name = "relu_l1"

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__(coeff)

    def compute(self, decision: RoutingDecision, info: LossInputs) -> Tensor:
        router = info.layer.router
        if not hasattr(router, "l1_coeff"):
            raise TypeError("ReLUL1Loss needs a router with an adaptive l1_coeff (ReLURouter)")
        return router.l1_coeff * relu_l1_loss(decision, info.top_k, info.valid_T)
