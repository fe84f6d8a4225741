"""Top-k router: softmax or sigmoid scores, optional group-limited selection and aux-loss-free bias."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..decision import RoutingContext
from ..ops.topk_softmax import topk_softmax
from ..validation import check_bool, check_float, check_int
from .base import GatedRouter, renormalized, softmax_over_chosen, switch_gates_at_k1


GROUP_SCORES = ("top2_sum", "topk_sum", "max")


class TopKRouter(GatedRouter):
    """Choose ``top_k`` experts per token from ``logits = x @ weight.T`` (``weight`` [E, D], no bias).

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, E].
        score_func: "softmax" (default) or "sigmoid".
        softmax_before_topk: softmax: False takes the top-k logits then a softmax over those k (Mixtral/Qwen,
            the default for k > 1); True takes softmax over all E then the top-k probabilities (Switch, the
            default for k = 1, where a softmax over one logit would be a constant 1).
        normalize: renormalise the k gate weights to sum to 1. Default: True for sigmoid with k > 1, False for
            softmax-then-top-k and at k = 1 (no effect for top-k-then-softmax, which sums to 1 by construction).
            A configuration whose gates are all exactly 1 (k = 1 with a softmax over the chosen logit or a
            renormalisation) raises ValueError: the router would learn from the aux loss only.
        num_groups, topk_groups: group-limited routing: experts split into ``num_groups`` equal groups, only
            the best ``topk_groups`` groups are eligible.
        group_score: how a group is scored from its experts' selection scores: "top2_sum" (default,
            DeepSeek-V3: the sum of its 2 best), "topk_sum" (Megatron-Core: the sum of its best
            ``top_k // topk_groups``), "max" (DeepSeek-V2: its best).
        groups_on_logits: score groups on the raw logits instead of the selection scores (Megatron-Core's
            softmax router with ``softmax_before_topk=False`` ranks groups by logits).
        bias_update_rate: enables aux-loss-free balancing: a float32 bias added to scores for selection only,
            updated once per optimizer step (`moe_routing.attach` / `moe_routing.step`) as
            ``b_i += rate * sign(mean_load - load_i)``.
        jitter_eps: multiplicative input noise U(1-eps, 1+eps) in training (Switch Transformer).
        scaling_factor: multiplies the gate weights (DeepSeek's routed scaling factor).
        init_std: std of the normal initialisation of ``weight``.
        strict: raise on non-finite logits on accelerators too (CPU always raises).

    Kernels: with the layer's backend "triton" or "cuda" (the "auto" choice on CUDA), the plain softmax router
    (no groups, no bias, no jitter in training, no replay) runs the fused top-k + softmax op
    (`moe_routing.ops.topk_softmax`); on exact ties it picks the lowest expert id, where ``torch.topk`` (the
    "torch" backend) may pick another.

    Buffers (aux-loss-free bias only): ``expert_bias`` (float32) and ``load_accum`` (int64 pair counts since the
    last step). A checkpoint holding ``load_accum`` as float32 loads into the int64 buffer exactly (whole counts).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, score_func: str = "softmax",
                 softmax_before_topk: Optional[bool] = None, normalize: Optional[bool] = None,
                 num_groups: Optional[int] = None, topk_groups: Optional[int] = None,
                 group_score: str = "top2_sum", groups_on_logits: bool = False, bias_update_rate: Optional[float] = None, jitter_eps: float = 0.0, scaling_factor: float = 1.0,
                 init_std: float = 0.02, strict: bool = False, device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if (num_groups is None) != (topk_groups is None):
            raise ValueError("num_groups and topk_groups must be given together")
        if num_groups is not None:
            check_int("num_groups", num_groups, 1, num_experts)
            if num_experts % num_groups:
                raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
            check_int("topk_groups", topk_groups, 1, num_groups)
            if topk_groups * (num_experts // num_groups) < top_k:
                raise ValueError(f"topk_groups={topk_groups} groups of {num_experts // num_groups} experts "
                                 f"cannot supply top_k={top_k} experts")
        if group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
        if group_score == "topk_sum" and num_groups is not None and top_k < topk_groups:
            raise ValueError(f"group_score='topk_sum' sums each group's best top_k // topk_groups experts, which is "
                             f"0 for top_k={top_k} < topk_groups={topk_groups}")
        if bias_update_rate is not None:
            bias_update_rate = check_float("bias_update_rate", bias_update_rate, 0.0, low_inclusive=False)
        self.score_func = score_func
        self.scores_normalized = score_func == "softmax"
        self.normalize = (score_func == "sigmoid" and top_k > 1) if normalize is None else check_bool("normalize",
                                                                                                     normalize)
        if score_func == "softmax":
            self.softmax_before_topk = switch_gates_at_k1("TopKRouter", top_k, softmax_before_topk, self.normalize)
        else:  # sigmoid gates are the scores at the chosen experts; only renormalising one of them is constant
            self.softmax_before_topk = bool(softmax_before_topk)
            switch_gates_at_k1("TopKRouter(score_func='sigmoid')", top_k, True, self.normalize)
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.group_score, self.groups_on_logits = group_score, check_bool("groups_on_logits", groups_on_logits)
        self.bias_update_rate = bias_update_rate
        self.jitter_eps = check_float("jitter_eps", jitter_eps, 0.0, 1.0, high_inclusive=False)
        self.scaling_factor = check_float("scaling_factor", scaling_factor, 0.0, low_inclusive=False)
        if bias_update_rate is not None:
            factory = {"device": self.weight.device, "dtype": self.weight.dtype}
            self.register_buffer("expert_bias", torch.zeros(num_experts, **factory))
            # counts, not floats: a float32 sum stops counting exactly at 2^24 pairs (bf16 would at 256)
            self.register_buffer("load_accum", torch.zeros(num_experts, dtype=torch.int64, device=device))
        else:
            self.expert_bias = None
            self.load_accum = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, score_func={self.score_func}, "
                f"aux_free_bias={self.bias_update_rate is not None}")

    def default_losses(self) -> list:
        from ..losses.balance import SequenceAuxLoss, SwitchAuxLoss

        return [SwitchAuxLoss(1e-2)] if self.score_func == "softmax" else [SequenceAuxLoss(1e-4)]

    def gating(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        if self.training and self.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        return x_TD @ self.weight.t()

    def scores(self, logits_TE: Tensor) -> Tensor:
        return logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()

    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        select_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        if self.num_groups is not None and self.num_groups > 1:
            T, E = select_TE.shape
            size = E // self.num_groups
            rank_TE = logits_TE.detach() if self.groups_on_logits else select_TE
            best = {"top2_sum": min(2, size), "topk_sum": self.top_k // self.topk_groups, "max": 1}[self.group_score]
            group_TG = rank_TE.view(T, self.num_groups, size).topk(min(best, size), dim=-1).values.sum(-1)
            keep_TG = group_TG.topk(self.topk_groups, dim=-1).indices
            drop_TG = torch.ones_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
            select_TE = select_TE.view(T, self.num_groups, size).masked_fill(drop_TG[..., None], float("-inf"))
            select_TE = select_TE.view(T, E)
        return select_TE.topk(self.top_k, dim=-1).indices

    def gates(self, experts_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        if self.score_func == "softmax" and not self.softmax_before_topk:
            gates_TK = softmax_over_chosen(experts_TK, logits_TE)
        else:
            gates_TK = scores_TE.gather(1, experts_TK)  # from the full scores, so forced choices keep gradient
            if self.normalize:
                gates_TK = renormalized(gates_TK)
        return gates_TK * self.scaling_factor if self.scaling_factor != 1.0 else gates_TK

    def balance_experts(self, scores_TE: Tensor) -> Optional[Tensor]:
        if self.expert_bias is None and self.num_groups is None:
            return None  # the choice is the plain top-k
        return scores_TE.topk(self.top_k, dim=-1).indices

    def _fusable(self) -> bool:
        return (self.score_func == "softmax" and self.num_groups is None and self.expert_bias is None
                and not (self.training and self.jitter_eps > 0))

    def choose(self, logits_TE: Tensor, scores_TE: Tensor, forced_TK: Optional[Tensor],
               ctx: Optional[RoutingContext], backend: str) -> tuple[Tensor, Tensor, dict]:
        if forced_TK is None and backend != "torch" and self._fusable():
            gates_TK, experts_TK = topk_softmax(logits_TE, self.top_k, backend,
                                                softmax_before_topk=self.softmax_before_topk,
                                                normalize=self.normalize)
            gates_TK = gates_TK.to(logits_TE.dtype)
            if self.scaling_factor != 1.0:
                gates_TK = gates_TK * self.scaling_factor
        else:
            experts_TK, gates_TK, _ = super().choose(logits_TE, scores_TE, forced_TK, ctx, backend)
        if self.load_accum is not None and self.should_accumulate():
            self._accumulate_load(experts_TK, ctx)
        return experts_TK, gates_TK, {}

    @torch.no_grad()
    def _accumulate_load(self, experts_TK: Tensor, ctx: Optional[RoutingContext]) -> None:
        pad_T = None if ctx is None else ctx.padding_T(experts_TK.shape[0])
        weight_TK = (torch.ones_like(experts_TK) if pad_T is None
                     else (~pad_T).long()[:, None].expand_as(experts_TK))
        # index_add_ into a fixed [E] buffer: no data-dependent output size (no host sync, compile-friendly)
        self.load_accum.index_add_(0, experts_TK.reshape(-1), weight_TK.reshape(-1))

    def step_statistics(self) -> Optional[Tensor]:
        return self.load_accum

    @classmethod
    @torch.no_grad()
    def apply_step(cls, routers: Sequence["TopKRouter"], statistics: Sequence[Tensor]) -> None:
        """Aux-loss-free bias update from each router's loads since the last step (summed over ranks)."""
        for r, load in zip(routers, statistics):
            if load.sum() > 0:
                r.expert_bias += (r.bias_update_rate * torch.sign(load.mean() - load)).to(r.expert_bias.dtype)
            r.load_accum.zero_()
