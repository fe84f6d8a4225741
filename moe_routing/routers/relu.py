"""ReLU router with an adaptive L1 sparsity controller (ReMoE, arXiv 2412.14711).

Reference: thu-ml/ReMoE, ``megatron/core/transformer/moe/router.py`` (``ReLURouter``: routing, L1 loss, sparsity
statistic) and ``megatron/training/training.py`` (``train``: the lambda update after each optimizer step;
``--moe-relu-l1-reg-coeff-init`` 1e-8 and ``--moe-relu-l1-reg-coeff-multiplier`` 1.2 in ``arguments.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from ..validation import check_float
from .base import GatedRouter, forced_routing_map


class ReLURouter(GatedRouter):
    """``R = ReLU(x @ weight.T)`` (``weight`` [E, D], no bias, no softmax, no top-k): expert e serves token t
    iff ``R[t, e] > 0`` with gate ``R[t, e]``, so experts per token vary (0..E).

    Args:
        top_k: nominal experts per token k; the controller targets sparsity ``1 - k/E``.
        norm: None, or "rmsnorm" to RMS-normalise the ReLU outputs (BlockFFN's variant; zeros stay zero).
        l1_coeff: initial L1 coefficient lambda_0 (1e-8).  alpha: controller step factor (1.2).
        min_l1_coeff: None (default, the reference's: no floor), or a floor for lambda (``l1_coeff`` gives the
            floor at lambda_0 this library used before). Without a floor the only clamp is at the smallest normal
            float of lambda's dtype (1.2e-38 in float32), below which the reference's float32 lambda reaches a
            subnormal where ``x * 1.2`` rounds back to ``x`` (2.8e-45 after ~600 steps above target) and its
            controller can never raise it again; above it the update is the reference's exactly.
        max_l1_coeff: ceiling (1e30: keeps lambda finite; the reference has none).
    The L1 loss (`ReLUL1Loss`, the default loss) receives ``l1_coeff`` through `LossInputs.l1_coeff`; the
    controller (`moe_routing.attach` / `moe_routing.step`) updates it once per optimizer step from the sparsity
    accumulated since the last step, averaged over all ReLU routers of the model (and data-parallel ranks):
    ``lambda *= alpha`` if sparsity < target else ``lambda /= alpha``.

    Routing replay: ``ctx.forced_experts[layer_key]`` is a routing map, bool [T, E] (or 0/1 integers where rows
    holding -1 route natively); the replayed pairs are routed with gate ``relu(logit)`` (normalised by ``norm``
    when set). A replayed expert whose logit is now <= 0 gets a gate of exactly 0 and no gradient: it is still
    dispatched (the pair count N stays the replayed one, so shapes agree with the recorded forward) but
    contributes nothing to the output, and its router logit gets no gradient. The ReLU's own subgradient is
    kept on purpose: a straight-through gradient would train the router for a contribution the forward did not
    make (a biased gradient), and in RL replay the pair was chosen by another policy, so pushing its logit up
    is not the task loss's signal; the L1 loss and the task gradient of the experts still active steer the
    router as they would natively. The sparsity statistic counts the replayed map.

    Where the controller differs from the reference (``training.py``): the reference averages per-(layer,
    micro-batch) sparsity ratios (``1 - nnz/numel`` over every token, padding included, divided by
    ``num_layers * num_microbatches``, so dense layers would count as sparsity 0); ours pools nonzeros and entries
    over ReLU layers, micro-batches and ranks (ratio of sums) over non-padding tokens. The two agree when every
    layer and micro-batch routes the same number of tokens without padding, as in the reference's runs. The
    reference also updates when no training forward ran since the last step (sparsity 0: lambda grows); ours
    leaves lambda alone then. Target ``1 - k/E``, the strict ``<`` and the update after each optimizer step are
    the reference's.
    """

    variable_k = True
    scores_normalized = False

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, norm: Optional[str] = None,
                 l1_coeff: float = 1e-8, alpha: float = 1.2, min_l1_coeff: Optional[float] = None,
                 max_l1_coeff: float = 1e30, init_std: float = 0.02, strict: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        if norm not in (None, "rmsnorm"):
            raise ValueError(f"norm must be None or 'rmsnorm', got {norm!r}")
        l1_coeff = check_float("l1_coeff", l1_coeff, 0.0, low_inclusive=False)
        self.alpha = check_float("alpha", alpha, 1.0, low_inclusive=False)
        if min_l1_coeff is not None:
            min_l1_coeff = check_float("min_l1_coeff", min_l1_coeff, 0.0, low_inclusive=False)
        max_l1_coeff = check_float("max_l1_coeff", max_l1_coeff, 0.0, low_inclusive=False)
        if not (min_l1_coeff or 0.0) <= l1_coeff <= max_l1_coeff:
            raise ValueError(f"need min_l1_coeff <= l1_coeff <= max_l1_coeff, got {min_l1_coeff!r}, "
                             f"{l1_coeff!r}, {max_l1_coeff!r}")
        self.min_l1_coeff, self.max_l1_coeff = min_l1_coeff, max_l1_coeff
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.norm = nn.RMSNorm(num_experts, **factory) if norm == "rmsnorm" else None
        self.register_buffer("l1_coeff", torch.tensor(l1_coeff, **factory))
        self.register_buffer("active_accum", torch.zeros((), **factory))  # nnz of R since the last step
        self.register_buffer("count_accum", torch.zeros((), **factory))   # T*E entries since the last step

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.top_k / self.num_experts

    def default_losses(self) -> list:
        from ..losses.l1 import ReLUL1Loss

        return [ReLUL1Loss()]

    def sparsity_coeff(self) -> Optional[Tensor]:
        return self.l1_coeff

    def scores(self, logits_TE: Tensor) -> Tensor:
        gates_TE = torch.relu(logits_TE)
        return gates_TE if self.norm is None else self.norm(gates_TE)

    def choose_pairs(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> RoutingDecision:
        return self._pairs(logits_TE > 0, logits_TE, scores_TE, ctx)

    def forced_map(self, ctx: Optional[RoutingContext], layer_key: object, num_tokens: int,
                   device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return forced_routing_map(ctx, layer_key, num_tokens, self.num_experts, device)

    def forced_pairs(self, chosen_TE: Tensor, native_T: Optional[Tensor], logits_TE: Tensor, scores_TE: Tensor,
                     ctx: Optional[RoutingContext]) -> RoutingDecision:
        if native_T is not None:
            chosen_TE = torch.where(native_T[:, None], logits_TE > 0, chosen_TE)
        return self._pairs(chosen_TE, logits_TE, scores_TE, ctx)

    def _pairs(self, active_TE: Tensor, logits_TE: Tensor, scores_TE: Tensor,
               ctx: Optional[RoutingContext]) -> RoutingDecision:
        """The decision routing the pairs of ``active_TE`` bool [T, E] with gates ``scores_TE`` there."""
        token_N, expert_N = active_TE.nonzero(as_tuple=True)  # row-major: sorted by token
        pad_T = None if ctx is None else ctx.padding_T(logits_TE.shape[0])
        valid_active = active_TE if pad_T is None else active_TE[~pad_T]
        if self.should_accumulate():
            with torch.no_grad():
                self.active_accum += valid_active.sum()
                self.count_accum += valid_active.numel()
        extra = {"sparsity": 1.0 - valid_active.float().mean() if valid_active.numel() else torch.zeros(()),
                 "max_experts_per_token": valid_active.sum(-1).max() if valid_active.numel() else torch.zeros(()),
                 "l1_coeff": self.l1_coeff.detach().clone()}
        return RoutingDecision(token_N=token_N, expert_N=expert_N, weight_N=scores_TE[token_N, expert_N],
                               logits_TE=logits_TE, scores_TE=scores_TE, num_experts=self.num_experts, top_k=None,
                               scores_normalized=False, extra=extra)

    def step_statistics(self) -> Optional[Tensor]:
        return torch.stack([self.active_accum, self.count_accum])

    @classmethod
    @torch.no_grad()
    def apply_step(cls, routers: Sequence["ReLURouter"], statistics: Sequence[Tensor]) -> None:
        """One controller step for all ReLU routers of a model: sparsity pooled over layers (and ranks)."""
        active, count = torch.stack(list(statistics)).sum(0).tolist()
        if count > 0:
            sparsity = 1.0 - active / count
            for r in routers:
                if sparsity < r.target_sparsity:  # divide rather than multiply by 1/alpha: the reference's rounding
                    r.l1_coeff *= r.alpha
                else:
                    r.l1_coeff /= r.alpha
                floor = r.min_l1_coeff if r.min_l1_coeff is not None else torch.finfo(r.l1_coeff.dtype).tiny
                r.l1_coeff.clamp_(floor, r.max_l1_coeff)
        for r in routers:
            r.active_accum.zero_()
            r.count_accum.zero_()
