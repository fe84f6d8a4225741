"""The token-dispatcher seam: what a dispatcher returns (`DispatchMeta`), the `Dispatcher` interface, and the
capacity step every dispatcher shares.

A layer calls ``x_ND, counts_E, offsets_E1, meta = dispatcher.dispatch(x_TD, decision, valid_T, ...)``, runs its
experts on the rows (``experts(x_ND, counts_E, offsets_E1)``) and calls ``dispatcher.combine(h_ND, meta)`` to get
``y_TD``. Where the rows come from -- this device's tokens (`LocalDispatcher`) or every rank's tokens for the
experts this rank holds (`AllToAllDispatcher`) -- is the dispatcher's business; the layer does no dispatch math.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..decision import RoutingDecision
from ..experts import GroupedExperts
from ..ops.capacity import capacity_keep_mask, expert_capacity


@dataclass(frozen=True)
class DispatchMeta:
    """What `Dispatcher.combine` needs to bring expert outputs back to tokens, plus the routing counts.

    Attributes:
        pair_of_row_N: int64 [N], the order: the (kept) pair placed at expert-sorted row j of this rank's sort.
        row_of_pair_N: int64 [N], the inverse order: the expert-sorted row of each pair.
        token_N: int64 [N] token of each kept pair (token order).  weight_N: [N] its gate weight.
        num_tokens: T.  top_k: K when every token kept exactly K pairs (N == T*K), else None.
        max_pairs: an upper bound on any token's pair count (the kernels' backward hint), or None.
        routed: 0-d int64, pairs of non-padding tokens the router chose.  dropped: 0-d int64, of those, the pairs
            capacity dropped.
        keep_N: bool [N_routed] capacity keep-mask over the router's pairs (None in dropless mode).
        load_E: int64 [E] pairs of this rank's non-padding tokens that each (global) expert computes.
        backend: the resolved kernel backend the ops ran with.
        exchange: dispatcher-specific state (`AllToAllDispatcher`: the split sizes and the local order), or None.
    """

    pair_of_row_N: Tensor
    row_of_pair_N: Tensor
    token_N: Tensor
    weight_N: Tensor
    num_tokens: int
    top_k: Optional[int]
    max_pairs: Optional[int]
    routed: Tensor
    dropped: Tensor
    keep_N: Optional[Tensor]
    load_E: Tensor
    backend: str
    exchange: Any = None


@dataclass(frozen=True)
class RoutedPairs:
    """The pairs a dispatcher moves, after capacity (`select_pairs`)."""

    token_N: Tensor
    expert_N: Tensor
    weight_N: Tensor
    top_k: Optional[int]
    max_pairs: Optional[int]
    valid_N: Optional[Tensor]
    routed: Tensor
    dropped: Tensor
    keep_N: Optional[Tensor]


def select_pairs(decision: RoutingDecision, valid_T: Optional[Tensor], num_tokens: int,
                 capacity_factor: Optional[float], top_k: Optional[int], drop_policy: str) -> RoutedPairs:
    """The routed pairs that reach the experts: all of them (dropless) or those within each expert's capacity
    ``ceil(capacity_factor * T * top_k / E)``, T counting this rank's non-padding tokens (capacity is per rank's
    batch, as in GShard and Megatron-Core, so a rank's drops never depend on another rank's tokens).

    Dropless needs no host sync; capacity mode has one, compacting the kept pairs (their count sizes every later
    tensor). Counts stay device tensors (``torch.full``, not ``new_tensor``: no host-to-device copy).
    """
    token_N, expert_N, weight_N, k = decision.token_N, decision.expert_N, decision.weight_N, decision.top_k
    E = decision.num_experts
    max_pairs = k  # a fixed-k decision bounds every token's pair count by k, before and after capacity drops
    valid_N = None if valid_T is None else valid_T.index_select(0, token_N)
    routed = (torch.full((), token_N.numel(), dtype=torch.int64, device=token_N.device) if valid_N is None
              else valid_N.sum())
    dropped = torch.zeros_like(routed)
    keep_N = None
    if capacity_factor is not None:
        top_k = k if top_k is None else top_k
        if top_k is None:
            raise ValueError("capacity mode needs the nominal top_k (the decision is variable-k)")
        # the non-padding count stays on the device (exact integer capacity, no sync)
        num_valid = num_tokens if valid_T is None else valid_T.sum()
        cap = expert_capacity(capacity_factor, num_valid, top_k, E, max_tokens=num_tokens)
        keep_N = capacity_keep_mask(expert_N, weight_N, E, cap, drop_policy, valid_N)
        dropped = routed - keep_N.sum()
        kept_N = keep_N.nonzero().squeeze(1)  # the one sync of capacity mode
        token_N, expert_N, weight_N = token_N[kept_N], expert_N[kept_N], weight_N[kept_N]
        k, valid_N = None, None
    return RoutedPairs(token_N, expert_N, weight_N, k, max_pairs, valid_N, routed, dropped, keep_N)


def expert_groups(dispatcher: "Dispatcher", num_experts: int, ranks_per_group: int) -> tuple[Tensor, int]:
    """The node (group) layout of ``dispatcher``'s experts: ``(group_E, home)`` with ``group_E`` int64 [E] the group
    of each expert and ``home`` this rank's group, when each group is ``ranks_per_group`` consecutive ranks of the
    expert-parallel group (the usual node-major rank layout: ranks 0..g-1 on node 0, ...). Bi-level routing
    (`BilevelRouter.from_dispatcher`) routes to these groups."""
    if isinstance(ranks_per_group, bool) or not isinstance(ranks_per_group, int) or ranks_per_group < 1 \
            or dispatcher.size % ranks_per_group:
        raise ValueError(f"ranks_per_group must be a positive int dividing the expert-parallel size "
                         f"{dispatcher.size}, got {ranks_per_group!r}")
    return dispatcher.expert_ranks(num_experts) // ranks_per_group, dispatcher.rank // ranks_per_group


class Dispatcher(ABC):
    """Moves routed tokens to the experts that compute them and their outputs back.

    ``collective``: whether every rank of a group must run each forward and backward together (then a rank
    with no tokens still takes part: it may hold experts other ranks route to).
    """

    collective: bool = False
    #: this rank's index in the group the experts are sharded over, and that group's size (one device: 0, 1)
    rank: int = 0
    size: int = 1

    def expert_ranks(self, num_experts: int) -> Tensor:
        """int64 [E]: the rank (in this dispatcher's group) holding each expert; contiguous blocks of E / size."""
        if num_experts % self.size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel size {self.size}")
        return torch.arange(num_experts) // (num_experts // self.size)

    def build_experts(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                      expert_impl: str = "auto", *, config: Optional[Mapping[str, Any]] = None, device=None,
                      dtype=None) -> GroupedExperts:
        """The expert module this dispatcher feeds: all ``num_experts`` here; a dispatcher that shards experts
        returns its shard. ``config``: the layer's other settings, which a collective dispatcher checks agree
        across ranks."""
        return GroupedExperts(num_experts, hidden_size, ffn_hidden_size, activation, expert_impl, device=device,
                              dtype=dtype)

    @abstractmethod
    def dispatch(self, x_TD: Tensor, decision: RoutingDecision, valid_T: Optional[Tensor] = None, *,
                 top_k: Optional[int] = None, capacity_factor: Optional[float] = None, drop_policy: str = "weight",
                 backend: str = "torch") -> tuple[Tensor, Tensor, Tensor, DispatchMeta]:
        """Route ``x_TD`` [T, D] by ``decision``.

        Args:
            valid_T: bool [T], False at padding (padding uses no capacity and is not counted), or None.
            top_k: the layer's nominal k (capacity); None uses ``decision.top_k``.
            capacity_factor: None = dropless.  drop_policy: "weight" | "position" (capacity mode).
            backend: a resolved kernel backend ("torch" | "triton" | "cuda").
        Returns:
            x_ND [N', D] the rows this rank's experts compute, sorted by (local) expert; counts_E int64 [E'] rows
            per local expert; offsets_E1 int64 [E'+1] CSR offsets; meta for `combine`.
        """

    @abstractmethod
    def combine(self, h_ND: Tensor, meta: DispatchMeta) -> Tensor:
        """Expert outputs ``h_ND`` [N', D] (rows as `dispatch` returned them) -> ``y_TD`` [T, D], gate-weighted."""

