"""Mixture of Routers (MoR; Xia et al., arXiv 2503.23362): sub-routers vote, a learned main router weights them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..decision import RoutingContext
from ..validation import check_bool, check_int
from .base import GatedRouter, param_factory, renormalized


class MixtureOfRoutersRouter(GatedRouter):
    """``p(e | x) = sum_m a_m(x) softmax(x @ sub_weight[m].T)_e`` with ``a(x) = softmax(x @ main_weight.T)`` over the
    ``num_routers`` sub-routers; the top-k of ``p`` are the experts, their ``p`` the gate weights (renormalised over
    the k when ``normalize``).

    ``sub_weight`` [M, E, D] holds M independent linear sub-routers, each a softmax distribution over the experts
    (its vote); ``main_weight`` [M, D] is the learned main router that weights the votes per token. ``p`` is a
    distribution over experts (rows sum to 1), so the balance losses read it as they read a softmax router's
    scores. The decision's ``logits_TE`` are ``log p`` (computed as a log-sum-exp of the log-weights plus each
    sub-router's log-softmax, finite wherever the inputs are), so ``softmax(logits) = p``; a z-loss on them is 0.

    The paper describes the method in words only (several sub-routers select jointly, a learnable main router
    weights them) and its code (anonymous.4open.science/r/MoR-DFC6) could not be read: the softmax sub-routers,
    the softmax main router and the weighted sum of full distributions before one top-k are our reading of it.

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, E] (2).
        num_routers: M >= 1 sub-routers (4).
        normalize: renormalise the k gate weights to sum to 1; default True for k > 1. At k = 1 it would make
            every gate exactly 1 (no task gradient to the router) and raises.
        init_std: std of the normal initialisation of ``sub_weight`` and ``main_weight`` (0.02).
        strict: raise on non-finite logits on accelerators too (CPU always raises).
    Default losses: ``[SwitchAuxLoss(1e-2)]``. Routing replay (``forced_experts``) replaces the top-k and keeps
    the gates' gradient, as in every `GatedRouter`. No single [E, D] projection exists, so ERC does not apply.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, num_routers: int = 4,
                 normalize: Optional[bool] = None, init_std: float = 0.02, strict: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, gate_weight=False,
                         device=device, dtype=dtype)
        self.num_routers = check_int("num_routers", num_routers, 1)
        self.normalize = top_k > 1 if normalize is None else check_bool("normalize", normalize)
        if top_k == 1 and self.normalize:
            raise ValueError("MixtureOfRoutersRouter with top_k=1 and normalize=True gives every token a gate of "
                             "exactly 1, so the router gets no gradient from the task loss; use normalize=False")
        factory = param_factory(device, dtype)
        self.sub_weight = nn.Parameter(torch.empty(num_routers, num_experts, hidden_size, **factory))
        self.main_weight = nn.Parameter(torch.empty(num_routers, hidden_size, **factory))
        nn.init.normal_(self.sub_weight, std=self.init_std)
        nn.init.normal_(self.main_weight, std=self.init_std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_routers={self.num_routers}, normalize={self.normalize}"

    def gate_weight_ED(self) -> Optional[Tensor]:
        return None

    def router_weights(self, x_TD: Tensor) -> Tensor:
        """The main router's weights ``a`` [T, M] over the sub-routers (rows sum to 1)."""
        return (x_TD @ self.main_weight.t()).softmax(-1)

    def gating(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        log_a_TM = (x_TD @ self.main_weight.t()).log_softmax(-1)
        log_p_TME = torch.einsum("td,med->tme", x_TD, self.sub_weight).log_softmax(-1)
        return torch.logsumexp(log_a_TM[:, :, None] + log_p_TME, dim=1)

    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        return scores_TE.topk(self.top_k, dim=-1).indices

    def gates(self, experts_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        gates_TK = scores_TE.gather(1, experts_TK)
        return renormalized(gates_TK) if self.normalize else gates_TK
