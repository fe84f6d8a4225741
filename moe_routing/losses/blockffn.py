"""BlockFFN's CLS-aware training objectives (arXiv 2507.08771): activation locality and chunk sparsification.

Both follow the authors' code, thunlp/BlockFFN ``pretrain/cpm/dragonfly/activation_context.py``
(``transfer_regularization`` and ``chunk_regularization``) and ``blockffn.py`` (what they are fed), with
sequences and padding taken from `LossInputs` (``seq_T``, ``valid_T``) instead of their data loader's
segment indices and padded chunk layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import chunk_ids
from ..validation import check_bool, check_float, check_int
from .base import Loss, LossInputs

#: the authors' offsets: inside ``log(1 - p + 1e-5)`` and in the sum normalisation ``r / (sum r + 1e-5)``
_LOG_EPS = 1e-5
_SUM_EPS = 1e-5


def activation_locality_loss(logits_TE: Tensor, seq_T: Optional[Tensor] = None, valid_T: Optional[Tensor] = None,
                             steepness: float = 100.0) -> Tensor:
    """Mean over neighbour pairs (t-1, t) of one sequence, both non-padding, and over experts of
    ``BCE(sigmoid(a * l[t-1, e]), target = sigmoid(a * l[t, e]))`` on the raw router logits ``l``: the sharpened
    sigmoids approximate each token's activation pattern (``l > 0``), and the loss pulls neighbours' patterns
    together. Gradient flows into both tokens (the target is not detached, as in the authors' code). 0 when there
    is no pair.
    """
    T, E = logits_TE.shape
    if T < 2:
        return logits_TE.sum() * 0.0
    prev_TE, cur_TE = logits_TE[:-1] * steepness, logits_TE[1:] * steepness
    bce_TE = F.binary_cross_entropy_with_logits(prev_TE, torch.sigmoid(cur_TE), reduction="none")
    pair_T = torch.ones(T - 1, dtype=torch.bool, device=logits_TE.device)
    if seq_T is not None:
        pair_T = pair_T & (seq_T[1:] == seq_T[:-1])
    if valid_T is not None:
        pair_T = pair_T & valid_T[1:] & valid_T[:-1]
    w_T = pair_T.to(bce_TE.dtype)
    return (bce_TE * w_T[:, None]).sum() / (w_T.sum() * E).clamp_min(1)


def activation_probs(logits_TE: Tensor, eps: float = 1e-6) -> Tensor:
    """The authors' per-token expert activation probabilities ``r / (sum_e r + 1e-5)`` with ``r`` the RMS-normalised
    ReLU of the logits before RMSNorm's learned scale (``router_ori`` in their ``blockffn.py``)."""
    relu_TE = torch.relu(logits_TE)
    ori_TE = relu_TE * torch.rsqrt(relu_TE.pow(2).mean(-1, keepdim=True) + eps)
    return ori_TE / (ori_TE.sum(-1, keepdim=True) + _SUM_EPS)


def chunk_sparsification_loss(logits_TE: Tensor, chunk_len: int, seq_T: Optional[Tensor] = None, num_seqs: int = 1,
                              valid_T: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """``1 - mean_{chunk, e} prod_{t in chunk} (1 - p_te)``: the mean probability that an expert is used by a chunk of
    ``chunk_len`` consecutive tokens of a sequence (`moe_routing.metrics.chunk_ids`), with ``p`` from
    `activation_probs`, computed as ``exp(sum log(1 - p + 1e-5))`` as the authors do. Padding tokens use no expert;
    the mean runs over chunks holding a non-padding token (0 when there is none).
    """
    T, E = logits_TE.shape
    p_TE = activation_probs(logits_TE, eps)
    w_T = torch.ones(T, dtype=p_TE.dtype, device=p_TE.device) if valid_T is None else valid_T.to(p_TE.dtype)
    log_keep_TE = torch.log(1.0 - p_TE + _LOG_EPS) * w_T[:, None]
    chunk_T, C = chunk_ids(T, chunk_len, seq_T, num_seqs, device=p_TE.device)
    log_keep_CE = torch.zeros(C, E, dtype=p_TE.dtype, device=p_TE.device).index_add(0, chunk_T, log_keep_TE)
    live_C = torch.zeros(C, dtype=p_TE.dtype, device=p_TE.device).index_add(0, chunk_T, w_T) > 0
    used_CE = (1.0 - torch.exp(log_keep_CE)) * live_C[:, None].to(p_TE.dtype)
    return used_CE.sum() / (live_C.sum() * E).clamp_min(1)


class ActivationLocalityLoss(Loss):
    """``coeff * activation_locality_loss`` (BlockFFN's ALL; the authors' ``transfer_lambda``, 2e-3 in their runs,
    sigmoid steepness 100)."""

    name = "activation_locality"

    def __init__(self, coeff: float = 2e-3, steepness: float = 100.0) -> None:
        super().__init__(coeff)
        self.steepness = check_float("steepness", steepness, 0.0, low_inclusive=False)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        value = activation_locality_loss(inputs.decision.logits_TE, inputs.seq_T, inputs.valid_T, self.steepness)
        return value, {"activation_locality": value.detach()}


class ChunkSparsificationLoss(Loss):
    """``coeff * lambda * chunk_sparsification_loss`` (BlockFFN's CSL) on chunks of ``chunk_len`` tokens (64 in
    the authors' runs).

    ``adaptive=True`` (default): lambda is the router's adaptive coefficient (`BlockFFNRouter`'s controller,
    read through ``LossInputs.l1_coeff``; 5e-2 at the start in the authors' runs), so a router without one raises.
    ``adaptive=False``: lambda = 1, the coefficient is ``coeff`` alone. The raw loss is in the stats as ``csl``,
    which the router's controller follows.
    """

    name = "chunk_sparsification"

    def __init__(self, coeff: float = 1.0, chunk_len: int = 64, adaptive: bool = True, eps: float = 1e-6) -> None:
        super().__init__(coeff)
        self.chunk_len = check_int("chunk_len", chunk_len, 1)
        self.adaptive = check_bool("adaptive", adaptive)
        self.eps = check_float("eps", eps, 0.0, low_inclusive=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff:g}, chunk_len={self.chunk_len}, adaptive={self.adaptive})"

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        if self.adaptive and inputs.l1_coeff is None:
            raise TypeError("ChunkSparsificationLoss(adaptive=True) needs a router with an adaptive coefficient "
                            "(BlockFFNRouter): LossInputs.l1_coeff is None; pass adaptive=False for a fixed coeff")
        raw = chunk_sparsification_loss(inputs.decision.logits_TE, self.chunk_len, inputs.seq_T, inputs.num_seqs,
                                         inputs.valid_T, self.eps)
        stats = {"csl": raw.detach()}
        if not self.adaptive:
            return raw, stats
        stats["csl_coeff"] = inputs.l1_coeff.detach().clone()
        return inputs.l1_coeff * raw, stats
