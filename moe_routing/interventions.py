"""Routing interventions: add fixed offsets to the router logits of chosen MoE layers for the duration of a block.

Follows the steering of Bandarkar et al. 2025, "Multilingual Routing in Mixture-of-Experts" (arXiv 2510.04694;
no public code): at inference, raise the router logits of chosen experts in chosen layers (their recipe: the
middle layers' experts most activated on a reference input set, e.g. English task data) and leave the rest of
the model untouched. `promote_experts` builds that recipe's offsets from a `collect_routing` result.

Mechanism. ``intervene`` puts one float [E] offset per chosen layer on the layer's `LayerRouting`
(``logit_offsets``, see `moe_routing.selection`); the layer passes it to its router through
``RoutingContext.logit_offsets`` and `GatedRouter.route` adds it to the logits right after `gating`, before the
non-finite check, the scores and the selection. So the scores (softmax, sigmoid, ReLU, ...), the selection, the
gate weights and every router statistic see the shifted logits; fixed-k and variable-k (ReLU, BlockFFN, expert
choice) routers alike. No router class or instance is patched and nothing is kept at module level; the offsets
are removed when the block exits, also on an exception. Nested blocks add up. Routers without logits (hash)
raise.

With routing replay (`replay_routing`) the replayed experts win: the offset cannot change which experts a
replayed token uses, but the gate weights are read from the shifted scores (replay keeps the router's own
gates). A layer recomputed by an activation checkpoint uses the selection of its original forward whatever the
offsets; its gates follow the offsets installed when the recomputation runs (run backward inside the block).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .control import routing_layers
from .routers.base import GatedRouter

Offsets = Mapping[int, float]


def _check_offsets(name: str, offsets: Optional[Offsets], num_experts: int, sign: int) -> dict[int, float]:
    if offsets is None:
        return {}
    if not isinstance(offsets, Mapping):
        raise TypeError(f"{name} must be a dict {{expert id: logit offset}}, got {type(offsets).__name__}")
    out = {}
    for e, v in offsets.items():
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < num_experts:
            raise ValueError(f"{name} has expert id {e!r}; expected an int in [0, {num_experts})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}[{e}] must be a finite number, got {v!r}")
        if v * sign < 0:
            raise ValueError(f"{name}[{e}] = {v!r}: {name} offsets are added to the logits as given and must be "
                             f"{'>= 0' if sign > 0 else '<= 0 (e.g. suppress={e: -2.0})'}")
        out[e] = float(v)
    return out


def _offsets_by_layer(model: nn.Module, layers: Optional[Sequence[int]], boost: Optional[Offsets],
                      suppress: Optional[Offsets], per_layer: Optional[Mapping[int, Offsets]]):
    moes = [layer for _, layer in routing_layers(model)]
    if not moes:
        raise ValueError(f"{type(model).__name__} has no MoELayer (nor an HF sparse block after "
                         "swap_routers): nothing to intervene on")
    L = len(moes)
    if layers is None:
        layers = range(L) if (boost or suppress) else []
    if isinstance(layers, (int, str)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"layers must be a sequence of MoE layer indices (ints), got {layers!r}")
    layers = list(layers)
    bad = [i for i in layers if not -L <= i < L]
    if bad:
        raise ValueError(f"layers holds {bad[0]}; the model has {L} MoE layers (indices in [0, {L}))")
    if per_layer is not None and not isinstance(per_layer, Mapping):
        raise TypeError(f"offsets must be a dict {{layer index: {{expert: offset}}}}, got {type(per_layer).__name__}")
    wanted: dict[int, dict[int, float]] = {}
    for i in layers:
        E = moes[i].num_experts
        merged = _check_offsets("boost", boost, E, +1)
        for e, v in _check_offsets("suppress", suppress, E, -1).items():
            merged[e] = merged.get(e, 0.0) + v
        wanted.setdefault(i % L, {}).update(merged)
    for i, offs in (per_layer or {}).items():
        if not isinstance(i, int) or isinstance(i, bool) or not -L <= i < L:
            raise ValueError(f"offsets has layer {i!r}; the model has {L} MoE layers (indices in [0, {L}))")
        for e, v in _check_offsets(f"offsets[{i}]", offs, moes[i].num_experts, 0).items():
            wanted.setdefault(i % L, {})
            wanted[i % L][e] = wanted[i % L].get(e, 0.0) + v
    for i in wanted:
        if not isinstance(moes[i].router, GatedRouter):
            raise ValueError(f"MoE layer {i} has a {type(moes[i].router).__name__}, which has no router logits to "
                             "offset (interventions need a GatedRouter)")
    return moes, wanted


def logit_offset_vectors(model: nn.Module, layers: Optional[Sequence[int]] = None, boost: Optional[Offsets] = None,
                         suppress: Optional[Offsets] = None,
                         offsets: Optional[Mapping[int, Offsets]] = None) -> dict[int, Tensor]:
    """The float32 [E] offset `intervene` adds to each affected MoE layer's logits, by layer index."""
    moes, wanted = _offsets_by_layer(model, layers, boost, suppress, offsets)
    out = {}
    for i, offs in sorted(wanted.items()):
        vec = torch.zeros(moes[i].num_experts, dtype=torch.float32)
        for e, v in offs.items():
            vec[e] = v
        out[i] = vec
    return out


