"""Expert counts, offsets and the stable expert-sorted order of routed pairs.

Index maps are named for what they map (N routed pairs, in token order; their N expert-sorted rows):
    pair_of_row_N  expert-sorted row j -> the pair placed there          (`sort_by_expert`)
    row_of_pair_N  pair p -> its expert-sorted row (the inverse map)      (`invert_permutation`)
    src_token_N    expert-sorted row j -> the token row permute gathers   (``token_N[pair_of_row_N]``)
Offsets are CSR everywhere: ``offsets[n+1]`` int64 with ``offsets[0] = 0``; group i owns
``offsets[i]:offsets[i+1]`` (experts' rows: ``offsets_E1``; tokens' pairs: ``token_offsets_T1``).
`torch._grouped_mm`'s int32 end offsets are ``offsets_E1[1:]``, converted at that one call (`ops.grouped_mm`).
"""
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
        backend: "torch", "triton", "cuda" (run as given), or "auto".
    Returns:
        pair_of_row_N: int64 [N], the pair placed at expert-sorted row j (ties keep token order, so dispatch
            is deterministic).
        counts_E: int64 [E] pairs per expert.
        offsets_E1: int64 [E+1] CSR offsets: expert e's rows are ``offsets_E1[e]:offsets_E1[e+1]``.
    """
    resolved = op_backend(backend, expert_N.device)
    if resolved == "triton":
        from .._kernels import counts as kernel

        return kernel.sort_by_expert(expert_N, num_experts)
    if resolved == "cuda":
        from . import cuda_ext

        return cuda_ext.sort_by_expert(expert_N, num_experts)
    pair_of_row_N = torch.sort(expert_N, stable=True).indices
    counts_E = expert_counts(expert_N, num_experts)
    offsets_E1 = torch.nn.functional.pad(torch.cumsum(counts_E, 0), (1, 0))
    return pair_of_row_N, counts_E, offsets_E1


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


def invert_permutation(pair_of_row_N: Tensor) -> Tensor:
    """``row_of_pair_N`` with ``row_of_pair_N[pair_of_row_N[j]] = j``: the expert-sorted row of each pair."""
    row_of_pair_N = torch.empty_like(pair_of_row_N)
    row_of_pair_N[pair_of_row_N] = torch.arange(pair_of_row_N.numel(), device=pair_of_row_N.device)
    return row_of_pair_N
