"""Unpermute + combine: ``y[t] = sum over t's routed pairs p of weight_N[p] * h_ND[row_N[p]]``.

Accumulates in float32 (float64 for float64 inputs) and casts to ``h``'s dtype. Fixed-k decisions sum a
``[T, K, D]`` view in a fixed order; variable-k ones use ``index_add_`` (deterministic on CPU). Backward:
``dh[row_N[p]] = w[p] * dy[t]`` and ``dw[p] = <dy[t], h[row_N[p]]>``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import accumulate_dtype, resolve_backend, token_offsets


@torch.library.custom_op("moe_routing::combine", mutates_args=())
def _combine(h_ND: Tensor, weight_N: Tensor, row_N: Tensor, token_N: Tensor, num_tokens: int,
             top_k: int, backend: str) -> Tensor:
    if backend == "triton":
        from .._kernels import combine as kernel

        return kernel.combine(h_ND, weight_N, row_N, token_offsets(token_N, num_tokens, top_k), top_k or None)
    if backend == "cuda":
        from . import cuda_lib

        return cuda_lib.combine(h_ND, weight_N, row_N, token_offsets(token_N, num_tokens, top_k))
    acc = accumulate_dtype(h_ND.dtype, weight_N.dtype)
    D = h_ND.shape[1]
    if top_k > 0:  # y[t] = w[t, :] @ h[rows of t]: one gather and a batched GEMV, no [N, D] product
        h_TKD = h_ND.index_select(0, row_N).to(acc).view(num_tokens, top_k, D)
        y = torch.bmm(weight_N.to(acc).view(num_tokens, 1, top_k), h_TKD).view(num_tokens, D)
    else:
        weight_sorted = torch.empty_like(weight_N, dtype=acc).index_copy_(0, row_N, weight_N.to(acc))
        token_sorted = torch.empty_like(token_N).index_copy_(0, row_N, token_N)
        y = torch.zeros(num_tokens, D, dtype=acc, device=h_ND.device)
        y.index_add_(0, token_sorted, h_ND.to(acc) * weight_sorted[:, None])
    return y.to(h_ND.dtype)


@_combine.register_fake
def _(h_ND, weight_N, row_N, token_N, num_tokens, top_k, backend):
    return h_ND.new_empty(num_tokens, h_ND.shape[1])


@torch.library.custom_op("moe_routing::combine_backward", mutates_args=())
def _combine_backward(grad_TD: Tensor, h_ND: Tensor, weight_N: Tensor, row_N: Tensor,
                      token_N: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from .._kernels import combine as kernel

        return kernel.combine_backward(grad_TD, h_ND, weight_N, row_N, token_N)
    if backend == "cuda":
        from . import cuda_lib

        return cuda_lib.combine_backward(grad_TD, h_ND, weight_N, row_N, token_N)
    # Work in expert-sorted order: one gather of dy serves both gradients, and d_h needs no scatter.
    acc = accumulate_dtype(h_ND.dtype, weight_N.dtype, grad_TD.dtype)
    N, D = h_ND.shape
    token_sorted = torch.empty_like(token_N).index_copy_(0, row_N, token_N)
    weight_sorted = torch.empty_like(weight_N, dtype=acc).index_copy_(0, row_N, weight_N.to(acc))
    dy_ND = grad_TD.index_select(0, token_sorted).to(acc)
    d_weight_sorted = torch.bmm(dy_ND.view(N, 1, D), h_ND.to(acc).view(N, D, 1)).view(N)
    d_h_ND = (dy_ND * weight_sorted[:, None]).to(h_ND.dtype)
    return d_h_ND, d_weight_sorted.index_select(0, row_N).to(weight_N.dtype)


@_combine_backward.register_fake
def _(grad_TD, h_ND, weight_N, row_N, token_N, backend):
    return torch.empty_like(h_ND), torch.empty_like(weight_N)


def _setup(ctx, inputs, output) -> None:
    h_ND, weight_N, row_N, token_N, _, _, backend = inputs
    ctx.save_for_backward(h_ND, weight_N, row_N, token_N)
    ctx.backend = backend


def _backward(ctx, grad_TD: Tensor):
    h_ND, weight_N, row_N, token_N = ctx.saved_tensors
    d_h, d_w = _combine_backward(grad_TD.contiguous(), h_ND, weight_N, row_N, token_N, ctx.backend)
    return d_h, d_w, None, None, None, None, None


_combine.register_autograd(_backward, setup_context=_setup)


def combine(h_ND: Tensor, weight_N: Tensor, row_N: Tensor, token_N: Tensor, num_tokens: int,
            top_k: int | None = None, backend: str = "auto") -> Tensor:
    """Weighted sum of expert outputs back to tokens.

    Args:
        h_ND: [N, D] expert outputs in expert-sorted order.
        weight_N: [N] gate weight of each pair (pairs in token order).
        row_N: int64 [N] expert-sorted row of each pair (a permutation of [0, N)).
        token_N: int64 [N] token of each pair, non-decreasing.
        num_tokens: T.  top_k: K when every token has exactly K pairs (N == T*K, pair t*K+j), else None.
    Returns:
        y_TD [T, D] in ``h_ND``'s dtype.
    """
    N = h_ND.shape[0]
    if h_ND.dim() != 2:
        raise ValueError(f"h_ND must be 2-D [N, D], got shape {tuple(h_ND.shape)}")
    for name, t in (("weight_N", weight_N), ("row_N", row_N), ("token_N", token_N)):
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape [{N}] (one entry per row of h_ND), got {tuple(t.shape)}")
    if top_k is not None and top_k * num_tokens != N:
        raise ValueError(f"top_k={top_k} needs N = T*K = {num_tokens * top_k} pairs, got {N}")
    return _combine(h_ND.contiguous(), weight_N.contiguous(), row_N.long(), token_N.long(), int(num_tokens),
                    int(top_k or 0), resolve_backend(backend, h_ND.device))
