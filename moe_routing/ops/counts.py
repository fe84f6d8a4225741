"""Expert counts, offsets and the stable expert-sorted order of routed pairs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import op_backend


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
    resolved = op_backend(backend, expert_N.device)
    if resolved == "triton":
        from .._kernels import counts as kernel

        return kernel.sort_by_expert(expert_N, num_experts)
    if resolved == "cuda":
        from . import cuda_lib

        return cuda_lib.sort_by_expert(expert_N, num_experts)
    order_N = torch.sort(expert_N, stable=True).indices
    counts_E = expert_counts(expert_N, num_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return order_N, counts_E, offsets_E


def expert_counts(expert_N: Tensor, num_experts: int, weight_N: Optional[Tensor] = None) -> Tensor:
    """Pairs per expert [E]: int64 counts, or the sum of ``weight_N`` [N] per expert (in its dtype).

    ``index_add_`` into a fixed-size buffer instead of ``torch.bincount``: bincount sizes its output from the
    data's max (a device sync on CUDA, and a graph break under ``torch.compile``). Pass a 0/1 mask as
    ``weight_N`` instead of boolean-indexing the pairs (indexing by a mask also syncs).
    """
    if weight_N is None:
        weight_N = torch.ones_like(expert_N, dtype=torch.int64)
    out = torch.zeros(num_experts, dtype=weight_N.dtype, device=expert_N.device)
    return out.index_add_(0, expert_N.long(), weight_N)


def csr_offsets(sorted_ids_N: Tensor, num_rows: int, top_k: int = 0) -> Tensor:
    """int64 [num_rows + 1] CSR offsets of pairs sorted by row (token): row t owns ``offsets[t]:offsets[t+1]``.

    With ``top_k`` > 0 every row has exactly ``top_k`` pairs and the offsets are ``t * top_k`` (no scan);
    otherwise a binary search of the sorted ids, which needs no host sync (unlike a bincount).
    """
    bounds = torch.arange(num_rows + 1, device=sorted_ids_N.device)
    if top_k > 0:
        return bounds * top_k
    return torch.searchsorted(sorted_ids_N.long(), bounds)


def inverse_order(order_N: Tensor) -> Tensor:
    """``row_N`` with ``row_N[order_N[j]] = j``: the expert-sorted row of each pair."""
    row_N = torch.empty_like(order_N)
    row_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return row_N
