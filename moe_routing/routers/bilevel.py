"""Bi-level routing (SMILE, He et al., arXiv 2212.05191; the node-local motivation of LocMoE, Li et al.,
arXiv 2401.13920): a node (group) router picks each token's group, an expert router picks experts within it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..decision import RoutingContext
from ..validation import check_bool, check_int
from .base import GatedRouter, param_factory, renormalized


class BilevelRouter(GatedRouter):
    """``p(e | x) = p(g(e) | x) * p(e | g(e), x)``: a softmax over the G groups (``group_weight`` [G, D]) times a
    softmax over the experts of each group (``weight`` [E, D], one softmax per group of E / G contiguous experts,
    the layout `AllToAllDispatcher` shards experts in). Each token first takes its ``groups_per_token`` most
    probable groups, then the k experts of highest ``p`` inside them; gates are ``p`` at the chosen experts
    (renormalised over the k when ``normalize``). With one group per token, all of a token's k experts sit on one
    node: it crosses the inter-node network at most once (SMILE's inter-node then intra-node routing).

    ``p`` is a distribution over experts (rows sum to 1), so balance losses read it as any softmax router's; the
    decision's ``logits_TE`` are ``log p``. `GroupBalanceLoss` is SMILE's inter-node balance term (the switch aux
    loss over groups); with `SwitchAuxLoss` over the experts it forms their additive two-level loss.

    Locality stats (when ``home_group`` is set, e.g. by `from_dispatcher`): ``cross_group_frac``, the fraction of
    routed pairs whose expert is outside the token's home group, and ``tokens_leaving_group``, the fraction of
    tokens with at least one such pair (padding included: the router does not see the mask).

    SMILE's paper gives the two routers and the additive loss in words and publishes no code: the product of
    the two softmaxes as the gate is our reading (at k = 1 with one group it is the product of their two Switch
    gates). SMILE routes a token to a node, then on that node to a GPU, and is described as having fewer router
    parameters than a flat router, which points to one intra-node router shared by all nodes (E / G outputs); here
    each group has its own within-group rows of ``weight`` [E, D] (sharing them is the special case of tied blocks).

    LocMoE itself routes top-1 over all experts (its Eqs. 2-3) and gets locality from a loss, not from a group-first
    choice: that setup is a top-1 `TopKRouter` with `SwitchAuxLoss` and `NodeLocalityLoss`; the locality loss also
    works with this router (`NodeLocalityLoss.from_router`).

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, groups_per_token * E / G] (1).
        num_groups: G, dividing E (None: 2 when 2 divides E and a group holds k experts, else 1).  groups_per_token: groups each token may use (1).
        home_group: this rank's group (locality stats), or None.
        normalize: renormalise the k gates (default: k > 1; at k = 1 it would make every gate 1 and raises).
        init_std, strict: as `GatedRouter`.
    Default losses: ``[SwitchAuxLoss(1e-2), GroupBalanceLoss(1e-2, num_groups)]``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, num_groups: Optional[int] = None,
                 groups_per_token: int = 1, home_group: Optional[int] = None, normalize: Optional[bool] = None,
                 init_std: float = 0.02, strict: bool = False, device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        if num_groups is None:  # two nodes when they fit the layer, else one
            num_groups = 2 if num_experts % 2 == 0 and top_k <= num_experts // 2 else 1
        self.num_groups = check_int("num_groups", num_groups, 1, num_experts)
        if num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
        self.groups_per_token = check_int("groups_per_token", groups_per_token, 1, num_groups)
        per = num_experts // num_groups
        if top_k > groups_per_token * per:
            raise ValueError(f"top_k={top_k} exceeds the {groups_per_token * per} experts of groups_per_token="
                             f"{groups_per_token} group(s) of {per}")
        self.home_group = None if home_group is None else check_int("home_group", home_group, 0, num_groups - 1)
        self.normalize = top_k > 1 if normalize is None else check_bool("normalize", normalize)
        if top_k == 1 and self.normalize:
            raise ValueError("BilevelRouter with top_k=1 and normalize=True gives every token a gate of exactly 1, "
                             "so the router gets no gradient from the task loss; use normalize=False")
        self.group_weight = nn.Parameter(torch.empty(num_groups, hidden_size, **param_factory(device, dtype)))
        nn.init.normal_(self.group_weight, std=self.init_std)

    @classmethod
    def from_dispatcher(cls, dispatcher, hidden_size: int, num_experts: int, top_k: int = 1, *,
                        ranks_per_group: int, **kwargs) -> "BilevelRouter":
        """A router whose groups are the nodes of ``dispatcher``'s expert layout (`dispatch.expert_groups`:
        ``ranks_per_group`` consecutive expert-parallel ranks per node) and whose home group is this rank's."""
        from ..dispatch.base import expert_groups

        group_E, home = expert_groups(dispatcher, num_experts, ranks_per_group)
        return cls(hidden_size, num_experts, top_k, num_groups=int(group_E.max()) + 1, home_group=home, **kwargs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_groups={self.num_groups}, groups_per_token={self.groups_per_token}, "
                f"home_group={self.home_group}")

    def default_losses(self) -> list:
        from ..losses.balance import SwitchAuxLoss
        from ..losses.bilevel import GroupBalanceLoss

        return [SwitchAuxLoss(1e-2), GroupBalanceLoss(1e-2, self.num_groups)]

    def group_of_expert(self, device=None) -> Tensor:
        """int64 [E]: the group of each expert (contiguous blocks of E / G)."""
        return torch.arange(self.num_experts, device=device) // (self.num_experts // self.num_groups)

    def gating(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        T, G = x_TD.shape[0], self.num_groups
        log_group_TG = (x_TD @ self.group_weight.t()).log_softmax(-1)
        log_within_TGP = (x_TD @ self.weight.t()).view(T, G, -1).log_softmax(-1)
        return (log_group_TG[:, :, None] + log_within_TGP).reshape(T, -1)

    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        T, G = scores_TE.shape[0], self.num_groups
        group_TG = scores_TE.view(T, G, -1).sum(-1)
        chosen_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
            1, group_TG.topk(self.groups_per_token, dim=-1).indices, True)
        allowed_TE = chosen_TG.repeat_interleave(self.num_experts // G, dim=1)
        return scores_TE.masked_fill(~allowed_TE, -1.0).topk(self.top_k, dim=-1).indices

    def gates(self, experts_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        gates_TK = scores_TE.gather(1, experts_TK)
        return renormalized(gates_TK) if self.normalize else gates_TK

    def choose(self, logits_TE, scores_TE, forced_TK, ctx, backend):
        experts_TK, gates_TK, extra = super().choose(logits_TE, scores_TE, forced_TK, ctx, backend)
        if self.home_group is not None:
            away_TK = self.group_of_expert(experts_TK.device)[experts_TK] != self.home_group
            extra = {**extra, "cross_group_frac": away_TK.double().mean(),
                     "tokens_leaving_group": away_TK.any(-1).double().mean()}
        return experts_TK, gates_TK, extra
