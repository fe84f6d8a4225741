"""Expert counts, offsets and the stable expert-sorted order of routed pairs."""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import resolve_backend


def sort_by_expert(expert_N: Tensor, num_experts: int, backend: str = "torch") -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of routed pairs by expert.

    Args:
        expert_N: int [N] expert of each pair (pairs in token order).
        num_experts: E.
    Returns:
        order_N: int64 [N], ``order_N[j]`` is the pair placed at expert-sorted row j (ties keep token order,
            so dispatch is deterministic).
        counts_E: int64 [E] pairs per expert.
        offsets_E: int32 [E] end offset of each expert's rows (inclusive prefix sum), as grouped GEMMs take.
    """
    if resolve_backend(backend, expert_N.device) == "triton":
        from .._kernels import counts as kernel

        return kernel.sort_by_expert(expert_N, num_experts)
    order_N = torch.sort(expert_N, stable=True).indices
    counts_E = torch.bincount(expert_N, minlength=num_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return order_N, counts_E, offsets_E


def inverse_order(order_N: Tensor) -> Tensor:
    """``row_N`` with ``row_N[order_N[j]] = j``: the expert-sorted row of each pair."""
    row_N = torch.empty_like(order_N)
    row_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return row_N
