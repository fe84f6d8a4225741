"""Permute kernel: gather rows ``out[n] = x[rows[n]]`` (any float dtype, int32/int64 indices)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import block_d, check_index


@triton.jit
def _gather_rows_kernel(x_ptr, rows_ptr, out_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    src = tl.load(rows_ptr + n, mask=n_mask, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = n_mask[:, None] & (d < D)[None, :]
        vals = tl.load(x_ptr + src[:, None] * D + d[None, :], mask=mask)
        tl.store(out_ptr + n.to(tl.int64)[:, None] * D + d[None, :], vals, mask=mask)


def permute(x_TD: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """``x_ND[n] = x_TD[rows_N[n]]`` for contiguous ``x_TD`` [T, D]."""
    check_index("rows_N", rows_N, x_TD.shape[0])
    x_TD = x_TD.contiguous()
    N, D = rows_N.numel(), x_TD.shape[1]
    out = x_TD.new_empty(N, D)
    if N == 0 or D == 0:
        return out
    BLOCK_N = 16
    _gather_rows_kernel[(triton.cdiv(N, BLOCK_N),)](x_TD, rows_N.contiguous(), out, N, D,
                                                    BLOCK_N=BLOCK_N, BLOCK_D=block_d(D))
    return out
