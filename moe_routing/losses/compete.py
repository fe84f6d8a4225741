"""CompeteSMoE's router distillation loss: the router's softmax imitates the competition's (arXiv 2505.13380)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Loss, LossInputs


def compete_distill_loss(logits_TE: Tensor, target_TE: Tensor, valid_T: Optional[Tensor] = None) -> Tensor:
    """``mean_{t, e} (softmax(logits_t)_e - target_te)^2`` over non-padding tokens (the MSE of the authors'
    ``router_loss``, Fsoft-AIC/CompeteSMoE ``moe_model/model/moe/competesmoe.py``); ``target_TE`` is detached."""
    sq_TE = (logits_TE.softmax(-1) - target_TE.detach().to(logits_TE.dtype)) ** 2
    if valid_T is None:
        return sq_TE.mean()
    w_T = valid_T.to(sq_TE.dtype)
    return (sq_TE.sum(-1) * w_T).sum() / (w_T.sum().clamp_min(1) * sq_TE.shape[-1])


class CompeteDistillLoss(Loss):
    """``coeff * compete_distill_loss`` on forwards whose decision carries ``target_TE`` (competition steps);
    0 otherwise. Stat ``compete_distill`` (the value without its coefficient, on competition steps)."""

    name = "compete_distill"

    def __init__(self, coeff: float = 1e-2) -> None:
        super().__init__(coeff)

    def compute(self, inputs: LossInputs):
        d = inputs.decision
        if d.target_TE is None:
            return d.logits_TE.new_zeros(())
        value = compete_distill_loss(d.logits_TE, d.target_TE, inputs.valid_T)
        return value, {"compete_distill": value.detach()}
