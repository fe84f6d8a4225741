"""Editing the router logits of chosen MoE layers for the duration of a block (what test-time rerouting needs).

`edit_router_logits(model, {layer: fn})` makes layer ``layer``'s router compute ``fn(logits_TE)`` in place of its
logits, before scores and selection: top-k, gates, losses and stats all see the edited logits, exactly as if the
router had produced them. ``fn`` may be differentiable (a gradient then reaches whatever it closes over: additive
vectors, a routing-weight vector being optimised). Additive offsets are the special case ``lambda l: l + delta``
(`add_to_router_logits`).

Mechanism: the edit is installed in the layer's routing hooks (`moe_routing.selection.LayerRouting.logit_edits`,
the channel `moe_routing.intervene`'s offsets use too); the layer hands it to its router through the
`RoutingContext` and `GatedRouter.route` applies it right after the offsets. No router is patched; nested blocks
compose (outer first) and each is removed on exit. Layers are numbered by their order in ``model``
(`moe_routing.routing_layers`: `MoELayer`s, or the routers `integrations.hf.swap_routers` puts into an HF model),
and only `GatedRouter`s (routers with a ``gating`` step) can be edited.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..control import routing_layers
from ..routers.base import GatedRouter
from ..validation import check_int

#: ``logits_TE -> logits_TE`` (same shape); applied to a router's logits before selection
LogitEdit = Callable[[Tensor], Tensor]


def layers_of(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of ``model`` in module order (`moe_routing.routing_layers`; ValueError when there is none)."""
    layers = [layer for _, layer in routing_layers(model)]
    if not layers:
        raise ValueError(f"model must contain at least one moe_routing.MoELayer (or HF sparse block after "
                         f"integrations.hf.swap_routers), got a {type(model).__name__} without any")
    return layers


def output_logits(output) -> Tensor:
    """The logits of a model's output: the tensor itself, an HF ``ModelOutput``'s ``logits``, or the first item
    of a tuple (what a causal LM ``ids -> logits [B, S, V]`` returns in each convention)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model must return logits [B, S, V] (a tensor, an output with .logits, or a tuple "
                    f"starting with them), got {type(output).__name__}")


def check_layer_indices(name: str, layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """``layers`` as a tuple of distinct MoE-layer indices in [0, num_layers)."""
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"{name} must be a non-empty sequence of MoE-layer indices in [0, {num_layers}), got "
                        f"{layers!r}")
    out = tuple(check_int(f"{name}[{i}]", v, 0, num_layers - 1) for i, v in enumerate(layers))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a layer twice: {list(out)}")
    return out


@contextmanager
def edit_router_logits(model: nn.Module, edits: Mapping[int, LogitEdit]) -> Iterator[None]:
    """Within the block, MoE layer ``i`` of ``model`` routes on ``edits[i](logits_TE)`` instead of its logits.

    Args:
        model: any module containing `MoELayer`s (or an `MoELayer`), or an HF model after `swap_routers`;
            layers are indexed in module order.
        edits: ``{layer index: fn}``; ``fn`` maps float [T, E] logits to [T, E] logits (T = the tokens of that
            forward, flattened in the layer's input order).
    """
    layers = layers_of(model)
    if not isinstance(edits, Mapping):
        raise TypeError(f"edits must be a mapping {{layer index: callable}}, got {type(edits).__name__}")
    if edits:
        check_layer_indices("edits (keys)", list(edits), len(layers))
    for i, fn in edits.items():
        if not callable(fn):
            raise TypeError(f"edits[{i}] must be a callable logits_TE -> logits_TE, got {type(fn).__name__}")
        if not isinstance(layers[i].router, GatedRouter):
            raise TypeError(f"MoE layer {i} has a {type(layers[i].router).__name__}, which computes no logits to "
                            "edit (only GatedRouter subclasses can be rerouted)")
    installed = []
    try:
        for i, fn in edits.items():
            installed.append((layers[i]._routing, fn))
            layers[i]._routing.logit_edits.append(fn)
        yield
    finally:
        for routing, fn in reversed(installed):
            routing.logit_edits = [f for f in routing.logit_edits if f is not fn]


def add_to_router_logits(model: nn.Module, offsets: Mapping[int, Tensor]):
    """`edit_router_logits` adding ``offsets[i]`` (float [E], or anything broadcasting to [T, E]) to layer i's
    logits: the additive-vector intervention test-time rerouting optimises."""
    return edit_router_logits(model, {i: (lambda logits_TE, d=d: logits_TE + d.to(logits_TE.dtype))
                                      for i, d in offsets.items()})


@contextmanager
def without_aux_gradient(model: nn.Module) -> Iterator[None]:
    """Zero every MoE layer's injected aux-loss gradient for the block (restored on exit): test-time objectives
    optimise the task loss alone, and the balance losses must not leak into their gradient. (A swapped HF router
    injects none: HF adds its aux loss only to the output's ``loss`` / ``aux_loss``.)"""
    layers = [layer for _, layer in routing_layers(model) if hasattr(layer, "aux_loss_scale")]
    saved = [layer.aux_loss_scale.clone() for layer in layers]
    try:
        for layer in layers:
            layer.aux_loss_scale.zero_()
        yield
    finally:
        with torch.no_grad():
            for layer, value in zip(layers, saved):
                layer.aux_loss_scale.copy_(value)
