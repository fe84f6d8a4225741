"""Routing-replay diagnostics and RSPO's router-shift weights.

- `router_shift_weights`: RSPO (Zhang et al., "Towards Stable and Effective Reinforcement Learning for
  Mixture-of-Experts", arXiv 2510.23027): a per-token trust weight from how far the router's log-probabilities
  of the *old* policy's chosen experts moved, to multiply importance ratios before clipping.
- `routing_mismatch`: how often two routings of the same tokens (inference vs training engine, old vs new
  policy) pick different expert sets.
- `logprob_mismatch`: the k3 KL estimate between training and inference token log-probs and the fraction of
  tokens whose probability ratio is outside [1/2, 2].

All results are tensors on the inputs' device (no host sync); read them with ``.item()`` when logging.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..validation import check_float


def _check_ids(name: str, ids: Tensor) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 3:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a [T, L, K] tensor of expert ids, got {got}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer expert ids, got dtype {ids.dtype}")


def _reported_TL(ids_TLK: Tensor) -> Tensor:
    """bool [T, L]: rows that hold a selection; a -1 anywhere in a row marks it unreported."""
    return (ids_TLK >= 0).all(-1)


def router_shift_weights(logp_old_TLE: Tensor, logp_new_TLE: Tensor, experts_old_TLK: Tensor,
                         gamma_min: float = 0.8) -> Tensor:
    """RSPO router-shift weight per token, ``max(stopgrad(gamma_t), gamma_min)`` [T].

    ``gamma_t = exp(-(1/(L*K)) * sum_l sum_{e in TopK_old^l(t)} |log p_new^l(e|x_t) - log p_old^l(e|x_t)|)``:
    1 when the router's log-probabilities of the experts the old policy chose did not move, smaller the further
    they moved. Multiply the token's importance ratio by it before clipping (arXiv 2510.23027).

    Args:
        logp_old_TLE: [T, L, E] router log-probabilities under the old (behaviour) policy.
        logp_new_TLE: [T, L, E] under the current policy (may require grad: the weight is detached).
        experts_old_TLK: [T, L, K] the old policy's chosen experts (any integer dtype). Rows holding -1
            (not reported) are left out: the mean runs over the token's reported (layer, expert) entries, and
            a token with none gets gamma 1 (no evidence of a shift).
        gamma_min: the floor in [0, 1] (RSPO keeps a token's update from vanishing entirely).

    Returns:
        [T] weights in [gamma_min, 1], dtype of ``logp_new_TLE``, no gradient.
    """
    gamma_min = check_float("gamma_min", gamma_min, 0.0, 1.0)
    _check_ids("experts_old_TLK", experts_old_TLK)
    for name, t in (("logp_old_TLE", logp_old_TLE), ("logp_new_TLE", logp_new_TLE)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point [T, L, E] tensor, got {got}")
    if logp_old_TLE.shape != logp_new_TLE.shape:
        raise ValueError(f"logp_old_TLE has shape {tuple(logp_old_TLE.shape)} but logp_new_TLE has "
                         f"{tuple(logp_new_TLE.shape)}")
    T, L, E = logp_new_TLE.shape
    if experts_old_TLK.shape[:2] != (T, L):
        raise ValueError(f"experts_old_TLK has shape {tuple(experts_old_TLK.shape)} but the log-probs have "
                         f"[T, L] = {[T, L]}")
    ids = experts_old_TLK.to(device=logp_new_TLE.device, dtype=torch.long)
    if ids.numel() and bool(((ids < -1) | (ids >= E)).any()):
        raise ValueError(f"experts_old_TLK has ids outside [0, {E}) (E from the log-probs; -1 marks unreported rows)")
    with torch.no_grad():
        reported_TL1 = _reported_TL(ids).unsqueeze(-1)
        safe = ids.clamp_min(0)
        shift_TLK = (logp_new_TLE.detach().gather(2, safe) - logp_old_TLE.detach().to(logp_new_TLE.dtype)
                     .gather(2, safe)).abs()
        shift_TLK = torch.where(reported_TL1, shift_TLK, torch.zeros_like(shift_TLK))
        count_T = (reported_TL1.sum((1, 2)) * ids.shape[2]).to(shift_TLK.dtype)
        mean_T = shift_TLK.sum((1, 2)) / count_T.clamp_min(1)
        return torch.exp(-mean_T).clamp_min(gamma_min)


@dataclass(frozen=True)
class RoutingMismatch:
    """How two routings of the same tokens differ (see `routing_mismatch`); every field is a float64 tensor.

    Attributes:
        per_layer_L: [L] fraction of the layer's compared tokens whose expert *set* differs.
        any_layer: 0-d, fraction of compared tokens whose set differs in at least one compared layer.
        jaccard: 0-d, mean over compared (token, layer) rows of ``|A & B| / |A | B|``.
        compared_L: [L] the number of (token, layer) rows compared per layer.
    """

    per_layer_L: Tensor
    any_layer: Tensor
    jaccard: Tensor
    compared_L: Tensor


def routing_mismatch(a_TLK: Tensor, b_TLK: Tensor, token_mask_T: Optional[Tensor] = None) -> RoutingMismatch:
    """Expert-set disagreement between two routings ``[T, L, K]`` of the same tokens (column order ignored).

    A (token, layer) row is compared only when both routings report it (no -1 in either row) and the token is
    kept by ``token_mask_T`` (bool [T], True = compare; e.g. not padding). A token counts towards ``any_layer``
    when at least one of its layers was compared. With nothing compared the fractions are 0 and ``jaccard`` 1 (no disagreement seen). The two
    routings may have different dtypes (uint8 record vs int16 engine layout).
    """
    _check_ids("a_TLK", a_TLK)
    _check_ids("b_TLK", b_TLK)
    if a_TLK.shape != b_TLK.shape:
        raise ValueError(f"a_TLK has shape {tuple(a_TLK.shape)} but b_TLK has {tuple(b_TLK.shape)}; routings of "
                         "the same tokens, layers and top-k are compared")
    a = a_TLK.long()
    b = b_TLK.to(device=a.device, dtype=torch.long)
    T, L, K = a.shape
    compared_TL = _reported_TL(a) & _reported_TL(b)
    if token_mask_T is not None:
        if (not isinstance(token_mask_T, Tensor) or token_mask_T.dtype != torch.bool
                or token_mask_T.shape != (T,)):
            got = f"{tuple(token_mask_T.shape)} {token_mask_T.dtype}" if isinstance(token_mask_T, Tensor) else \
                type(token_mask_T).__name__
            raise ValueError(f"token_mask_T must be a bool tensor of shape [{T}], got {got}")
        compared_TL = compared_TL & token_mask_T.to(a.device)[:, None]
    # per row, how many of a's experts appear in b (ids within a row are distinct, so this is |A & B|)
    inter_TL = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    differs_TL = (inter_TL < K) & compared_TL
    jaccard_TL = inter_TL.double() / (2 * K - inter_TL).double()
    w_TL = compared_TL.double()
    compared_L = w_TL.sum(0)
    per_layer_L = differs_TL.double().sum(0) / compared_L.clamp_min(1)
    token_compared_T = compared_TL.any(-1)
    any_layer = differs_TL.any(-1).double().sum() / token_compared_T.double().sum().clamp_min(1)
    n = w_TL.sum()
    jaccard = torch.where(n > 0, (jaccard_TL * w_TL).sum() / n.clamp_min(1), torch.ones((), dtype=torch.float64,
                                                                                          device=a.device))
    return RoutingMismatch(per_layer_L=per_layer_L, any_layer=any_layer, jaccard=jaccard, compared_L=compared_L)


@dataclass(frozen=True)
class LogprobMismatch:
    """Training vs inference token log-prob mismatch (see `logprob_mismatch`); float64 0-d tensors.

    Attributes:
        k3_kl: mean of ``exp(d) - 1 - d`` with ``d = logp_train - logp_infer``: the k3 estimate of
            KL(infer || train) from tokens sampled by the inference engine (>= 0, unbiased).
        frac_ratio_out_2x: fraction of tokens with ``|d| > ln 2``: the probability ratio outside [1/2, 2].
        num_tokens: tokens counted.
    """

    k3_kl: Tensor
    frac_ratio_out_2x: Tensor
    num_tokens: Tensor


def logprob_mismatch(logp_train: Tensor, logp_infer: Tensor, mask: Optional[Tensor] = None) -> LogprobMismatch:
    """k3 KL and large-ratio fraction between the trainer's and the engine's log-probs of the sampled tokens.

    Args:
        logp_train, logp_infer: same-shape float tensors (any shape, e.g. [B, S] or [T]); computed in float64.
        mask: bool of the same shape, True = count the token (response tokens, not prompt or padding);
            None counts all. No token counted gives 0.
    """
    for name, t in (("logp_train", logp_train), ("logp_infer", logp_infer)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if logp_train.shape != logp_infer.shape:
        raise ValueError(f"logp_train has shape {tuple(logp_train.shape)} but logp_infer has "
                         f"{tuple(logp_infer.shape)}")
    d = logp_train.detach().double() - logp_infer.detach().to(logp_train.device).double()
    if mask is None:
        w = torch.ones_like(d)
    else:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != d.shape:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape {tuple(d.shape)}, got {got}")
        w = mask.to(d.device).double()
        d = torch.where(mask.to(d.device), d, torch.zeros_like(d))  # masked-out entries may be -inf or NaN
    n = w.sum()
    k3 = ((torch.expm1(d) - d) * w).sum() / n.clamp_min(1)
    out = ((d.abs() > math.log(2.0)).double() * w).sum() / n.clamp_min(1)
    return LogprobMismatch(k3_kl=k3, frac_ratio_out_2x=out, num_tokens=n)
