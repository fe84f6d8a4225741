"""Permute kernel: gather rows ``out[n] = x[src_token[n]]`` (any float dtype, int32/int64 indices)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotune, check_device, check_index


def _configs() -> list:
    """Rows per program x feature block; the first one is what the interpreter runs."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w)
            for n, d, w in ((16, 1024, 4), (4, 1024, 4), (8, 512, 4), (32, 256, 8), (1, 2048, 8))]


@autotune(_configs(), key=["D"])
@triton.jit
def _gather_rows_kernel(x_ptr, src_token_ptr, out_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    src = tl.load(src_token_ptr + n, mask=n_mask, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = n_mask[:, None] & (d < D)[None, :]
        vals = tl.load(x_ptr + src[:, None] * D + d[None, :], mask=mask)
        tl.store(out_ptr + n.to(tl.int64)[:, None] * D + d[None, :], vals, mask=mask)


def permute(x_TD: torch.Tensor, src_token_N: torch.Tensor) -> torch.Tensor:
    """``x_ND[n] = x_TD[src_token_N[n]]`` for ``x_TD`` [T, D] (made contiguous) and int32/int64 ``src_token_N`` [N]."""
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D [T, D], got shape {tuple(x_TD.shape)}")
    check_device("x_TD", x_TD)
    check_index("src_token_N", src_token_N, x_TD.shape[0])
    x_TD = x_TD.contiguous()
    N, D = src_token_N.numel(), x_TD.shape[1]
    out = x_TD.new_empty(N, D)
    if N == 0 or D == 0:
        return out
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gather_rows_kernel[grid](x_TD, src_token_N.contiguous(), out, N, D)
    return out
