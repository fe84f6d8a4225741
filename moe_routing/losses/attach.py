"""Attach an auxiliary loss to the graph without the user adding it to their loss.

`inject_aux_loss(y, aux)` returns ``y`` unchanged in forward; in backward it passes ``dy`` through and sends a
gradient of ``scale`` into ``aux``, so ``d(aux)`` reaches the router as if ``scale * aux`` had been added to the
training loss. ``scale`` is the model-level factor of `set_aux_loss_scale` (gradient accumulation, loss scaling).
"""
from __future__ import annotations

import torch
from torch import Tensor


class _AuxLossInjector(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: Tensor):
        d_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=dy.device)
        return dy, d_aux, None


def inject_aux_loss(y: Tensor, aux: Tensor, scale: float = 1.0) -> Tensor:
    """Identity on ``y`` whose backward adds ``scale * d(aux)/d(params)`` to the gradients."""
    if not aux.requires_grad:
        return y
    return _AuxLossInjector.apply(y, aux, float(scale))