@contextmanager
def intervene(model: nn.Module, layers: Optional[Sequence[int]] = None, boost: Optional[Offsets] = None,
              suppress: Optional[Offsets] = None, offsets: Optional[Mapping[int, Offsets]] = None) -> Iterator[dict]:
    """Inside the block, MoE layer ``l`` (for ``l`` in ``layers``) routes on ``logits + offset_E``.

    Args:
        model: any module holding `MoELayer`s with gated routers, or an HF model after
            `integrations.hf.swap_routers`; layer indices count its MoE layers in order (`routing_layers`).
        layers: MoE layer indices ``boost`` / ``suppress`` apply to (negative counts from the end; None: all).
        boost: ``{expert: delta}`` added to those experts' logits, delta >= 0.
        suppress: ``{expert: -delta}`` added likewise, values <= 0.
        offsets: per-layer ``{layer: {expert: offset}}`` of any sign (what `promote_experts` returns), added to
            the above.

    Yields ``{layer index: offset_E}`` (float32 [E], on the host) as applied. See the module docstring for
    how the offsets reach the router, and how they compose with replay and activation checkpointing.
    """
    moes, _ = _offsets_by_layer(model, layers, boost, suppress, offsets)
    vectors = logit_offset_vectors(model, layers, boost, suppress, offsets)
    installed = []
    try:
        for i, vec in vectors.items():
            layer = moes[i]
            dev = next(layer.router.parameters(), vec).device
            entry = vec.to(dev)
            layer._routing.logit_offsets.append(entry)
            installed.append((layer, entry))
        yield vectors
    finally:
        for layer, entry in installed:
            # by identity: a nested block installed an equal tensor on the same layer
            layer._routing.logit_offsets = [t for t in layer._routing.logit_offsets if t is not entry]


def middle_layers(num_layers: int, fraction: float = 0.5) -> list[int]:
    """The central ``fraction`` of ``num_layers`` layer indices (at least one), e.g. 8 layers, 0.5 -> [2..5]."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    n = max(1, round(num_layers * fraction))
    start = (num_layers - n) // 2
    return list(range(start, start + n))


def promote_experts(collection, delta: float, top_n: int = 1, layers: Optional[Sequence[int]] = None,
                    fraction: float = 0.5) -> dict[int, dict[int, float]]:
    """The paper's recipe: ``{layer: {expert: delta}}`` promoting, in each of ``layers`` (default: the middle
    ``fraction`` of the MoE layers, `middle_layers`), the ``top_n`` experts most often activated on the
    reference inputs ``collection`` (a `moe_routing.analysis.collect_routing` result). Pass it to
    ``intervene(model, offsets=...)``. Ties go to the lower expert id."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    load_LE = collection.expert_load()
    L, E = load_LE.shape
    if not isinstance(top_n, int) or isinstance(top_n, bool) or not 1 <= top_n <= E:
        raise ValueError(f"top_n must be an int in [1, {E}], got {top_n!r}")
    chosen = middle_layers(L, fraction) if layers is None else [int(i) % L for i in layers]
    out = {}
    for i in chosen:
        # stable sort on -load: equal loads keep id order
        order = torch.sort(-load_LE[i], stable=True).indices[:top_n].tolist()
        out[i] = {int(e): float(delta) for e in order}
    return out
