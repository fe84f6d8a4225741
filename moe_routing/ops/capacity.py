"""Capacity mode: which routed pairs fit in each expert's ``ceil(capacity_factor * T * k / E)`` slots."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

DROP_POLICIES = ("weight", "position")


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * T * k / E)``; T counts non-padding tokens."""
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor must be a number (or None for dropless), got {capacity_factor!r}")
    if not 0 < capacity_factor < math.inf:
        raise ValueError(f"capacity_factor must be > 0 and finite (or None for dropless), got {capacity_factor!r}")
    # exact decimal arithmetic: in floats 1.1 * 100 / 10 is 11.000000000000002 and would round up to 12
    return math.ceil(Fraction(str(capacity_factor)) * num_tokens * top_k / num_experts)


def capacity_keep_mask(expert_N: Tensor, weight_N: Tensor, num_experts: int, capacity: int,
                       policy: str = "weight", valid_N: Optional[Tensor] = None) -> Tensor:
    """bool [N]: True for pairs that fit their expert's capacity.

    ``policy="weight"`` keeps each expert's ``capacity`` highest-weight pairs, ``"position"`` its first
    ``capacity`` pairs in token order. Pairs with ``valid_N`` False (padding) are dropped and use no capacity.
    Memory is linear in N: ranks come from two stable sorts, no [T, E, C] tensor.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
    keep_N = torch.zeros_like(expert_N, dtype=torch.bool)
    idx = torch.arange(expert_N.numel(), device=expert_N.device)
    if valid_N is not None:
        idx = idx[valid_N]
    experts = expert_N[idx]
    if policy == "weight":
        by_weight = torch.sort(weight_N[idx].detach(), descending=True, stable=True).indices
        order = by_weight[torch.sort(experts[by_weight], stable=True).indices]
    else:
        order = torch.sort(experts, stable=True).indices
    counts_E = torch.bincount(experts, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_experts = experts[order]
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts_E[sorted_experts]
    keep_N[idx[order]] = rank_sorted < capacity
    return keep_N
