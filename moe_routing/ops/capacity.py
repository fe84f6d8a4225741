"""Capacity mode: which routed pairs fit in each expert's ``ceil(capacity_factor * T * k / E)`` slots."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Union

import torch
from torch import Tensor

from ..validation import check_float
from .counts import expert_counts

DROP_POLICIES = ("weight", "position")

_INT64_SAFE = 2 ** 62  # products below this cannot overflow int64 in the exact tensor formula


def expert_capacity(capacity_factor: float, num_tokens: Union[int, Tensor], top_k: int, num_experts: int,
                    max_tokens: Optional[int] = None) -> Union[int, Tensor]:
    """``min(ceil(capacity_factor * T * k / E), T)``; T counts non-padding tokens (no expert can take more than
    one pair per token, so a larger capacity would change nothing).

    ``num_tokens`` may be a 0-d integer tensor (the non-padding count, on the device): the capacity is then a
    0-d int64 tensor computed exactly in integer arithmetic, with no host sync, whenever ``max_tokens`` (an
    upper bound on T, e.g. the batch's token count) keeps the products inside int64; otherwise the count is
    read on the host (a sync on accelerators) and an int is returned.
    """
    check_float("capacity_factor", capacity_factor, 0.0, low_inclusive=False)
    # exact decimal arithmetic: in floats 1.1 * 100 / 10 is 11.000000000000002 and would round up to 12
    frac = Fraction(str(capacity_factor))
    if isinstance(num_tokens, Tensor) and (num_tokens.dim() != 0 or num_tokens.is_floating_point()):
        raise ValueError(f"num_tokens must be an int or a 0-d integer tensor, got {num_tokens.dtype} "
                         f"{tuple(num_tokens.shape)}")
    if frac * top_k >= num_experts:
        # capacity >= T: an expert receives at most one pair per token, so nothing can drop; returning T also
        # keeps a huge factor (1e308) from overflowing the integer comparison downstream
        return num_tokens.long() if isinstance(num_tokens, Tensor) else num_tokens
    if isinstance(num_tokens, Tensor):
        num, den = frac.numerator * top_k, frac.denominator * num_experts
        if max_tokens is not None and num * max_tokens + den < _INT64_SAFE:
            return (num_tokens.long() * num + (den - 1)) // den  # ceil(num * T / den), exact
        num_tokens = int(num_tokens)
    return math.ceil(frac * num_tokens * top_k / num_experts)


def capacity_keep_mask(expert_N: Tensor, weight_N: Tensor, num_experts: int, capacity: Union[int, Tensor],
                       policy: str = "weight", valid_N: Optional[Tensor] = None) -> Tensor:
    """bool [N]: True for pairs that fit their expert's capacity.

    ``policy="weight"`` keeps each expert's ``capacity`` highest-weight pairs, ``"position"`` its first
    ``capacity`` pairs in token order. Pairs with ``valid_N`` False (padding) are dropped and use no capacity.
    Memory is linear in N: ranks come from two stable sorts, no [T, E, C] tensor. No host sync: padding
    pairs go to an extra bucket E instead of being removed by a boolean index.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
    experts = expert_N.long()
    if valid_N is not None:
        experts = torch.where(valid_N, experts, torch.full_like(experts, num_experts))
    if policy == "weight":
        by_weight = torch.sort(weight_N.detach(), descending=True, stable=True).indices
        order = by_weight[torch.sort(experts[by_weight], stable=True).indices]
    else:
        order = torch.sort(experts, stable=True).indices
    counts_E = expert_counts(experts, num_experts + 1)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_experts = experts[order]
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts_E[sorted_experts]
    keep_sorted = rank_sorted < capacity
    if valid_N is not None:
        keep_sorted = keep_sorted & (sorted_experts < num_experts)
    return torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
