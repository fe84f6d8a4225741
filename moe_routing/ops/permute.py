"""Permute: gather token rows into expert-sorted order (one row per routed pair).

``x_ND = x_TD[src_token_N]`` with ``src_token_N = token_N[pair_of_row_N]`` (the token row each expert-sorted
row gathers; names in `ops.counts`). Backward is an unweighted combine:
``dx[t] = sum of dx_ND rows gathered from t``, accumulated in float32 (float64 for float64 inputs).
Registered as a `torch.library.custom_op` with a fake so `torch.compile` traces it.

The kernel backends' backward is token-major and needs each token's row range and the most rows any token
has; ``top_k`` (every token gathered exactly k times) and ``max_pairs`` (an upper bound) let it get both
without a host sync.
"""
# No `from __future__ import annotations` here: torch < 2.5 builds custom-op schemas from evaluated annotations.
from typing import Optional

import torch
from torch import Tensor

from .backend import accumulate_dtype, op_backend
from .counts import csr_offsets


@torch.library.custom_op("moe_routing::permute", mutates_args=())
def _permute(x_TD: Tensor, src_token_N: Tensor, backend: str, top_k: int = 0, max_pairs: int = 0) -> Tensor:
    if backend == "triton":
        from .._kernels import permute as kernel

        return kernel.permute(x_TD, src_token_N)
    if backend == "cuda":
        from . import cuda_ext

        return cuda_ext.permute(x_TD, src_token_N)
    return x_TD.index_select(0, src_token_N)


@_permute.register_fake
def _(x_TD: Tensor, src_token_N: Tensor, backend: str, top_k: int = 0, max_pairs: int = 0) -> Tensor:
    return x_TD.new_empty(src_token_N.shape[0], x_TD.shape[1])


@torch.library.custom_op("moe_routing::permute_backward", mutates_args=())
def _permute_backward(grad_ND: Tensor, src_token_N: Tensor, num_tokens: int, backend: str, top_k: int = 0,
                      max_pairs: int = 0) -> Tensor:
    if backend in ("triton", "cuda"):  # token-major unweighted combine: each token sums its rows, no atomics
        # each expert-sorted row acts as a "pair" of the token it came from; sorted by token, CSR by token
        tokens_sorted, rows_by_token = torch.sort(src_token_N, stable=True)
        offsets = csr_offsets(tokens_sorted, num_tokens, top_k)
        bound = top_k or max_pairs or None  # None: the kernel finds the max itself (a host sync)
        if backend == "cuda":
            from . import cuda_ext

            return cuda_ext.combine(grad_ND, None, rows_by_token, offsets, max_pairs=bound)
        from .._kernels import combine as kernel

        return kernel.combine(grad_ND, None, rows_by_token, offsets, max_pairs=bound)
    acc = accumulate_dtype(grad_ND.dtype)
    out = torch.zeros(num_tokens, grad_ND.shape[1], dtype=acc, device=grad_ND.device)
    out.index_add_(0, src_token_N, grad_ND.to(acc))
    return out.to(grad_ND.dtype)


@_permute_backward.register_fake
def _(grad_ND: Tensor, src_token_N: Tensor, num_tokens: int, backend: str, top_k: int = 0,
      max_pairs: int = 0) -> Tensor:
    return grad_ND.new_empty(num_tokens, grad_ND.shape[1])


def _setup(ctx, inputs, output) -> None:
    x_TD, src_token_N, backend, top_k, max_pairs = inputs
    ctx.save_for_backward(src_token_N)
    ctx.num_tokens, ctx.backend, ctx.top_k, ctx.max_pairs = x_TD.shape[0], backend, top_k, max_pairs


def _backward(ctx, grad_ND: Tensor):
    (src_token_N,) = ctx.saved_tensors
    grad_TD = _permute_backward(grad_ND.contiguous(), src_token_N, ctx.num_tokens, ctx.backend, ctx.top_k,
                                ctx.max_pairs)
    return grad_TD, None, None, None, None


_permute.register_autograd(_backward, setup_context=_setup)


def permute(x_TD: Tensor, src_token_N: Tensor, backend: str = "auto", top_k: Optional[int] = None,
            max_pairs: Optional[int] = None) -> Tensor:
    """Gather ``x_TD`` [T, D] rows ``src_token_N`` (int64 [N], values in [0, T)) into ``x_ND`` [N, D].

    Hints for the kernel backends' backward (ignored by the torch backend; a wrong hint gives wrong
    gradients there, so pass them only when they hold): ``top_k`` when every token appears exactly ``top_k``
    times in ``src_token_N`` (N == T*K); ``max_pairs`` an upper bound on how often any token appears.
    """
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D [T, D], got shape {tuple(x_TD.shape)}")
    if src_token_N.dim() != 1 or src_token_N.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"src_token_N must be a 1-D int32/int64 tensor, got {src_token_N.dtype} "
                        f"{tuple(src_token_N.shape)}")
    for name, v in (("top_k", top_k), ("max_pairs", max_pairs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    if top_k is not None and top_k * x_TD.shape[0] != src_token_N.shape[0]:
        raise ValueError(f"top_k={top_k} needs N = T*K = {top_k * x_TD.shape[0]} rows, "
                         f"got {src_token_N.shape[0]}")
    return _permute(x_TD.contiguous(), src_token_N.long(), op_backend(backend, x_TD.device), int(top_k or 0),
                    int(max_pairs or 0))
