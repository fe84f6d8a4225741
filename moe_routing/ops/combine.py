"""Unpermute + combine: ``y[t] = sum over t's routed pairs p of weight_N[p] * h_ND[row_of_pair_N[p]]``.

Accumulates in float32 (float64 for float64 inputs) and casts to ``h``'s dtype. Fixed-k decisions sum a
``[T, K, D]`` view in a fixed order; variable-k ones use ``index_add_`` (deterministic on CPU). Backward:
``dh[row_of_pair_N[p]] = w[p] * dy[t]`` and ``dw[p] = <dy[t], h[row_of_pair_N[p]]>``, each only when its input
needs a gradient (the kernel backends compute both in one pass and drop the unneeded one).
"""
# No `from __future__ import annotations` here: torch < 2.5 builds custom-op schemas from evaluated annotations.
import torch
from torch import Tensor

from ..settings import debug_checks
from .backend import accumulate_dtype, op_backend
from .counts import csr_offsets


@torch.library.custom_op("moe_routing::combine", mutates_args=())
def _combine(h_ND: Tensor, weight_N: Tensor, row_of_pair_N: Tensor, token_N: Tensor, num_tokens: int,
             top_k: int, backend: str, max_pairs: int = 0) -> Tensor:
    if backend in ("triton", "cuda"):
        token_offsets_T1 = csr_offsets(token_N, num_tokens, top_k)
        bound = top_k or max_pairs or None  # None: the kernel finds the max itself (a host sync)
        if backend == "cuda":
            from . import cuda_ext

            return cuda_ext.combine(h_ND, weight_N, row_of_pair_N, token_offsets_T1, max_pairs=bound)
        from .._kernels import combine as kernel

        return kernel.combine(h_ND, weight_N, row_of_pair_N, token_offsets_T1, max_pairs=bound)
    acc = accumulate_dtype(h_ND.dtype, weight_N.dtype)
    D = h_ND.shape[1]
    if top_k > 0:  # y[t] = w[t, :] @ h[rows of t]: one gather and a batched GEMV, no [N, D] product
        h_TKD = h_ND.index_select(0, row_of_pair_N).to(acc).view(num_tokens, top_k, D)
        y = torch.bmm(weight_N.to(acc).view(num_tokens, 1, top_k), h_TKD).view(num_tokens, D)
    else:
        weight_sorted = torch.empty_like(weight_N, dtype=acc).index_copy_(0, row_of_pair_N, weight_N.to(acc))
        token_sorted = torch.empty_like(token_N).index_copy_(0, row_of_pair_N, token_N)
        y = torch.zeros(num_tokens, D, dtype=acc, device=h_ND.device)
        y.index_add_(0, token_sorted, h_ND.to(acc) * weight_sorted[:, None])
    return y.to(h_ND.dtype)


@_combine.register_fake
def _(h_ND, weight_N, row_of_pair_N, token_N, num_tokens, top_k, backend, max_pairs=0):
    return h_ND.new_empty(num_tokens, h_ND.shape[1])


@torch.library.custom_op("moe_routing::combine_backward", mutates_args=())
def _combine_backward(grad_TD: Tensor, h_ND: Tensor, weight_N: Tensor, row_of_pair_N: Tensor, token_N: Tensor,
                      backend: str, need_h: bool = True, need_weight: bool = True) -> tuple[Tensor, Tensor]:
    """(d_h_ND, d_weight_N); an unneeded one comes back as an empty tensor."""
    if backend in ("triton", "cuda"):
        if backend == "cuda":
            from . import cuda_ext

            d_h, d_w = cuda_ext.combine_backward(grad_TD, h_ND, weight_N, row_of_pair_N, token_N)
        else:
            from .._kernels import combine as kernel

            d_h, d_w = kernel.combine_backward(grad_TD, h_ND, weight_N, row_of_pair_N, token_N)
        return (d_h if need_h else h_ND.new_empty(0)), (d_w if need_weight else weight_N.new_empty(0))
    # Work in expert-sorted order: one gather of dy serves both gradients, and d_h needs no scatter.
    acc = accumulate_dtype(h_ND.dtype, weight_N.dtype, grad_TD.dtype)
    N, D = h_ND.shape
    token_sorted = torch.empty_like(token_N).index_copy_(0, row_of_pair_N, token_N)
    dy_ND = grad_TD.index_select(0, token_sorted).to(acc)
    d_h_ND, d_weight_N = h_ND.new_empty(0), weight_N.new_empty(0)
    if need_h:
        weight_sorted = torch.empty_like(weight_N, dtype=acc).index_copy_(0, row_of_pair_N, weight_N.to(acc))
        d_h_ND = (dy_ND * weight_sorted[:, None]).to(h_ND.dtype)
    if need_weight:
        d_weight_sorted = torch.bmm(dy_ND.view(N, 1, D), h_ND.to(acc).view(N, D, 1)).view(N)
        d_weight_N = d_weight_sorted.index_select(0, row_of_pair_N).to(weight_N.dtype)
    return d_h_ND, d_weight_N


