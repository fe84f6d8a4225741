"""Top-k router: softmax or sigmoid scores, optional group-limited selection and aux-loss-free bias."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from ..losses.balance import SequenceAuxLoss, SwitchAuxLoss
from ..ops.backend import BACKENDS
from ..ops.topk_softmax import topk_softmax
from .base import Router, check_finite_logits, forced_experts_TK


class TopKRouter(Router):
    """Choose ``top_k`` experts per token from ``logits = x @ weight.T`` (``weight`` [E, D], no bias).

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, E].
        score_func: "softmax" (default) or "sigmoid".
        softmax_before_topk: softmax: False (default) takes the top-k logits then a softmax over those k
            (Mixtral/Qwen); True takes softmax over all E then the top-k probabilities.
        normalize: renormalise the k gate weights to sum to 1. Default: True for sigmoid, False for
            softmax-then-top-k (no effect for top-k-then-softmax, which sums to 1 by construction).
        num_groups, topk_groups: group-limited routing (DeepSeek-V3): experts split into ``num_groups`` equal
            groups, a group scores the sum of its top-2 selection scores, only the best ``topk_groups`` groups
            are eligible.
        bias_update_rate: enables aux-loss-free balancing: a float32 bias added to scores for selection only,
            updated by `moe_routing.step(model)` as ``b_i += rate * sign(mean_load - load_i)``.
        jitter_eps: multiplicative input noise U(1-eps, 1+eps) in training (Switch Transformer).
        scaling_factor: multiplies the gate weights (DeepSeek's routed scaling factor).
        init_std: std of the normal initialisation of ``weight``.
        strict: raise on non-finite logits on accelerators too (CPU always raises).
        fused_topk: None (default: plain torch ops) or a backend name ("auto", "torch", "triton", "cuda") for
            the fused top-k + softmax op (`moe_routing.ops.topk_softmax`). Only for the plain softmax router
            (no groups, no bias, no jitter); a call with forced experts takes the unfused path. On exact ties the
            fused op picks the lowest expert id, where ``torch.topk`` may pick another.

    Buffers (aux-loss-free bias only): ``expert_bias`` (float32) and ``load_accum`` (int64 pair counts since the
    last step). Checkpoints from before ``load_accum`` was int64 hold it as float32; ``load_state_dict`` copies
    those values into the int64 buffer (exact: they are whole counts).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, score_func: str = "softmax",
                 softmax_before_topk: bool = False, normalize: Optional[bool] = None,
                 num_groups: Optional[int] = None, topk_groups: Optional[int] = None,
                 bias_update_rate: Optional[float] = None, jitter_eps: float = 0.0, scaling_factor: float = 1.0,
                 init_std: float = 0.02, strict: bool = False, fused_topk: Optional[str] = None, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts)
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if (num_groups is None) != (topk_groups is None):
            raise ValueError("num_groups and topk_groups must be given together")
        if num_groups is not None:
            if num_groups < 1 or num_experts % num_groups:
                raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
            if not 1 <= topk_groups <= num_groups:
                raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
            if topk_groups * (num_experts // num_groups) < top_k:
                raise ValueError(f"topk_groups={topk_groups} groups of {num_experts // num_groups} experts "
                                 f"cannot supply top_k={top_k} experts")
        if bias_update_rate is not None and not bias_update_rate > 0:
            raise ValueError(f"bias_update_rate must be > 0 or None, got {bias_update_rate!r}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps!r}")
        if fused_topk is not None:
            if fused_topk not in BACKENDS:
                raise ValueError(f"fused_topk must be None or one of {BACKENDS}, got {fused_topk!r}")
            unsupported = [name for name, on in (("score_func='sigmoid'", score_func != "softmax"),
                                                 ("num_groups", num_groups is not None),
                                                 ("bias_update_rate", bias_update_rate is not None),
                                                 ("jitter_eps", jitter_eps > 0)) if on]
            if unsupported:
                raise ValueError(f"fused_topk supports only the plain softmax router, not with "
                                 f"{', '.join(unsupported)}; use fused_topk=None")
        self.fused_topk = fused_topk
        self.top_k = top_k
        self.score_func = score_func
        self.softmax_before_topk = softmax_before_topk
        self.normalize = (score_func == "sigmoid") if normalize is None else bool(normalize)
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.bias_update_rate = bias_update_rate
        self.jitter_eps = float(jitter_eps)
        self.scaling_factor = float(scaling_factor)
        self.strict = strict
        factory = {"device": device, "dtype": torch.float32 if dtype in (None, torch.float16, torch.bfloat16)
                   else dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        nn.init.normal_(self.weight, std=init_std)
        if bias_update_rate is not None:
            self.register_buffer("expert_bias", torch.zeros(num_experts, **factory))
            # counts, not floats: a float32 sum stops counting exactly at 2^24 pairs (bf16 would at 256)
            self.register_buffer("load_accum", torch.zeros(num_experts, dtype=torch.int64, device=device))
        else:
            self.expert_bias = None
            self.load_accum = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score_func={self.score_func}, aux_free_bias={self.bias_update_rate is not None}")

    def default_losses(self) -> list:
        if self.score_func == "softmax":
            return [SwitchAuxLoss(1e-2)]
        return [SequenceAuxLoss(1e-4)]

    def _select(self, select_TE: Tensor) -> Tensor:
        if self.num_groups is not None and self.num_groups > 1:
            T, E = select_TE.shape
            grouped = select_TE.view(T, self.num_groups, E // self.num_groups)
            group_score = grouped.topk(min(2, E // self.num_groups), dim=-1).values.sum(-1)
            keep_G = group_score.topk(self.topk_groups, dim=-1).indices
            mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep_G, False)
            select_TE = grouped.masked_fill(mask[..., None], float("-inf")).view(T, E)
        return select_TE.topk(self.top_k, dim=-1).indices

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object) -> RoutingDecision:
        if self.training and self.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits_TE = x_TD @ self.weight.t()
        logits_TE, nonfinite = check_finite_logits(logits_TE, self.strict)
        scores_TE = logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()

        idx_TK = forced_experts_TK(ctx, layer_key, x_TD.shape[0], self.top_k, self.num_experts, self.weight.device)
        if idx_TK is None and self.fused_topk is not None:
            gates_TK, idx_TK = topk_softmax(logits_TE, self.top_k, self.fused_topk,
                                            softmax_before_topk=self.softmax_before_topk, normalize=self.normalize)
            return self._finish(idx_TK, gates_TK.to(logits_TE.dtype), logits_TE, scores_TE, nonfinite, ctx)
        if idx_TK is None:
            select_TE = scores_TE.detach()
            if self.expert_bias is not None:
                select_TE = select_TE + self.expert_bias
            idx_TK = self._select(select_TE)

        if self.score_func == "softmax" and not self.softmax_before_topk:
            gates_TK = logits_TE.gather(1, idx_TK).softmax(-1)
        else:
            gates_TK = scores_TE.gather(1, idx_TK)  # from the full scores, so forced choices keep gradient
            if self.normalize:
                gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).tiny)
        return self._finish(idx_TK, gates_TK, logits_TE, scores_TE, nonfinite, ctx)

    def _finish(self, idx_TK: Tensor, gates_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor,
                nonfinite: Optional[Tensor], ctx: Optional[RoutingContext]) -> RoutingDecision:
        if self.scaling_factor != 1.0:
            gates_TK = gates_TK * self.scaling_factor

        if self.load_accum is not None and self.should_accumulate():
            self._accumulate_load(idx_TK, ctx)
        extra = {} if nonfinite is None else {"nonfinite_tokens": nonfinite}
        return RoutingDecision.from_topk(idx_TK, gates_TK, logits_TE, scores_TE, self.score_func, extra)

    @torch.no_grad()
    def _accumulate_load(self, idx_TK: Tensor, ctx: Optional[RoutingContext]) -> None:
        pad_T = None if ctx is None else ctx.padding_T(idx_TK.shape[0])
        ids = idx_TK if pad_T is None else idx_TK[~pad_T]
        self.load_accum += torch.bincount(ids.reshape(-1), minlength=self.num_experts).to(self.load_accum.dtype)

    @torch.no_grad()
    def moe_step(self, group=None) -> None:
        """Aux-loss-free bias update from the loads accumulated since the last step (summed over ``group``)."""
        if self.load_accum is None:
            return
        load = self.load_accum.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)  # integer counts: the sum is exact
        load = load.double()
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()

