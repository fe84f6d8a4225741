"""SMILE's inter-node balance term (arXiv 2212.05191): the switch aux loss over groups of experts."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..decision import RoutingDecision
from ..validation import check_int
from .base import Loss, LossInputs


def group_balance_loss(decision: RoutingDecision, num_groups: int, valid_T: Optional[Tensor] = None) -> Tensor:
    """``G * sum_g f_g * P_g``: ``f_g`` the fraction of routed pairs whose expert is in group g (contiguous blocks of
    E / G experts), ``P_g`` the mean over tokens of the probability mass on group g (1.0 when balanced)."""
    E, G = decision.num_experts, num_groups
    p_TE = decision.probs_TE
    group_N = decision.expert_N // (E // G)
    w_N = p_TE.new_ones(group_N.shape) if valid_T is None else valid_T[decision.token_N].to(p_TE.dtype)
    f_G = p_TE.new_zeros(G).index_add_(0, group_N, w_N) / w_N.sum().clamp_min(1)
    mass_TG = p_TE.view(p_TE.shape[0], G, -1).sum(-1)
    if valid_T is None:
        P_G = mass_TG.mean(0)
    else:
        w_T = valid_T.to(p_TE.dtype)
        P_G = (mass_TG * w_T[:, None]).sum(0) / w_T.sum().clamp_min(1)
    return G * (f_G.detach() * P_G).sum()


class GroupBalanceLoss(Loss):
    """``coeff * group_balance_loss``; stat ``group_balance`` (without the coefficient)."""

    name = "group_balance"

    def __init__(self, coeff: float = 1e-2, num_groups: int = 2) -> None:
        super().__init__(coeff)
        self.num_groups = check_int("num_groups", num_groups, 1)

    def compute(self, inputs: LossInputs):
        E = inputs.decision.num_experts
        if E % self.num_groups:
            raise ValueError(f"GroupBalanceLoss num_groups={self.num_groups} must divide the layer's "
                             f"num_experts={E}")
        value = group_balance_loss(inputs.decision, self.num_groups, inputs.valid_T)
        return value, {"group_balance": value.detach()}
