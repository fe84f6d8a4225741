"""Expert-choice router (Zhou et al. 2022, arXiv 2202.09368): each expert picks its top-C tokens."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

from ..decision import RoutingContext, RoutingDecision
from ..validation import check_float
from .base import GatedRouter

_NOT_CAUSAL = ("ExpertChoiceRouter is not causal: which experts a token gets depends on every other token in the "
               "batch, later ones included, so autoregressive decoding cannot reproduce the routing seen in "
               "training (and training lets a token's routing depend on future tokens)")


class ExpertChoiceRouter(GatedRouter):
    """Experts choose tokens: ``scores = softmax_E(x @ weight.T)`` [T, E]; expert e takes the ``C`` tokens with the
    highest ``scores[:, e]``, ``C = min(ceil(capacity_factor * T / E), T)`` with T = non-padding tokens.

    Every expert serves exactly C tokens (perfect balance); a token gets 0..E experts, with gate weight
    ``scores[t, e]`` (not renormalised). Padding tokens are never chosen. The decision is variable-k
    (``top_k=None``), pairs sorted by token. Ties between equal scores are broken by ``torch.topk``.

    Args:
        hidden_size: D.  num_experts: E.
        top_k: nominal experts per token k (the layer's losses and capacity read it).
        capacity_factor: c in ``C = ceil(c * T / E)``; default ``top_k``, so tokens average k experts.
        init_std: std of the normal initialisation of ``weight``.
        strict: raise on non-finite logits on accelerators too (CPU always raises).
    Default losses: none (the load is balanced by construction). Routing replay (``forced_experts``) is not
    supported. Warns once per instance that it is not causal. ``decision.extra``: ``capacity`` (C),
    ``dropped_token_fraction`` (non-padding tokens with no expert), ``max_experts_per_token``.
    """

    variable_k = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *,
                 capacity_factor: Optional[float] = None, init_std: float = 0.02, strict: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        self.capacity_factor = check_float("capacity_factor", top_k if capacity_factor is None else capacity_factor,
                                           0.0, low_inclusive=False)
        self._warned_not_causal = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert ``min(ceil(capacity_factor * num_tokens / E), num_tokens)``."""
        # exact decimal arithmetic: in floats 1.1 * 100 / 10 is 11.000000000000002 and would round up to 12
        cap = math.ceil(Fraction(str(self.capacity_factor)) * num_tokens / self.num_experts)
        return min(cap, num_tokens)

    def default_losses(self) -> list:
        return []

    def choose_pairs(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> RoutingDecision:
        if not self._warned_not_causal:
            self._warned_not_causal = True
            warnings.warn(_NOT_CAUSAL, UserWarning, stacklevel=2)
        T, E = logits_TE.shape
        pad_T = None if ctx is None else ctx.padding_T(T)
        pad_T = None if pad_T is None else pad_T.to(logits_TE.device)
        num_valid = T if pad_T is None else int((~pad_T).sum())
        cap = self.capacity(num_valid)

        select_TE = scores_TE.detach()
        if pad_T is not None:
            # softmax scores are finite, so with C <= valid tokens no padding row reaches an expert's top C
            select_TE = select_TE.masked_fill(pad_T[:, None], float("-inf"))
        # every expert takes exactly C tokens, so N = E * C is known on the host: build the pairs by sorting
        # (token, expert) keys instead of a nonzero over a [T, E] mask, which would sync the host on accelerators
        idx_CE = select_TE.topk(cap, dim=0).indices
        key_N = (idx_CE * E + torch.arange(E, device=idx_CE.device)).reshape(-1).sort().values
        token_N, expert_N = key_N // E, key_N % E  # sorted by token, then expert
        weight_N = scores_TE[token_N, expert_N]

        per_token_T = torch.zeros(T, dtype=torch.long, device=token_N.device).index_add_(
            0, token_N, torch.ones_like(token_N))  # padding rows are never chosen: 0
        dropped_T = per_token_T == 0 if pad_T is None else (per_token_T == 0) & ~pad_T
        extra = {"capacity": torch.tensor(cap),
                 "dropped_token_fraction": dropped_T.sum().double() / max(num_valid, 1),
                 "max_experts_per_token": per_token_T.max()}
        return RoutingDecision(token_N=token_N, expert_N=expert_N, weight_N=weight_N, logits_TE=logits_TE,
                               scores_TE=scores_TE, num_experts=E, top_k=None, extra=extra)
