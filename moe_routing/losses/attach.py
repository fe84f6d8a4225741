"""Attach an auxiliary loss to the graph without the user adding it to their loss.

`inject_aux_loss(y, aux, scale)` returns ``y`` unchanged in forward; in backward it passes ``dy`` through and
sends a gradient of ``scale`` into ``aux``, so ``d(aux)`` reaches the router as if ``scale * aux`` had been
added to the training loss. ``scale`` is the layer's ``aux_loss_scale`` buffer (`set_aux_loss_scale`:
gradient accumulation, loss scaling): a tensor, so a compiled graph reads its current value on every call.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


class _AuxLossInjector(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, aux: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (scale,) = ctx.saved_tensors
        d_aux = scale.to(device=dy.device, dtype=ctx.aux_dtype).expand(ctx.aux_shape)
        return dy, d_aux, None


def inject_aux_loss(y: Tensor, aux: Tensor, scale: Union[Tensor, float] = 1.0) -> Tensor:
    """Identity on ``y`` whose backward adds ``scale * d(aux)/d(params)`` to the gradients."""
    if not aux.requires_grad:
        return y
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=aux.device)
    return _AuxLossInjector.apply(y, aux, scale.detach())
