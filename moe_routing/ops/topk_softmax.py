"""Fused router top-k + softmax: ``(weights_TK, experts_TK) = topk_softmax(logits_TE, k)``.

One `torch.library.custom_op` (with a fake, so `torch.compile` traces it) whose forward runs the chosen backend
(torch reference, the Triton kernel in ``kernels/topk_softmax.py``, or the CUDA C++ twin ``csrc/topk_softmax.cu``)
and whose backward is plain torch on the saved weights.

Semantics (every backend):
    experts_TK: the k largest logits per row in the order of ``torch.sort(descending=True, stable=True)``:
        NaN first (lowest id among NaNs), then larger values, **ties to the lowest expert id**. This is not
        always ``torch.topk``'s choice on exact ties (on CPU ``torch.zeros(8).topk(3)`` returns ids 6, 5, 4);
        ids are always k distinct values in [0, E), also for rows with NaN or -inf.
        Selection is on the logits even for ``softmax_before_topk`` (softmax is monotone; probabilities that
        round or underflow to equal values would only add ties).
    weights_TK: softmax over the k chosen logits (default, Mixtral/Qwen), or with ``softmax_before_topk`` the
        softmax over all E gathered at the chosen ids (renormalised over the k when ``normalize``, which equals
        the default). float32, float64 for float64 logits. A row with a NaN gets NaN weights.
Gradient (to the logits): softmax over the chosen k (default, or ``normalize``): only the chosen entries,
``d_l[e_j] = w_j (g_j - sum_i g_i w_i)``. Full softmax without ``normalize``: every entry,
``d_l = p * (g_hat - <g_hat, p>)`` with ``g_hat`` the gradient scattered to the chosen ids.
"""
# No `from __future__ import annotations` here: torch < 2.5 builds custom-op schemas from evaluated annotations.
import torch
from torch import Tensor

from .backend import accumulate_dtype, op_backend


def _select(x_TE: Tensor, k: int) -> Tensor:
    """Ids of a stable descending sort's first k, at `torch.topk`'s cost: topk picks the values, and only rows
    where its id choice among equal values (or NaNs) could differ are redone with the stable sort."""
    vals_TK, idx_TK = x_TE.topk(k, dim=-1)
    kth_T1 = vals_TK[:, -1:]
    tie_at_cut = (x_TE == kth_T1).sum(-1) != (vals_TK == kth_T1).sum(-1)  # the k-th value also left out
    tie_inside = ((vals_TK[:, 1:] == vals_TK[:, :-1]) & (idx_TK[:, 1:] < idx_TK[:, :-1])).any(-1)
    redo_T = tie_at_cut | tie_inside | torch.isnan(vals_TK).any(-1)
    if bool(redo_T.any()):  # a host sync, but only in this reference backend (kernels need none)
        rows = redo_T.nonzero().squeeze(1)
        idx_TK = idx_TK.clone()
        idx_TK[rows] = torch.sort(x_TE[rows], dim=-1, descending=True, stable=True).indices[:, :k]
    return idx_TK.contiguous()


def _reference(logits_TE: Tensor, k: int, softmax_before_topk: bool, normalize: bool) -> tuple[Tensor, Tensor]:
    x = logits_TE.to(accumulate_dtype(logits_TE.dtype))
    experts_TK = _select(x, k)
    if softmax_before_topk and not normalize:
        return x.softmax(-1).gather(1, experts_TK), experts_TK
    return x.gather(1, experts_TK).softmax(-1), experts_TK


@torch.library.custom_op("moe_routing::topk_softmax", mutates_args=())
def _topk_softmax(logits_TE: Tensor, k: int, softmax_before_topk: bool, normalize: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from .._kernels import topk_softmax as kernel

        return kernel.topk_softmax(logits_TE, k, softmax_before_topk, normalize)
    if backend == "cuda":
        from . import cuda_ext

        return cuda_ext.topk_softmax(logits_TE, k, softmax_before_topk, normalize)
    return _reference(logits_TE, k, softmax_before_topk, normalize)


@_topk_softmax.register_fake
def _(logits_TE, k, softmax_before_topk, normalize, backend):
    T = logits_TE.shape[0]
    acc = accumulate_dtype(logits_TE.dtype)
    return logits_TE.new_empty(T, k, dtype=acc), logits_TE.new_empty(T, k, dtype=torch.int64)


def _setup(ctx, inputs, output) -> None:
    logits_TE, _, softmax_before_topk, normalize, _ = inputs
    weights_TK, experts_TK = output
    ctx.full_softmax = bool(softmax_before_topk and not normalize)
    ctx.num_experts, ctx.logits_dtype = logits_TE.shape[1], logits_TE.dtype
    ctx.mark_non_differentiable(experts_TK)
    ctx.save_for_backward(weights_TK, experts_TK, logits_TE if ctx.full_softmax else None)


def _backward(ctx, grad_w_TK, _grad_experts):
    weights_TK, experts_TK, logits_TE = ctx.saved_tensors
    if grad_w_TK is None:
        return None, None, None, None, None
    g_TK = grad_w_TK.to(weights_TK.dtype)
    T = weights_TK.shape[0]
    if ctx.full_softmax:  # p_e for every e depends on every logit
        p_TE = logits_TE.to(weights_TK.dtype).softmax(-1)
        g_TE = torch.zeros_like(p_TE).scatter_(1, experts_TK, g_TK)  # ids are distinct within a row
        d_TE = p_TE * (g_TE - (g_TE * p_TE).sum(-1, keepdim=True))
    else:  # softmax over the chosen k only: the other logits do not enter the weights
        d_TK = weights_TK * (g_TK - (g_TK * weights_TK).sum(-1, keepdim=True))
        d_TE = weights_TK.new_zeros(T, ctx.num_experts).scatter_(1, experts_TK, d_TK)
    return d_TE.to(ctx.logits_dtype), None, None, None, None


_topk_softmax.register_autograd(_backward, setup_context=_setup)


def topk_softmax(logits_TE: Tensor, k: int, backend: str = "auto", *, softmax_before_topk: bool = False,
                 normalize: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k experts and their gate weights from router logits, in one op.

    Args:
        logits_TE: [T, E] floating router logits.
        k: experts per token, an int in [1, E].
        backend: "auto" (Triton for CUDA tensors, else torch), "torch", "triton" or "cuda".
        softmax_before_topk: weights from the softmax over all E instead of over the k chosen logits.
        normalize: with ``softmax_before_topk``, renormalise the k weights to sum to 1.
    Returns:
        weights_TK: [T, k] float32 (float64 for float64 logits).  experts_TK: [T, k] int64, distinct ids in
        [0, E), ties to the lowest id (see the module docstring).
    """
    if not isinstance(logits_TE, Tensor):
        raise TypeError(f"logits_TE must be a torch.Tensor, got {type(logits_TE).__name__}")
    if not logits_TE.is_floating_point():
        raise TypeError(f"logits_TE must be a floating tensor, got {logits_TE.dtype}")
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be 2-D [T, E], got shape {tuple(logits_TE.shape)}")
    E = logits_TE.shape[1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    for name, flag in (("softmax_before_topk", softmax_before_topk), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return _topk_softmax(logits_TE.contiguous(), k, softmax_before_topk, normalize,
                         op_backend(backend, logits_TE.device))
