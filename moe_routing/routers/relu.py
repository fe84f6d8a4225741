"""ReLU router with an adaptive L1 sparsity controller (ReMoE, arXiv 2412.14711)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from .base import Router, check_finite_logits


class ReLURouter(Router):
    """``R = ReLU(x @ weight.T)`` (``weight`` [E, D], no bias, no softmax, no top-k): expert e serves token t
    iff ``R[t, e] > 0`` with gate ``R[t, e]``, so experts per token vary (0..E).

    Args:
        top_k: nominal experts per token k; the controller targets sparsity ``1 - k/E``.
        norm: None, or "rmsnorm" to RMS-normalise the ReLU outputs (BlockFFN's variant; zeros stay zero).
        l1_coeff: initial L1 coefficient lambda_0 (1e-8).  alpha: controller step factor (1.2).
        min_l1_coeff: floor for lambda (default lambda_0). Without one, a float32 lambda that keeps shrinking
            reaches a subnormal where ``x * 1.2`` rounds back to ``x`` (2.8e-45 after ~600 steps above target)
            and the controller can never raise it again. max_l1_coeff: ceiling (1e30: keeps lambda finite).
    The L1 loss (`ReLUL1Loss`, the default loss) reads ``l1_coeff``; `moe_routing.step(model)` updates it once per
    optimizer step from the sparsity accumulated since the last step, averaged over all ReLU routers of the
    model (and data-parallel ranks): ``lambda *= alpha`` if sparsity < target else ``lambda /= alpha``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, norm: Optional[str] = None,
                 l1_coeff: float = 1e-8, alpha: float = 1.2, min_l1_coeff: Optional[float] = None,
                 max_l1_coeff: float = 1e30, init_std: float = 0.02, strict: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts)
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if norm not in (None, "rmsnorm"):
            raise ValueError(f"norm must be None or 'rmsnorm', got {norm!r}")
        if not l1_coeff > 0 or not alpha > 1:
            raise ValueError(f"l1_coeff must be > 0 and alpha > 1, got {l1_coeff!r}, {alpha!r}")
        min_l1_coeff = float(l1_coeff) if min_l1_coeff is None else min_l1_coeff
        if not 0 < min_l1_coeff <= l1_coeff <= max_l1_coeff < float("inf"):
            raise ValueError(f"need 0 < min_l1_coeff <= l1_coeff <= max_l1_coeff < inf, got {min_l1_coeff!r}, "
                             f"{l1_coeff!r}, {max_l1_coeff!r}")
        self.top_k, self.alpha, self.strict = top_k, float(alpha), strict
        self.min_l1_coeff, self.max_l1_coeff = float(min_l1_coeff), float(max_l1_coeff)
        factory = {"device": device, "dtype": torch.float32 if dtype in (None, torch.float16, torch.bfloat16)
                   else dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        nn.init.normal_(self.weight, std=init_std)
        self.norm = nn.RMSNorm(num_experts, **factory) if norm == "rmsnorm" else None
        self.register_buffer("l1_coeff", torch.tensor(float(l1_coeff), **factory))
        self.register_buffer("active_accum", torch.zeros((), **factory))  # nnz of R since the last step
        self.register_buffer("count_accum", torch.zeros((), **factory))   # T*E entries since the last step

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.top_k / self.num_experts

    def default_losses(self) -> list:
        from ..losses.l1 import ReLUL1Loss

        return [ReLUL1Loss()]

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object) -> RoutingDecision:
        logits_TE = x_TD @ self.weight.t()
        logits_TE, nonfinite = check_finite_logits(logits_TE, self.strict)
        gates_TE = torch.relu(logits_TE)
        if self.norm is not None:
            gates_TE = self.norm(gates_TE)
        active_TE = logits_TE > 0
        token_N, expert_N = active_TE.nonzero(as_tuple=True)  # row-major: sorted by token
        pad_T = None if ctx is None else ctx.padding_T(x_TD.shape[0])
        valid_active = active_TE if pad_T is None else active_TE[~pad_T]
        if self.should_accumulate():
            with torch.no_grad():
                self.active_accum += valid_active.sum()
                self.count_accum += valid_active.numel()
        extra = {"sparsity": 1.0 - valid_active.float().mean() if valid_active.numel() else torch.zeros(()),
                 "max_experts_per_token": valid_active.sum(-1).max() if valid_active.numel() else torch.zeros(()),
                 "l1_coeff": self.l1_coeff.detach().clone()}
        if nonfinite is not None:
            extra["nonfinite_tokens"] = nonfinite
        return RoutingDecision(token_N=token_N, expert_N=expert_N, weight_N=gates_TE[token_N, expert_N],
                               logits_TE=logits_TE, scores_TE=gates_TE, num_experts=self.num_experts, top_k=None,
                               score_func="relu", extra=extra)

    @staticmethod
    @torch.no_grad()
    def moe_step_all(routers: list["ReLURouter"], group=None) -> None:
        """One controller step for all ReLU routers of a model: sparsity averaged over layers and ranks."""
        stats = torch.stack([torch.stack([r.active_accum, r.count_accum]).double() for r in routers]).sum(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, group=group)
        if stats[1] > 0:
            sparsity = 1.0 - float(stats[0] / stats[1])
            for r in routers:
                r.l1_coeff *= r.alpha if sparsity < r.target_sparsity else 1.0 / r.alpha
                r.l1_coeff.clamp_(r.min_l1_coeff, r.max_l1_coeff)
        for r in routers:
            r.active_accum.zero_()
            r.count_accum.zero_()
