"""`AllToAllDispatcher`: expert parallelism over a `torch.distributed` process group.

With ``ep`` ranks and E experts, rank r holds global experts ``[r*E/ep, (r+1)*E/ep)`` (a `ShardedExperts`). Per
forward, each rank:
1. selects its pairs (capacity per rank's own tokens) and sorts them by global expert -- destinations are then
   contiguous, rank by rank -- and permutes its token rows into that order (as `LocalDispatcher` does);
2. exchanges counts first: pairs per (destination rank, local expert), with `torch.distributed.all_to_all_single`
   on a small int64 tensor that also carries each rank's layer settings (a mismatch raises on every rank);
3. reads the split sizes on the host -- the ONE host sync per layer forward (plus capacity mode's compaction,
   as on one device): an uneven exchange needs its sizes there; the backward reuses them -- and exchanges the token rows with the differentiable
   `torch.distributed.nn.functional.all_to_all_single` (its backward is the reverse exchange);
4. orders the received rows (grouped by source rank, then local expert) by local expert for the grouped GEMM.
`combine` undoes 4, runs the reverse exchange (the same differentiable collective with the splits swapped) and
gate-weights the rows back to tokens locally, so gate gradients never cross ranks.

The router, shared experts and everything outside the experts stay replicated: each rank routes its own tokens,
so their gradients must be reduced across the group like data-parallel ones (expert gradients are complete on
their owner). Layout follows torchtitan's expert-parallel token dispatch (pytorch/torchtitan,
torchtitan/distributed/expert_parallel.py) and Megatron-Core's all-to-all dispatcher
(megatron/core/transformer/moe/token_dispatcher.py); the code here is this package's own ops.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..decision import RoutingDecision
from ..ops.capacity import DROP_POLICIES
from ..ops.combine import combine
from ..ops.counts import expert_counts, invert_permutation, sort_by_expert
from ..ops.permute import permute
from .base import DispatchMeta, Dispatcher, select_pairs
from .sharding import ShardedExperts

#: the per-forward settings every rank sends with its counts (a mismatch would garble the token exchange)
_FORWARD_SETTINGS = ("hidden_size", "num_experts", "top_k", "capacity_factor (x1e6)", "drop_policy",
                     "input dtype (bytes)")


@dataclass(frozen=True)
class Exchange:
    """An all-to-all dispatch's state for `AllToAllDispatcher.combine`.

    send_splits / recv_splits: rows sent to / received from each rank (host ints).  local_order_M: int64 [M],
    the received row at each local-expert-sorted row; recv_row_M: its inverse.
    """

    send_splits: list[int]
    recv_splits: list[int]
    local_order_M: Tensor
    recv_row_M: Tensor


def _all_to_all(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    from torch.distributed.nn.functional import all_to_all_single

    # the differentiable collective (its backward is the reverse exchange); torch marks it deprecated in
    # favour of the functional collectives, whose all_to_all is not differentiable on every release we support
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)
        return all_to_all_single(out, inp, out_splits, in_splits, group=group)


class AllToAllDispatcher(Dispatcher):
    """Expert parallelism over ``ep_group`` (a `torch.distributed` process group; None = the default group).

    Pass it to ``MoELayer(..., dispatcher=AllToAllDispatcher(group))`` on every rank of the group: the layer's
    ``experts`` is then this rank's shard (E must divide by the group size), and every rank must run each
    forward and backward of the layer (a rank with no tokens still computes for its experts). Building the
    layer checks that all ranks agree on its configuration (one ``all_gather_object``); each forward checks the
    per-forward settings ride along with the counts, so a mismatch raises on every rank instead of hanging.
    """

    collective = True

    def __init__(self, ep_group: Optional[Any] = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("AllToAllDispatcher needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group)")
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.rank, self.size = self.ep_rank, self.ep_size  # the layout `expert_ranks` / `expert_groups` report

    def __deepcopy__(self, memo) -> "AllToAllDispatcher":
        return self  # stateless but for the process group, which cannot be copied

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size}, ep_rank={self.ep_rank})"

    def build_experts(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                      expert_impl: str = "auto", *, config: Optional[Mapping[str, Any]] = None, device=None,
                      dtype=None) -> ShardedExperts:
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel group size "
                             f"{self.ep_size}")
        ours = {"ep_size": self.ep_size, "num_experts": num_experts, "hidden_size": hidden_size,
                "ffn_hidden_size": ffn_hidden_size, "activation": activation,
                "dtype": str(dtype or torch.get_default_dtype()), **dict(config or {})}
        self._check_agree(ours, "layer configuration")
        per = num_experts // self.ep_size
        return ShardedExperts(per, self.ep_rank * per, num_experts, hidden_size, ffn_hidden_size, activation,
                              expert_impl, device=device, dtype=dtype)

    def _check_agree(self, ours: Mapping[str, Any], what: str) -> None:
        every: list = [None] * self.ep_size
        dist.all_gather_object(every, dict(ours), group=self.group)
        self._raise_on_mismatch(every, what)

    def _raise_on_mismatch(self, every: list, what: str) -> None:
        """Every rank holds every rank's values, so every rank raises the same error (nobody is left waiting)."""
        keys = sorted({k for d in every for k in d})
        bad = []
        for k in keys:
            values = [d.get(k) for d in every]
            if any(v != values[0] for v in values):
                counts: dict = {}
                for v in values:
                    counts[repr(v)] = counts.get(repr(v), 0) + 1
                odd = [r for r, v in enumerate(values) if counts[repr(v)] < max(counts.values())] or \
                    [r for r, v in enumerate(values) if v != values[0]]
                per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                bad.append(f"{k} differs on rank(s) {odd} ({per_rank})")
        if bad:
            raise ValueError(f"expert-parallel ranks disagree on the {what} (this is rank {self.ep_rank} of "
                             f"{self.ep_size}): " + "; ".join(bad))

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision, valid_T: Optional[Tensor] = None, *,
                 top_k: Optional[int] = None, capacity_factor: Optional[float] = None, drop_policy: str = "weight",
                 backend: str = "torch") -> tuple[Tensor, Tensor, Tensor, DispatchMeta]:
        T, D = x_TD.shape
        E, ep = decision.num_experts, self.ep_size
        if E % ep:
            raise ValueError(f"the decision has {E} experts, not divisible by the expert-parallel size {ep}")
        L = E // ep
        p = select_pairs(decision, valid_T, T, capacity_factor, top_k, drop_policy)
        pair_of_row_N, counts_E, _ = sort_by_expert(p.expert_N, E, backend)
        x_ND = permute(x_TD, p.token_N[pair_of_row_N], backend, top_k=p.top_k, max_pairs=p.max_pairs)
        load_E = counts_E if p.valid_N is None else expert_counts(p.expert_N, E, p.valid_N.long())

        # counts first, with this rank's per-forward settings appended to every row
        settings = [D, E, top_k or 0, -1 if capacity_factor is None else round(capacity_factor * 1e6),
                    DROP_POLICIES.index(drop_policy) if drop_policy in DROP_POLICIES else -1, x_TD.element_size()]
        send_RC = torch.cat([counts_E.view(ep, L), counts_E.new_tensor(settings).expand(ep, -1)], 1)
        recv_RC = torch.empty_like(send_RC)
        dist.all_to_all_single(recv_RC, send_RC, group=self.group)
        # the one host sync of this layer's forward: the uneven exchange needs its split sizes on the host
        host = torch.cat([counts_E.view(ep, L).sum(1), recv_RC.reshape(-1)]).tolist()
        send_splits, rows = host[:ep], [host[ep + r * (L + 6): ep + (r + 1) * (L + 6)] for r in range(ep)]
        self._raise_on_mismatch([dict(zip(_FORWARD_SETTINGS, row[L:])) for row in rows], "forward settings")
        recv_splits = [sum(row[:L]) for row in rows]
        M = sum(recv_splits)
        x_MD = _all_to_all(x_ND.new_empty(M, D), x_ND, recv_splits, send_splits, self.group)

        # received rows are grouped by (source rank, local expert); the grouped GEMM wants local-expert order
        recv_RL = recv_RC[:, :L]
        arange = torch.arange(ep * L, device=recv_RC.device)
        expert_major_key = (arange % L) * ep + arange // L  # block (r, e), listed r-major, sorts as (e, r)
        key_M = torch.repeat_interleave(expert_major_key, recv_RL.reshape(-1), output_size=M)
        local_order_M = torch.sort(key_M, stable=True).indices
        counts_L = recv_RL.sum(0)
        offsets_L1 = torch.nn.functional.pad(torch.cumsum(counts_L, 0), (1, 0))
        exchange = Exchange(send_splits, recv_splits, local_order_M, invert_permutation(local_order_M))
        meta = DispatchMeta(pair_of_row_N=pair_of_row_N, row_of_pair_N=invert_permutation(pair_of_row_N),
                            token_N=p.token_N, weight_N=p.weight_N, num_tokens=T, top_k=p.top_k,
                            max_pairs=p.max_pairs, routed=p.routed, dropped=p.dropped, keep_N=p.keep_N, load_E=load_E,
                            backend=backend, exchange=exchange)
        return x_MD.index_select(0, local_order_M), counts_L, offsets_L1, meta

    def combine(self, h_MD: Tensor, meta: DispatchMeta) -> Tensor:
        ex: Exchange = meta.exchange
        h_back = h_MD.index_select(0, ex.recv_row_M)  # back to (source rank, local expert) order
        h_ND = _all_to_all(h_back.new_empty(sum(ex.send_splits), h_MD.shape[1]), h_back, ex.send_splits,
                           ex.recv_splits, self.group)
        return combine(h_ND, meta.weight_N, meta.row_of_pair_N, meta.token_N, meta.num_tokens, meta.top_k,
                       meta.backend, max_pairs=meta.max_pairs, check_indices=False)
