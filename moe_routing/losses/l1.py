"""ReMoE's load-balanced L1 regulariser on ReLU router outputs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..decision import RoutingDecision
from .base import Loss, LossInputs


def relu_l1_loss(decision: RoutingDecision, top_k: int, valid_T: Optional[Tensor] = None) -> Tensor:
    """``(1/T) sum_t sum_e f_e R_te`` with ``f_e = (E / (k T)) #{t : R_te > 0}`` (no gradient through f).

    T and the sums run over non-padding tokens (``valid_T`` [T] bool, True = real token); padding enters as a
    zero weight rather than a boolean index, which would sync the host. 0 when every token is padding.
    """
    R_TE = decision.scores_TE
    E = R_TE.shape[1]
    if valid_T is None:
        w_T = torch.ones_like(R_TE[:, 0])
    else:
        w_T = valid_T.to(R_TE.dtype)
    num_T = w_T.sum().clamp_min(1)
    active_E = ((R_TE.detach() > 0).to(R_TE.dtype) * w_T[:, None]).sum(0)
    f_E = (E / top_k) * active_E / num_T
    return ((R_TE * w_T[:, None]).sum(0) * f_E).sum() / num_T


class ReLUL1Loss(Loss):
    """``lambda * relu_l1_loss`` with lambda the router's adaptive coefficient (``LossInputs.l1_coeff``, set by
    `ReLURouter`'s controller), times ``coeff`` (default 1)."""

    name = "relu_l1"

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__(coeff)

    def compute(self, inputs: LossInputs) -> Tensor:
        if inputs.l1_coeff is None:
            raise TypeError("ReLUL1Loss needs a router with an adaptive L1 coefficient (ReLURouter): "
                            "LossInputs.l1_coeff is None")
        return inputs.l1_coeff * relu_l1_loss(inputs.decision, inputs.top_k, inputs.valid_T)
