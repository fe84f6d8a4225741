"""Fused router top-k + softmax over ``logits_TE`` (one launch instead of topk, softmax and a gather).

Selection is on the logits (softmax is monotone, so this is the top-k of the probabilities without the ties that
rounding or underflow of the probabilities would add), in the order of a stable descending sort: NaN first
(lowest id among NaNs), then larger values, then the lowest expert id on ties. Round j takes the best entry that
ranks *after* round j-1's pick in that order, so no "taken" mask is needed and a NaN or -inf row still yields k
distinct ids in [0, E). Weights: softmax over the k chosen logits (default), or softmax over all E gathered at
the chosen ids (``softmax_before_topk``; renormalised over the k with ``normalize``). A NaN in a row makes that
row's weights NaN (as torch's softmax does). Math in float32 (float64 for float64 logits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_rows


@triton.jit
def _topk_softmax_kernel(logits_ptr, w_ptr, idx_ptr, T, E, K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                         NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    t_mask = t < T
    e_ok = (e < E)[None, :]
    x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :], mask=t_mask[:, None] & e_ok,
                other=0.0).to(ACC)  # rows past T read zeros: computed like any row, never stored
    is_nan = x != x
    prev_v = tl.zeros((BLOCK_T,), dtype=ACC)
    prev_i = tl.zeros((BLOCK_T,), dtype=tl.int32) - 1
    prev_nan = tl.zeros((BLOCK_T,), dtype=tl.int1)
    vals = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(K):
        if j == 0:
            elig = tl.broadcast_to(e_ok, (BLOCK_T, BLOCK_E))
        else:  # ranks after the previous pick: NaNs by id, then value descending, then id ascending
            later_id = e[None, :] > prev_i[:, None]
            after_nan = prev_nan[:, None] & ((is_nan & later_id) | ~is_nan)
            after_num = ~prev_nan[:, None] & ~is_nan & ((x < prev_v[:, None]) | ((x == prev_v[:, None]) & later_id))
            elig = e_ok & (after_nan | after_num)
        nan_pick = tl.min(tl.where(elig & is_nan, e[None, :], BLOCK_E), axis=1)
        num_elig = elig & ~is_nan
        best = tl.max(tl.where(num_elig, x, float("-inf")), axis=1)
        num_pick = tl.min(tl.where(num_elig & (x == best[:, None]), e[None, :], BLOCK_E), axis=1)
        pick = tl.where(nan_pick < BLOCK_E, nan_pick, num_pick)
        # E - j >= 1 entries are always eligible, so pick < E; the clamp only guards memory safety downstream
        pick = tl.minimum(pick, E - 1)
        v = tl.sum(tl.where(e[None, :] == pick[:, None], x, 0.0), axis=1)
        prev_v, prev_i, prev_nan = v, pick, v != v
        vals = tl.where(kk[None, :] == j, v[:, None], vals)
        ids = tl.where(kk[None, :] == j, pick[:, None], ids)
    k_ok = (kk < K)[None, :]
    top = tl.sum(tl.where(kk[None, :] == 0, vals, 0.0), axis=1)  # the row max (NaN when the row has a NaN)
    w = tl.where(k_ok, tl.exp(vals - top[:, None]), 0.0)
    if SOFTMAX_FIRST:
        denom = tl.sum(tl.where(e_ok, tl.exp(x - top[:, None]), 0.0), axis=1)
        w = w / denom[:, None]
        if NORMALIZE:
            w = w / tl.sum(w, axis=1)[:, None]
    else:
        w = w / tl.sum(w, axis=1)[:, None]
    out = t.to(tl.int64)[:, None] * K + kk[None, :]
    store_mask = t_mask[:, None] & k_ok
    tl.store(w_ptr + out, w, mask=store_mask)
    tl.store(idx_ptr + out, ids.to(tl.int64), mask=store_mask)


def topk_softmax(logits_TE: torch.Tensor, k: int, softmax_before_topk: bool = False,
                 normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32 (float64 for float64 logits), experts_TK int64) for ``logits_TE`` [T, E].

    Top-k logits then a softmax over them (default), or softmax over all E then the top-k probabilities
    (renormalised when ``normalize``). See the module docstring for the order (ties, NaN).
    """
    check_rows("logits_TE", logits_TE)
    T, E = logits_TE.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, E={E}], got {k!r}")
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    weights = torch.empty(T, k, dtype=acc, device=logits_TE.device)
    experts = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return weights, experts
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, 4096 // block_e))
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        logits_TE.contiguous(), weights, experts, T, E, K=k, SOFTMAX_FIRST=bool(softmax_before_topk),
        NORMALIZE=bool(normalize), ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_T=block_t,
        BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k))
    return weights, experts
