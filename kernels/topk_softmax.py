"""Fused router top-k + softmax over ``logits_TE`` (one launch instead of softmax, topk and a gather).

Selection is k rounds of max-and-mask; ties go to the lowest expert id. Math in float32 (float64 inputs stay
float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_kernel(logits_ptr, w_ptr, idx_ptr, T, E, K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                         NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_mask = t < T
    mask = t_mask[:, None] & (e < E)[None, :]
    x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :], mask=mask, other=float("-inf")).to(ACC)
    x = tl.where(t_mask[:, None], x, 0.0)  # rows past T: finite values, never stored
    row_max = tl.max(x, axis=1)
    if SOFTMAX_FIRST:
        p = tl.exp(x - row_max[:, None])
        x = p / tl.sum(p, axis=1)[:, None]
    first = tl.zeros((BLOCK_T,), dtype=ACC)
    total = tl.zeros((BLOCK_T,), dtype=ACC)
    for j in tl.static_range(K):
        best = tl.max(x, axis=1)
        is_best = x == best[:, None]
        choice = tl.min(tl.where(is_best, e[None, :], BLOCK_E), axis=1)
        if j == 0:
            first = best
        if SOFTMAX_FIRST:
            val = best
        else:
            val = tl.exp(best - first)
        total += val
        tl.store(w_ptr + t * K + j, val, mask=t_mask)
        tl.store(idx_ptr + t * K + j, choice.to(tl.int64), mask=t_mask)
        x = tl.where(e[None, :] == choice[:, None], float("-inf"), x)
    if (not SOFTMAX_FIRST) or NORMALIZE:
        for j in tl.static_range(K):
            w = tl.load(w_ptr + t * K + j, mask=t_mask, other=1.0)
            tl.store(w_ptr + t * K + j, w / total, mask=t_mask)


def topk_softmax(logits_TE: torch.Tensor, k: int, softmax_before_topk: bool = False,
                 normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, experts_TK int64): top-k logits then softmax over them (default), or softmax over all E
    then the top-k probabilities (renormalised when ``normalize``)."""
    if logits_TE.dim() != 2 or not logits_TE.dtype.is_floating_point:
        raise ValueError(f"logits_TE must be a 2-D floating tensor, got {logits_TE.dtype} {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, {E}], got {k}")
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    weights = torch.empty(T, k, dtype=acc, device=logits_TE.device)
    experts = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return weights, experts
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, 4096 // block_e))
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        logits_TE.contiguous(), weights, experts, T, E, K=k, SOFTMAX_FIRST=softmax_before_topk,
        NORMALIZE=normalize, ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_T=block_t,
        BLOCK_E=block_e)
    return weights, experts
