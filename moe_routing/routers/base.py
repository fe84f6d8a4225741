"""Router base class: input checks, float32 parameter keeping, and the hooks every router shares."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def keep_float32(fn: Callable) -> Callable:
    """Wrap an ``nn.Module._apply`` function so a cast to bf16/fp16 leaves floating tensors float32 (a cast to
    float64 or a device move still applies)."""
    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if isinstance(out, Tensor) and t.is_floating_point() and out.dtype in _LOW_PRECISION:
            # from the original values: a round trip through bf16/fp16 would round the weights and bias
            out = t.to(device=out.device, dtype=torch.float32)
        return out

    return apply


class Router(nn.Module, ABC):
    """Base class for routers: decide which experts each token uses; never dispatch.

    Subclasses implement ``route(x_TD, ctx, layer_key) -> RoutingDecision`` and may override
    ``default_losses()`` and ``moe_step(group)`` (a per-optimizer-step controller).

    Router parameters and buffers stay float32 when the model is cast to bf16/fp16 (small bias updates vanish
    in bf16), but follow a cast up to float64. Router math runs in the parameters' dtype, at least float32,
    with autocast disabled.
    """

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts

    def _apply(self, fn: Callable, recurse: bool = True):  # noqa: D401 - torch override
        return super()._apply(keep_float32(fn), recurse)

    @property
    def math_dtype(self) -> torch.dtype:
        """The dtype router math runs in: the parameters' dtype, at least float32."""
        p = next(self.parameters(), None)
        if p is None or p.dtype in _LOW_PRECISION:
            return torch.float32
        return p.dtype

    def forward(self, x_TD: Tensor, ctx: Optional[RoutingContext] = None,
                layer_key: object = None) -> RoutingDecision:
        if not isinstance(x_TD, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x_TD).__name__}")
        if not x_TD.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x_TD.dtype}")
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [T, {self.hidden_size}], got {tuple(x_TD.shape)}")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.route(x_TD.to(self.math_dtype), ctx, layer_key)

    @abstractmethod
    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object) -> RoutingDecision:
        """Decide for ``x_TD`` [T, D] (already in ``math_dtype``, autocast off)."""

    def default_losses(self) -> list:
        """Losses a layer uses when the user passes none (see the README's table)."""
        return []

    def should_accumulate(self) -> bool:
        """Controller statistics count only in training forwards with grad enabled, and not in the
        recomputation a non-reentrant activation checkpoint runs inside backward (no double counting)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return torch._C._current_graph_task_id() == -1


def check_finite_logits(logits_TE: Tensor, strict: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Reject or sanitise non-finite logits so selection never sees NaN/inf.

    On CPU (or with ``strict``) a non-finite logit raises ValueError. On accelerators a check would sync the
    host, so non-finite entries are replaced by 0 and the number of affected tokens is returned for stats.
    """
    if logits_TE.device.type == "cpu" or strict:
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(logits_TE).all()):
            bad = int((~torch.isfinite(logits_TE)).any(-1).sum())
            raise ValueError(f"router logits contain NaN/inf for {bad} token(s); check the layer input "
                             "(x) and router weight for non-finite values")
        if logits_TE.device.type == "cpu":
            return logits_TE, None
    finite = torch.isfinite(logits_TE)
    bad_count = (~finite).any(-1).sum()
    return torch.where(finite, logits_TE, torch.zeros_like(logits_TE)), bad_count


def forced_experts_TK(ctx: Optional[RoutingContext], layer_key: object, num_tokens: int, top_k: int,
                      num_experts: int, device: torch.device) -> Optional[Tensor]:
    """``ctx.forced_experts[layer_key]`` checked to be int [T, K] in [0, E), or None (routing replay)."""
    if ctx is None or layer_key not in ctx.forced_experts:
        return None
    idx = ctx.forced_experts[layer_key]
    if not isinstance(idx, Tensor) or idx.shape != (num_tokens, top_k) or idx.is_floating_point():
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"forced_experts[{layer_key!r}] must be an integer tensor of shape [{num_tokens}, {top_k}], "
                         f"got {got}")
    if not torch.compiler.is_compiling() and num_tokens and bool(((idx < 0) | (idx >= num_experts)).any()):
        raise ValueError(f"forced_experts[{layer_key!r}] has ids outside [0, {num_experts})")
    return idx.long().to(device)
