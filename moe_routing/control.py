"""Model-level controls: per-step controllers, aux-loss scale and values, and the routing context helper.

Nothing here is module-global: every function takes the model and acts on the MoE layers inside it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from torch.utils.hooks import RemovableHandle

from .decision import RoutingContext
from .layer import MoELayer
from .routers.base import Router
from .selection import LayerRouting
from .validation import check_float


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``(name, layer)`` for every `MoELayer` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of ``model`` that routes through a `LayerRouting`, in module order: the
    `MoELayer`s, and the routers `moe_routing.integrations.hf.swap_routers` put into a Hugging Face model's sparse
    blocks (`RouterGate`). What recording, replay, interventions and rerouting act on; each has ``router``,
    ``num_experts``, ``top_k`` and ``layer_key``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "_routing", None), LayerRouting)]


@torch.no_grad()
def step(model: nn.Module, group=None) -> None:
    """Run every per-step controller (aux-free bias balancing, ReMoE's lambda) once.

    Call it after ``optimizer.step()``, or let `attach` call it. Controllers use the statistics accumulated over
    the micro-batches since the last call; every router's statistics are summed over ``group`` (data parallel)
    in one stacked all-reduce when `torch.distributed` is initialised. Modules other than routers that define
    ``moe_step(group)`` are called too.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    Router.moe_step_all(routers, group)
    for module in model.modules():
        if not isinstance(module, Router) and callable(getattr(module, "moe_step", None)):
            module.moe_step(group)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, group=None) -> RemovableHandle:
    """Run `step(model, group)` after every ``optimizer.step()`` (an optimizer step post-hook), so no training
    loop can forget the controllers. Returns the hook's handle (``handle.remove()`` detaches it).

    A step the optimizer skips (AMP's GradScaler on an inf/NaN gradient) runs no controller: its statistics
    carry over to the next step. Attach once per model and optimizer: attaching twice runs the controllers twice.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

    def run_controllers(opt, args, kwargs) -> None:
        step(model, group)

    return optimizer.register_step_post_hook(run_controllers)


@contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the router logits [T, E] (in the graph) of every MoE layer call inside the block, in call order --
    what Hugging Face's ``output_router_logits=True`` returns -- for `hf_load_balancing_loss`::

        with mr.record_router_logits(model) as logits:
            out = model(x)
        loss = lm_loss + router_aux_loss_coef * mr.hf_load_balancing_loss(logits, top_k, attention_mask)

    An activation checkpoint's recompute inside backward records nothing (its forward was recorded).
    """
    logits: list[Tensor] = []

    def record(router, args, decision) -> None:
        if torch._C._current_graph_task_id() == -1:
            logits.append(decision.logits_TE)

    routers = {id(layer.router): layer.router for _, layer in moe_layers(model)}  # a shared router hooks once
    handles = [router.register_forward_hook(record) for router in routers.values()]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale the aux-loss gradient injected by every MoE layer (e.g. ``1 / grad_accum_steps``, or the AMP
    loss scale), as if ``scale * aux_loss`` were added to the training loss.

    The scale is written in place into each layer's ``aux_loss_scale`` buffer, so a compiled model picks up a
    new value without recompiling.
    """
    value = check_float("scale", scale, 0.0)
    for _, layer in moe_layers(model):
        layer.aux_loss_scale.fill_(value)


def aux_losses(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The last forward's aux-loss values (coefficient applied, detached) per MoE layer, for logging."""
    return {name: dict(layer.last_aux_losses) for name, layer in moe_layers(model)}


def total_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the last forward's aux-loss values over all layers (detached), for logging."""
    values = [v for losses in aux_losses(model).values() for v in losses.values()]
    return torch.stack(values).sum() if values else torch.zeros(())


@contextmanager
def routing_context(model: nn.Module, ctx: Optional[RoutingContext] = None, **kwargs) -> Iterator[RoutingContext]:
    """Set one `RoutingContext` on every MoE layer of ``model`` for the duration of the block.

    ``kwargs`` build the context (``token_ids``, ``padding_mask``, ``seq_lens``, ``forced_experts``) when none
    is given. Layers without a ``layer_idx`` get their position among the model's MoE layers for the
    duration of the block (that is the key ``forced_experts`` and ``layer_state`` use); on exit every layer's
    ``layer_idx`` and context are restored to what they were.
    """
    ctx = ctx if ctx is not None else RoutingContext(**kwargs)
    layers = moe_layers(model)
    previous = [(layer, layer.layer_idx, layer._ctx) for _, layer in layers]
    for i, (_, layer) in enumerate(layers):
        if layer.layer_idx is None:
            layer.layer_idx = i
        layer._ctx = ctx
    try:
        yield ctx
    finally:
        # restore what the block found: an index assigned here must not outlive it (a later model edit
        # would otherwise key two layers' state alike), and nested contexts unwind to the outer one
        for layer, layer_idx, old_ctx in previous:
            layer.layer_idx, layer._ctx = layer_idx, old_ctx