@_combine_backward.register_fake
def _(grad_TD, h_ND, weight_N, row_of_pair_N, token_N, backend, need_h=True, need_weight=True):
    return (torch.empty_like(h_ND) if need_h else h_ND.new_empty(0),
            torch.empty_like(weight_N) if need_weight else weight_N.new_empty(0))


def _setup(ctx, inputs, output) -> None:
    h_ND, weight_N, row_of_pair_N, token_N, _, _, backend, _ = inputs
    ctx.save_for_backward(h_ND, weight_N, row_of_pair_N, token_N)
    ctx.backend = backend


def _backward(ctx, grad_TD: Tensor):
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None, None, None, None, None, None, None
    h_ND, weight_N, row_of_pair_N, token_N = ctx.saved_tensors
    d_h, d_w = _combine_backward(grad_TD.contiguous(), h_ND, weight_N, row_of_pair_N, token_N, ctx.backend, need_h,
                                 need_w)
    return (d_h if need_h else None), (d_w if need_w else None), None, None, None, None, None, None


_combine.register_autograd(_backward, setup_context=_setup)


def _check_pair_indices(row_of_pair_N: Tensor, token_N: Tensor, num_tokens: int) -> None:
    """Every backend gets the same checks: the kernels build CSR offsets from ``token_N`` by binary search, so
    an unsorted or out-of-range token id would silently drop or misassign pairs there (index_add_ would raise)."""
    N = token_N.numel()
    if token_N.is_floating_point() or row_of_pair_N.is_floating_point():
        raise ValueError(f"token_N and row_of_pair_N must be integer tensors, got {token_N.dtype}, "
                         f"{row_of_pair_N.dtype}")
    lo, hi = int(token_N.min()), int(token_N.max())
    if lo < 0 or hi >= num_tokens:
        raise ValueError(f"token_N has values in [{lo}, {hi}], outside [0, {num_tokens}) (num_tokens)")
    if N > 1 and bool((token_N[1:] < token_N[:-1]).any()):
        raise ValueError("token_N must be non-decreasing (pairs in token order)")
    lo, hi = int(row_of_pair_N.min()), int(row_of_pair_N.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"row_of_pair_N has values in [{lo}, {hi}], outside [0, {N}) (rows of h_ND)")


def combine(h_ND: Tensor, weight_N: Tensor, row_of_pair_N: Tensor, token_N: Tensor, num_tokens: int,
            top_k: int | None = None, backend: str = "auto", max_pairs: int | None = None, *,
            check_indices: bool = True) -> Tensor:
    """Weighted sum of expert outputs back to tokens.

    Args:
        h_ND: [N, D] expert outputs in expert-sorted order.
        weight_N: [N] gate weight of each pair (pairs in token order).
        row_of_pair_N: int64 [N] expert-sorted row of each pair (a permutation of [0, N);
            ``invert_permutation(pair_of_row_N)``).
        token_N: int64 [N] token of each pair, non-decreasing.
        num_tokens: T.  top_k: K when every token has exactly K pairs (N == T*K, pair t*K+j), else None.
        max_pairs: an upper bound on any token's pair count when ``top_k`` is None (e.g. K after capacity
            drops); the kernel backends then need no host sync. Ignored by the torch backend.
    Index values (``token_N`` sorted and in [0, T), ``row_of_pair_N`` in [0, N)) are checked for CPU tensors, and
    on accelerators with ``MOE_ROUTING_DEBUG=1`` (a host sync), on every backend alike; ``check_indices=False``
    skips that for callers whose indices are valid by construction (the layer's own dispatch).
    Returns:
        y_TD [T, D] in ``h_ND``'s dtype.
    """
    N = h_ND.shape[0]
    if h_ND.dim() != 2:
        raise ValueError(f"h_ND must be 2-D [N, D], got shape {tuple(h_ND.shape)}")
    for name, t in (("weight_N", weight_N), ("row_of_pair_N", row_of_pair_N), ("token_N", token_N)):
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape [{N}] (one entry per row of h_ND), got {tuple(t.shape)}")
    if top_k is not None and top_k * num_tokens != N:
        raise ValueError(f"top_k={top_k} needs N = T*K = {num_tokens * top_k} pairs, got {N}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs must be None or a positive int, got {max_pairs!r}")
    if (check_indices and N and not torch.compiler.is_compiling()
            and (token_N.device.type == "cpu" or debug_checks())):
        _check_pair_indices(row_of_pair_N, token_N, int(num_tokens))
    return _combine(h_ND.contiguous(), weight_N.contiguous(), row_of_pair_N.long(), token_N.long(), int(num_tokens),
                    int(top_k or 0), op_backend(backend, h_ND.device), int(max_pairs or 0))
