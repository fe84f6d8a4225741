"""Unpermute + combine kernels.

Forward is token-major and atomic-free: each program owns a block of output tokens and sums that token's
pairs (CSR ``token_offsets``) in a fixed order, so results are deterministic. With no weights it is permute's
backward. Backward is pair-major: ``d_h[row_of_pair[p]] = w[p] * dy[token[p]]``,
``d_w[p] = <dy[token[p]], h[row_of_pair[p]]>`` (``row_of_pair``: the expert-sorted row of pair p).
Load, convert to the accumulate dtype (a constexpr), compute, store.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import _check_values, acc_dtype, autotune, check_index, check_offsets, check_rows


def _configs(rows: str) -> list:
    """Tokens (or pairs) per program x feature block; the first one is what the interpreter runs."""
    return [triton.Config({rows: n, "BLOCK_D": d}, num_warps=w)
            for n, d, w in ((16, 1024, 4), (4, 1024, 4), (8, 512, 4), (32, 256, 8), (1, 2048, 8))]


# max_pairs is a runtime loop bound: not an autotune key (a key re-tunes for every new value) and not
# specialised (Triton would otherwise compile separate variants for max_pairs == 1 and multiples of 16).
@autotune(_configs("BLOCK_T"), key=["D", "HAS_W"])
@triton.jit(do_not_specialize=["max_pairs"])
def _combine_kernel(h_ptr, w_ptr, row_of_pair_ptr, offs_ptr, y_ptr, T, D, max_pairs,
                    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    start = tl.load(offs_ptr + t, mask=t_mask, other=0)
    end = tl.load(offs_ptr + t + 1, mask=t_mask, other=0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
        for j in range(0, max_pairs):
            p = start + j
            p_mask = t_mask & (p < end)
            row = tl.load(row_of_pair_ptr + p, mask=p_mask, other=0).to(tl.int64)
            h = tl.load(h_ptr + row[:, None] * D + d[None, :], mask=p_mask[:, None] & d_mask[None, :], other=0.0)
            h = h.to(ACC)
            if HAS_W:
                w = tl.load(w_ptr + p, mask=p_mask, other=0.0).to(ACC)
                h = h * w[:, None]
            acc += h
        out_mask = t_mask[:, None] & d_mask[None, :]
        tl.store(y_ptr + t.to(tl.int64)[:, None] * D + d[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@autotune(_configs("BLOCK_N"), key=["D"])
@triton.jit
def _combine_backward_kernel(dy_ptr, h_ptr, w_ptr, row_of_pair_ptr, tok_ptr, dh_ptr, dw_ptr, N, D,
                             ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < N
    row = tl.load(row_of_pair_ptr + p, mask=p_mask, other=0).to(tl.int64)
    tok = tl.load(tok_ptr + p, mask=p_mask, other=0).to(tl.int64)
    w = tl.load(w_ptr + p, mask=p_mask, other=0.0).to(ACC)
    dot = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = p_mask[:, None] & (d < D)[None, :]
        dy = tl.load(dy_ptr + tok[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        h = tl.load(h_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(dh_ptr + row[:, None] * D + d[None, :], (dy * w[:, None]).to(dh_ptr.dtype.element_ty), mask=mask)
        dot += tl.sum(dy * h, axis=1)
    tl.store(dw_ptr + p, dot.to(dw_ptr.dtype.element_ty), mask=p_mask)


def combine(h_ND: torch.Tensor, weight_N: Optional[torch.Tensor], row_of_pair_N: torch.Tensor,
            token_offsets_T1: torch.Tensor, max_pairs: Optional[int] = None,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``y[t] = sum_{p in token_offsets_T1[t]:token_offsets_T1[t+1]} w[p] * h_ND[row_of_pair_N[p]]`` (w = 1 when
    ``weight_N`` is None; ``token_offsets_T1`` [T+1] CSR offsets of each token's pairs).

    ``max_pairs``: the most pairs any token has (K for fixed-k); computed (a host sync) when None, and checked
    against ``token_offsets_T1`` wherever indices are validated (CPU, or ``MOE_ROUTING_DEBUG=1`` on GPU).
    Indices (``row_of_pair_N``, ``token_offsets_T1``) may be int32 or int64; accumulation is float32 (float64 when
    ``h_ND`` or ``weight_N`` is float64); the result is ``out_dtype`` (default ``h_ND.dtype``).
    """
    check_rows("h_ND", h_ND)
    h_ND = h_ND.contiguous()
    N, D = h_ND.shape
    T = token_offsets_T1.numel() - 1
    if weight_N is not None and (weight_N.shape != (N,) or not weight_N.dtype.is_floating_point):
        raise ValueError(f"weight_N must be a floating tensor of shape [{N}] (rows of h_ND), "
                         f"got {weight_N.dtype} {tuple(weight_N.shape)}")
    check_index("row_of_pair_N", row_of_pair_N, N, length=N)
    check_offsets("token_offsets_T1", token_offsets_T1, N)
    if max_pairs is None or _check_values(token_offsets_T1):
        most = int((token_offsets_T1[1:] - token_offsets_T1[:-1]).max()) if T > 0 else 0
        if max_pairs is not None and most > max_pairs:
            raise ValueError(f"max_pairs={max_pairs} but a token has {most} pairs in token_offsets_T1")
        max_pairs = most if max_pairs is None else max_pairs
    y = torch.empty(T, D, dtype=out_dtype or h_ND.dtype, device=h_ND.device)
    if T == 0 or D == 0:
        return y
    dtypes = (h_ND.dtype,) if weight_N is None else (h_ND.dtype, weight_N.dtype)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
    _combine_kernel[grid](h_ND, h_ND if weight_N is None else weight_N.contiguous(), row_of_pair_N.contiguous(),
                          token_offsets_T1.contiguous(), y, T, D, max_pairs, HAS_W=weight_N is not None,
                          ACC=acc_dtype(*dtypes))
    return y


def combine_backward(grad_TD: torch.Tensor, h_ND: torch.Tensor, weight_N: torch.Tensor, row_of_pair_N: torch.Tensor,
                     token_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine` for expert outputs ``h_ND`` [N, D] and gate weights ``weight_N`` [N]."""
    check_rows("h_ND", h_ND)
    N, D = h_ND.shape
    check_rows("grad_TD", grad_TD, cols=D)
    if weight_N.shape != (N,) or not weight_N.dtype.is_floating_point:
        raise ValueError(f"weight_N must be a floating tensor of shape [{N}] (rows of h_ND), "
                         f"got {weight_N.dtype} {tuple(weight_N.shape)}")
    check_index("row_of_pair_N", row_of_pair_N, N, length=N)
    check_index("token_N", token_N, grad_TD.shape[0], length=N)
    if _check_values(row_of_pair_N) and N > 0 and int(torch.bincount(row_of_pair_N, minlength=N).max()) > 1:
        # d_h rows are written once each: a repeated row would race (GPU) and leave other rows unwritten.
        raise ValueError("row_of_pair_N must be a permutation of [0, N) (each expert-sorted row used once)")
    grad_TD, h_ND = grad_TD.contiguous(), h_ND.contiguous()
    d_h = torch.empty_like(h_ND)
    d_w = torch.empty_like(weight_N)
    if N == 0:
        return d_h, d_w
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _combine_backward_kernel[grid](grad_TD, h_ND, weight_N.contiguous(), row_of_pair_N.contiguous(),
                                   token_N.contiguous(), d_h, d_w, N, D,
                                   ACC=acc_dtype(h_ND.dtype, weight_N.dtype, grad_TD.dtype))
    return d_h, d_w
