"""`LocalDispatcher`: every expert on this device. capacity -> sort by expert -> permute -> (experts) -> combine.

Dropless mode runs without a host sync (counts and offsets stay device tensors, sizes come from the decision);
capacity mode has exactly one, compacting the kept pairs (`base.select_pairs`). Index maps follow `ops.counts`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..decision import RoutingDecision
from ..ops.combine import combine
from ..ops.counts import expert_counts, invert_permutation, sort_by_expert
from ..ops.permute import permute
from .base import DispatchMeta, Dispatcher, select_pairs


class LocalDispatcher(Dispatcher):
    """Today's single-device path; `MoELayer`'s default."""

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision, valid_T: Optional[Tensor] = None, *,
                 top_k: Optional[int] = None, capacity_factor: Optional[float] = None, drop_policy: str = "weight",
                 backend: str = "torch") -> tuple[Tensor, Tensor, Tensor, DispatchMeta]:
        T, E = x_TD.shape[0], decision.num_experts
        p = select_pairs(decision, valid_T, T, capacity_factor, top_k, drop_policy)
        pair_of_row_N, counts_E, offsets_E1 = sort_by_expert(p.expert_N, E, backend)
        x_ND = permute(x_TD, p.token_N[pair_of_row_N], backend, top_k=p.top_k, max_pairs=p.max_pairs)
        load_E = counts_E if p.valid_N is None else expert_counts(p.expert_N, E, p.valid_N.long())
        meta = DispatchMeta(pair_of_row_N=pair_of_row_N, row_of_pair_N=invert_permutation(pair_of_row_N),
                            token_N=p.token_N, weight_N=p.weight_N, num_tokens=T, top_k=p.top_k,
                            max_pairs=p.max_pairs, routed=p.routed, dropped=p.dropped, keep_N=p.keep_N, load_E=load_E,
                            backend=backend)
        return x_ND, counts_E, offsets_E1, meta

    def combine(self, h_ND: Tensor, meta: DispatchMeta) -> Tensor:
        # indices from the router and sort_by_expert: valid by construction, so no per-forward host check
        return combine(h_ND, meta.weight_N, meta.row_of_pair_N, meta.token_N, meta.num_tokens, meta.top_k,
                       meta.backend, max_pairs=meta.max_pairs, check_indices=False)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
