"""Expert counts, offsets and the stable expert-sorted order of routed pairs, atomic-free.

Pass 1: each program histograms its block of pairs (one-hot against a block of experts, summed).
Between passes, torch turns the tiny [blocks, E] table into each block's first slot per expert.
Pass 2: each pair's slot = its block's base for its expert + its rank among earlier same-expert pairs of the
block (a cumulative sum of the one-hot), so ties keep pair order and the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_index

BLOCK_N = 128


@triton.jit
def _block_histogram_kernel(expert_ptr, partial_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(expert_ptr + n, mask=n < N, other=-1)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        onehot = (expert[:, None] == e[None, :]).to(tl.int64)
        tl.store(partial_ptr + pid * E + e, tl.sum(onehot, axis=0), mask=e < E)


@triton.jit
def _scatter_order_kernel(expert_ptr, base_ptr, pair_of_row_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    expert = tl.load(expert_ptr + n, mask=n_mask, other=-1)
    rank = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        onehot = (expert[:, None] == e[None, :]).to(tl.int64)
        before = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs earlier in this block
        rank += tl.sum(before * onehot, axis=1)
    base = tl.load(base_ptr + pid * E + expert, mask=n_mask, other=0)
    tl.store(pair_of_row_ptr + base + rank, n.to(tl.int64), mask=n_mask)


def sort_by_expert(expert_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `moe_routing.ops.counts.sort_by_expert`: (pair_of_row_N int64, counts_E int64,
    offsets_E1 int64 [E+1] CSR offsets)."""
    if int(num_experts) != num_experts or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    check_index("expert_N", expert_N, num_experts)
    N, E = expert_N.numel(), num_experts
    expert_N = expert_N.contiguous()
    blocks = triton.cdiv(N, BLOCK_N)
    pair_of_row = torch.empty(N, dtype=torch.int64, device=expert_N.device)
    if N == 0:
        counts = torch.zeros(E, dtype=torch.int64, device=expert_N.device)
        return pair_of_row, counts, torch.zeros(E + 1, dtype=torch.int64, device=expert_N.device)
    block_e = min(256, triton.next_power_of_2(E))
    partial = torch.empty(blocks, E, dtype=torch.int64, device=expert_N.device)
    _block_histogram_kernel[(blocks,)](expert_N, partial, N, E, BLOCK_N=BLOCK_N, BLOCK_E=block_e)
    counts = partial.sum(0)
    ends = torch.cumsum(counts, 0)
    base = (ends - counts)[None, :] + (torch.cumsum(partial, 0) - partial)
    _scatter_order_kernel[(blocks,)](expert_N, base.contiguous(), pair_of_row, N, E, BLOCK_N=BLOCK_N,
                                     BLOCK_E=block_e)
    return pair_of_row, counts, torch.nn.functional.pad(ends, (1, 0))
