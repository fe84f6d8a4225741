"""LocMoE's locality loss (Li et al., "LocMoE: A Low-Overhead MoE for Large Language Model Training", arXiv
2401.13920, Sec. 3.2 "Localized Bias Weighting Loss", Eq. 6), in a finite form: pull each token's routing mass
onto the experts of the node (expert-parallel group) that holds the token.

What the paper writes: ``L_loc = mu KL(D_c || D_l) = -mu int D_c(x) ln[D_l(x) / D_c(x)] dx``, with ``D_c`` "the
current distribution" ("the assignment distribution of all experts in the current batch") and ``D_l`` "the fully
localized distribution"; ``mu`` is a hyperparameter whose value is not given, and no code is published. As
written the loss is infinite: ``D_l`` is zero on every remote expert while a softmax ``D_c`` is positive there,
so ``D_c ln(D_c / D_l)`` diverges -- whichever fully localized ``D_l`` is meant.

What we compute: the divergence the other way round, from the fully localized distribution closest to the
current one. Over all distributions ``q`` that put the whole mass of each token on its own node's experts,
``min_q KL(q || D_c)`` is reached at ``D_c`` restricted to those experts and renormalised (an I-projection), and
its value is ``-ln(local mass)``. With ``D_c`` the batch's distribution over (token, expert) pairs,
``p_te / T``:

    node_locality = -ln( (1/T) sum_t m_t ),   m_t = sum_{e on node(t)} p_te

(``per_token=True``: the same projection token by token, ``(1/T) sum_t -ln m_t``, the cross-entropy of the
token's node under the router's node marginal). Both are 0 exactly when every token keeps all its mass at home,
need no smoothing constant, and have bounded gradients with respect to softmax logits (per token, ``p_te (m_t -
1[e local]) / m_t`` lies in [-1, 1]). When all tokens sit on one node -- the expert-parallel case: the node of a
token is that of the rank holding it -- ``(1/T) sum_t m_t`` is the local share of the paper's ``P_i`` (Eq. 5),
so the batch form is the paper's batch-level ``D_c`` with the direction of the KL reversed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..decision import RoutingDecision
from ..validation import check_bool, check_int
from .base import Loss, LossInputs


def _expert_groups(num_experts: int, num_groups: int, device) -> Tensor:
    """int64 [E]: contiguous blocks of E / G experts per group (`AllToAllDispatcher`'s layout)."""
    return torch.arange(num_experts, device=device) // (num_experts // num_groups)


def local_mass(decision: RoutingDecision, num_groups: int, node_T: Tensor) -> Tensor:
    """``m_T`` [T]: each token's routing probability (``decision.probs_TE``) on the experts of its node ``node_T``
    (int64 [T] in [0, G)); experts form ``num_groups`` contiguous blocks."""
    p_TE = decision.probs_TE
    local_TE = _expert_groups(decision.num_experts, num_groups, p_TE.device)[None, :] == node_T[:, None]
    return (p_TE * local_TE.to(p_TE.dtype)).sum(-1)


def node_locality_loss(decision: RoutingDecision, num_groups: int, node_T: Tensor, valid_T: Optional[Tensor] = None,
                       per_token: bool = False) -> Tensor:
    """``-ln(mean_t m_t)`` (or ``mean_t -ln m_t`` with ``per_token``) over non-padding tokens, ``m_t`` the
    `local_mass`; 0 when there is no token. ``m`` is clamped to [tiny, 1] so a float32 underflow or a rounding
    overshoot stays finite."""
    m_T = local_mass(decision, num_groups, node_T)
    tiny = torch.finfo(m_T.dtype).tiny
    w_T = m_T.new_ones(m_T.shape) if valid_T is None else valid_T.to(m_T.dtype)
    count = w_T.sum()
    if per_token:
        return (-torch.log(m_T.clamp(tiny, 1.0)) * w_T).sum() / count.clamp_min(1)
    mean_mass = (m_T * w_T).sum() / count.clamp_min(1)
    return torch.where(count > 0, -torch.log(mean_mass.clamp(tiny, 1.0)), torch.zeros_like(mean_mass))


class NodeLocalityLoss(Loss):
    """``coeff * node_locality_loss``: LocMoE's locality loss, finite form (module docstring).

    Layout: experts in ``num_groups`` contiguous blocks (nodes), as `BilevelRouter` and `expert_groups` lay them
    out. Node of each token: ``home_group`` for every token (a rank's own node: `from_dispatcher`), else
    ``token_groups`` (int [T], a fixed token -> node map for single-process runs; the batch must have T tokens),
    else the batch split in order into G equal blocks (token t on node ``t * G // T``, as if G data-parallel nodes
    each held a contiguous slice). Use `from_dispatcher` for an expert-parallel layer and `from_router` to copy
    a `BilevelRouter`'s groups and home group.

    The paper pairs it with the switch aux loss (its Eq. 7: task loss = aux + locality + cross-entropy): with one
    home node for all tokens it works against `GroupBalanceLoss` on that rank, by design. The router's weights are
    shared by every rank, so the loss keeps tokens home only where what a node holds differs from the other nodes'
    data (the paper's same-domain tokens); on identically distributed shards the ranks' pulls cancel. ``coeff``
    (the paper's ``mu``) has no published value; 1e-2 matches the aux loss's.

    Stats (detached): ``node_locality`` (without the coefficient), ``local_mass`` (mean ``m_t``),
    ``cross_node_frac`` (routed pairs whose expert is off the token's node) and ``tokens_leaving_node`` (tokens
    with at least one such pair), over non-padding tokens.
    """

    name = "node_locality"

    def __init__(self, coeff: float = 1e-2, num_groups: int = 2, *, home_group: Optional[int] = None,
                 token_groups: Optional[Tensor] = None, per_token: bool = False) -> None:
        super().__init__(coeff)
        self.num_groups = check_int("num_groups", num_groups, 1)
        self.per_token = check_bool("per_token", per_token)
        if home_group is not None and token_groups is not None:
            raise ValueError("NodeLocalityLoss takes home_group (every token on one node) or token_groups (a node "
                             "per token), not both")
        self.home_group = None if home_group is None else check_int("home_group", home_group, 0, num_groups - 1)
        self.token_groups = None if token_groups is None else self._checked_map(token_groups)

    def _checked_map(self, token_groups: Tensor) -> Tensor:
        if not isinstance(token_groups, Tensor) or token_groups.dim() != 1 or token_groups.is_floating_point() \
                or token_groups.dtype == torch.bool:
            raise TypeError(f"token_groups must be a 1-D integer tensor [T] of node ids, got "
                            f"{type(token_groups).__name__} {getattr(token_groups, 'dtype', '')} "
                            f"{tuple(getattr(token_groups, 'shape', ()))}")
        if token_groups.numel() and (int(token_groups.min()) < 0 or int(token_groups.max()) >= self.num_groups):
            raise ValueError(f"token_groups must hold node ids in [0, {self.num_groups - 1}] (num_groups="
                             f"{self.num_groups}), got values in [{int(token_groups.min())}, "
                             f"{int(token_groups.max())}]")
        return token_groups.detach().to(torch.long).clone()

    @classmethod
    def from_dispatcher(cls, dispatcher, num_experts: int, ranks_per_group: int, coeff: float = 1e-2,
                        **kwargs) -> "NodeLocalityLoss":
        """The loss for a layer on ``dispatcher``: nodes of ``ranks_per_group`` consecutive expert-parallel ranks
        (`dispatch.expert_groups`), every token of this rank on this rank's node."""
        from ..dispatch.base import expert_groups

        group_E, home = expert_groups(dispatcher, num_experts, ranks_per_group)
        return cls(coeff, int(group_E.max()) + 1, home_group=int(home), **kwargs)

    @classmethod
    def from_router(cls, router, coeff: float = 1e-2, **kwargs) -> "NodeLocalityLoss":
        """The loss on ``router``'s groups (``router.num_groups``, e.g. a `BilevelRouter`) and, when it has one,
        its ``home_group``."""
        num_groups = getattr(router, "num_groups", None)
        if num_groups is None:
            raise TypeError(f"NodeLocalityLoss.from_router needs a router with num_groups (e.g. BilevelRouter), got "
                            f"{type(router).__name__} with num_groups=None")
        home = getattr(router, "home_group", None)
        if home is not None and "token_groups" not in kwargs:
            kwargs.setdefault("home_group", home)
        return cls(coeff, num_groups, **kwargs)

    def __repr__(self) -> str:
        where = (f"home_group={self.home_group}" if self.home_group is not None else
                 "token_groups=[...]" if self.token_groups is not None else "token_groups=blocks")
        return (f"{type(self).__name__}(coeff={self.coeff:g}, num_groups={self.num_groups}, {where}, "
                f"per_token={self.per_token})")

    def token_nodes(self, num_tokens: int, device=None) -> Tensor:
        """int64 [T]: the node of each of ``num_tokens`` tokens."""
        if self.home_group is not None:
            return torch.full((num_tokens,), self.home_group, dtype=torch.long, device=device)
        if self.token_groups is not None:
            if self.token_groups.numel() != num_tokens:
                raise ValueError(f"token_groups has {self.token_groups.numel()} entries but the batch has "
                                 f"{num_tokens} tokens")
            return self.token_groups.to(device)
        return torch.arange(num_tokens, device=device) * self.num_groups // max(num_tokens, 1)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        d, G = inputs.decision, self.num_groups
        if d.num_experts % G:
            raise ValueError(f"NodeLocalityLoss num_groups={G} must divide the layer's num_experts={d.num_experts}")
        node_T = self.token_nodes(d.num_tokens, d.scores_TE.device)
        value = node_locality_loss(d, G, node_T, inputs.valid_T, self.per_token)
        return value, {"node_locality": value.detach(), **self._stats(d, node_T, inputs.valid_T)}

    def _stats(self, d: RoutingDecision, node_T: Tensor, valid_T: Optional[Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            T = d.num_tokens
            w_T = torch.ones(T, dtype=torch.float64, device=node_T.device) if valid_T is None \
                else valid_T.to(torch.float64)
            count = w_T.sum().clamp_min(1)
            m_T = local_mass(d, self.num_groups, node_T).double()
            away_N = (_expert_groups(d.num_experts, self.num_groups, node_T.device)[d.expert_N]
                      != node_T[d.token_N]).double() * w_T[d.token_N]
            away_T = torch.zeros(T, dtype=torch.float64, device=node_T.device).index_add_(0, d.token_N, away_N)
            pairs = w_T[d.token_N].sum().clamp_min(1)
            return {"local_mass": (m_T * w_T).sum() / count, "cross_node_frac": away_N.sum() / pairs,
                    "tokens_leaving_node": ((away_T > 0).double() * w_T).sum() / count}
