"""Expert-choice router (Zhou et al. 2022, arXiv 2202.09368): each expert picks its top-C tokens."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from .base import Router, check_finite_logits

_NOT_CAUSAL = ("ExpertChoiceRouter is not causal: which experts a token gets depends on every other token in the "
               "batch, later ones included, so autoregressive decoding cannot reproduce the routing seen in "
               "training (and training lets a token's routing depend on future tokens)")


class ExpertChoiceRouter(Router):
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

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *,
                 capacity_factor: Optional[float] = None, init_std: float = 0.02, strict: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if capacity_factor is None:
            capacity_factor = top_k
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor must be a number, got {capacity_factor!r}")
        if not 0 < capacity_factor < math.inf:
            raise ValueError(f"capacity_factor must be > 0 and finite, got {capacity_factor!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std >= 0:
            raise ValueError(f"init_std must be a number >= 0, got {init_std!r}")
        self.top_k, self.capacity_factor, self.strict = top_k, capacity_factor, strict
        factory = {"device": device, "dtype": torch.float32 if dtype in (None, torch.float16, torch.bfloat16)
                   else dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        nn.init.normal_(self.weight, std=init_std)
        self._warned_not_causal = False

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}")

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert ``min(ceil(capacity_factor * num_tokens / E), num_tokens)``."""
        # exact decimal arithmetic: in floats 1.1 * 100 / 10 is 11.000000000000002 and would round up to 12
        cap = math.ceil(Fraction(str(self.capacity_factor)) * num_tokens / self.num_experts)
        return min(cap, num_tokens)

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object) -> RoutingDecision:
        if ctx is not None and layer_key in ctx.forced_experts:
            raise ValueError("ExpertChoiceRouter does not support forced_experts (routing replay): experts choose "
                             "tokens, so there is no per-token [T, K] choice to replay")
        if not self._warned_not_causal:
            self._warned_not_causal = True
            warnings.warn(_NOT_CAUSAL, UserWarning, stacklevel=2)
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = x_TD @ self.weight.t()
        logits_TE, nonfinite = check_finite_logits(logits_TE, self.strict)
        scores_TE = logits_TE.softmax(-1)
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
        if nonfinite is not None:
            extra["nonfinite_tokens"] = nonfinite
        return RoutingDecision(token_N=token_N, expert_N=expert_N, weight_N=weight_N, logits_TE=logits_TE,
                               scores_TE=scores_TE, num_experts=E, top_k=None, score_func="softmax", extra=extra)
