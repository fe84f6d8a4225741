"""LocMoE's lower bound on expert capacity from the angle between tokens and gate weights (Li et al., "LocMoE: A
Low-Overhead MoE for Large Language Model Training", arXiv 2401.13920, Lemma 3 and Theorem 1, Eqs. 8-9).

Under the paper's assumptions (tokens uniform on the unit sphere of dimension d, equal-norm orthogonal gate
weights, a token belongs to expert i when ``cos(theta_ij) >= delta``) a token falls in expert i's region with
probability ``p_delta = 1 - I_{delta^2}(1/2, (d-1)/2)`` (I the regularised incomplete beta; Eq. 8), and the
minimum expert capacity is ``ec_min >= 1 / (n p_delta)`` (Eq. 9), for large d
``1 / (n erfc(sqrt(delta^2 d / (2 - delta^2))))``. The paper measured delta ~ 0.03 on its model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..losses.betainc import betainc
from ..validation import check_bool, check_float, check_int


def locmoe_assignment_probability(delta: float, hidden_size: int) -> float:
    """``p_delta = 1 - I_{delta^2}(1/2, (d-1)/2)`` (LocMoE Eq. 8): the share of the unit sphere within angle
    ``arccos(delta)`` of a direction or of its opposite (``d = hidden_size >= 2``)."""
    delta = check_float("delta", delta, 0.0, 1.0)
    d = check_int("hidden_size", hidden_size, 2)
    x = torch.tensor(delta * delta, dtype=torch.float64)
    return float(1.0 - betainc(x, 0.5, (d - 1) / 2.0))


def locmoe_min_capacity(delta: float, hidden_size: int, num_experts: int, *, large_d: bool = False) -> float:
    """LocMoE's lower bound on the expert capacity (Theorem 1, Eq. 9): ``1 / (n p_delta)`` with ``n =
    num_experts``; ``large_d=True`` gives the paper's large-d form ``1 / (n erfc(sqrt(delta^2 d / (2 -
    delta^2))))``. ``delta`` is the cosine of the largest angle between a token and the gate weight of the expert it
    is routed to (`min_assignment_cosine` measures it), in [0, 1]. The bound grows exponentially as that angle
    narrows (delta -> 1)."""
    n = check_int("num_experts", num_experts, 1)
    if check_bool("large_d", large_d):
        delta = check_float("delta", delta, 0.0, 1.0)
        d = check_int("hidden_size", hidden_size, 2)
        p = math.erfc(math.sqrt(delta * delta * d / (2.0 - delta * delta)))
    else:
        p = locmoe_assignment_probability(delta, hidden_size)
    return math.inf if p == 0.0 else 1.0 / (n * p)


def min_assignment_cosine(x_TD: Tensor, gate_weight_ED: Tensor, experts_TK: Tensor,
                          valid_T: Optional[Tensor] = None) -> float:
    """The ``delta`` of `locmoe_min_capacity` for one batch: the smallest cosine between a token ``x_TD`` [T, D] and
    the gate weight (``gate_weight_ED`` [E, D], e.g. ``router.gate_weight_ED()``) of an expert it is routed to
    (``experts_TK`` int [T, K]), over non-padding tokens (``valid_T`` bool [T]); clamped at 0 (the paper's delta is
    a non-negative threshold). One host sync."""
    if x_TD.dim() != 2 or gate_weight_ED.dim() != 2 or x_TD.shape[1] != gate_weight_ED.shape[1]:
        raise ValueError(f"x_TD [T, D] and gate_weight_ED [E, D] must share D, got {tuple(x_TD.shape)} and "
                         f"{tuple(gate_weight_ED.shape)}")
    if experts_TK.dim() != 2 or experts_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"experts_TK must have shape [{x_TD.shape[0]}, K], got {tuple(experts_TK.shape)}")
    x = torch.nn.functional.normalize(x_TD.detach().double(), dim=-1)
    w = torch.nn.functional.normalize(gate_weight_ED.detach().double(), dim=-1)
    cos_TK = (x @ w.t()).gather(1, experts_TK.long())
    if valid_T is not None:
        cos_TK = cos_TK[valid_T]
    if cos_TK.numel() == 0:
        raise ValueError("no (non-padding) routed token to measure")
    return max(float(cos_TK.min()), 0.0)
