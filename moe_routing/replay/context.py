"""`record_routing` and `replay_routing`: record every MoE layer's selection, or force a recorded one (R2/R3).

Both install per-layer hooks on the `MoELayer`s (`MoELayer._routing`, see `moe_routing.selection`; the HF routers
`integrations.hf.swap_routers` puts in alike: `moe_routing.routing_layers`) for the duration of the block; no
router is patched. Replay goes through the routers' ``forced_experts`` channel, so gates are recomputed from the
current router's full scores and replayed experts keep their gradient.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..decision import RoutingDecision
from ..routers.base import GatedRouter
from ..selection import selection_of
from .record import RoutingRecord, host_tensor, ids_dtype, model_layout


def _to_host(t: Tensor) -> Tensor:
    """An asynchronous copy of ``t`` into pinned host memory (a plain copy from the CPU)."""
    if t.device.type == "cpu":
        return t.clone()
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return buf.copy_(t, non_blocking=True)


@contextmanager
def record_routing(model: nn.Module, keep_scores: bool = False) -> Iterator[RoutingRecord]:
    """Record the selection of every MoE layer of ``model`` for every forward call in the block.

    Grad or no grad, train or eval; a checkpoint recomputation is not a new call and is not recorded. Yields a
    `RoutingRecord` filled when the block exits: ``experts_TLK`` (uint8 / int16 [T, L, K], T = the tokens of
    all calls concatenated in call order), or ``routing_map_TLE`` (bool [T, L, E]) when a layer routes a
    variable number of experts; ``scores_TLE`` (float32) with ``keep_scores=True``. Each call's selection is
    copied to pinned host memory asynchronously as it is made; the block's exit waits for the copies.
    Every layer must route the same tokens (ValueError otherwise).
    """
    if not isinstance(keep_scores, bool):
        raise TypeError(f"keep_scores must be a bool, got {type(keep_scores).__name__} {keep_scores!r}")
    names, experts, top_k, kinds, as_map = model_layout(model)
    from ..control import routing_layers

    layers = [layer for _, layer in routing_layers(model)]
    E_max = max(experts)
    chunks: list[list[Tensor]] = [[] for _ in layers]
    score_chunks: list[list[Tensor]] = [[] for _ in layers]

    def recorder(i: int):
        def record(decision: RoutingDecision) -> None:
            sel = selection_of(decision)
            if as_map:
                if decision.top_k is not None:  # a fixed-k layer in a model that records maps
                    sel = torch.zeros(sel.shape[0], E_max, dtype=torch.bool, device=sel.device).scatter_(1, sel, True)
                elif sel.shape[1] < E_max:
                    sel = torch.nn.functional.pad(sel, (0, E_max - sel.shape[1]))
            else:
                sel = sel.to(ids_dtype(E_max))
            chunks[i].append(_to_host(sel))
            if keep_scores:
                s = decision.scores_TE.detach().float()
                score_chunks[i].append(_to_host(torch.nn.functional.pad(s, (0, E_max - s.shape[1]))))
        return record

    hooks = [(layer, recorder(i)) for i, layer in enumerate(layers)]
    dummy = torch.zeros(0, len(layers), E_max if as_map else top_k,
                        dtype=torch.bool if as_map else ids_dtype(E_max))
    record = RoutingRecord(layer_names=names, num_experts=experts, top_k=top_k, router_kinds=kinds,
                           **({"routing_map_TLE": dummy} if as_map else {"experts_TLK": dummy}))
    for layer, hook in hooks:
        layer._routing.recorders.append(hook)
    try:
        yield record
    finally:
        for layer, hook in hooks:
            layer._routing.recorders.remove(hook)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the asynchronous copies into pinned memory
    counts = [sum(c.shape[0] for c in per_layer) for per_layer in chunks]
    if len(set(counts)) > 1:
        bad = next(i for i, c in enumerate(counts) if c != counts[0])
        raise ValueError(f"record_routing: MoE layer {names[bad]!r} routed {counts[bad]} tokens in the block but "
                         f"{names[0]!r} routed {counts[0]}; every layer must see every recorded token")
    if counts and counts[0]:
        data = host_tensor(torch.stack([torch.cat(c) for c in chunks], 1))
        if as_map:
            record.routing_map_TLE = data
        else:
            record.experts_TLK = data
        if keep_scores:
            record.scores_TLE = host_tensor(torch.stack([torch.cat(c) for c in score_chunks], 1))
    elif keep_scores:
        record.scores_TLE = torch.zeros(0, len(layers), E_max)


def _check_replay_data(data: Tensor, names: list[str], experts: list[int], top_k: int, layers) -> None:
    L = len(names)
    for name, layer in zip(names, layers):
        if layer.router.variable_k and not _replays_maps(layer.router):
            raise ValueError(f"MoE layer {name!r}: {type(layer.router).__name__} does not support forced_experts "
                             "(routing replay): it chooses tokens per expert, so there is no per-token choice to "
                             "replay")
    if not isinstance(data, Tensor) or data.is_floating_point() or data.is_complex() or data.dim() != 3:
        got = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"experts_TLK must be an integer tensor [T, L, K] (or a bool routing map [T, L, E], or a "
                         f"RoutingRecord), got {got}")
    if data.shape[1] != L:
        raise ValueError(f"experts_TLK has {data.shape[1]} layers (shape {tuple(data.shape)}) but the model has {L} "
                         f"MoE layers; select the MoE layers of an engine's output (dense layers counted?)")
    if data.dtype == torch.bool:
        if data.shape[2] < max(experts):
            raise ValueError(f"routing_map_TLE must have shape [T, {L}, {max(experts)}], got {tuple(data.shape)}")
        return
    variable = [n for n, layer in zip(names, layers) if layer.router.variable_k]
    if variable:
        raise ValueError(f"MoE layer {variable[0]!r} routes a variable number of experts: replay it from a bool "
                         f"routing map [T, L, E] (RoutingRecord.routing_map_TLE), not expert ids")
    if data.shape[2] != top_k:
        raise ValueError(f"experts_TLK has K={data.shape[2]} experts per token but the model's MoE layers have "
                         f"top_k={top_k}")
    if data.numel():
        lo = int(data.min())
        hi_L = data.amax(dim=(0, 2)).tolist()
        bad = [i for i, (h, e) in enumerate(zip(hi_L, experts)) if h >= e]
        if lo < -1 or bad:
            i = bad[0] if bad else 0
            raise ValueError(f"experts_TLK has expert ids outside [0, {experts[i]}) (-1 marks a token that routes "
                             f"natively): ids in [{lo}, {max(hi_L)}], layer {names[i]!r} has {experts[i]} experts")


def _replays_maps(router) -> bool:
    """Whether a variable-k router overrides `GatedRouter.forced_map` (can replay a routing map)."""
    return getattr(type(router), "forced_map", GatedRouter.forced_map) is not GatedRouter.forced_map


def _layer_replay(data_TX: Tensor, mask_T: Optional[Tensor], name: str, top_k: int, variable_k: bool):
    """The forced selection of one layer for a call of ``num_tokens`` tokens on ``device``."""
    def forced(num_tokens: int, device: torch.device) -> Tensor:
        if num_tokens != data_TX.shape[0]:
            raise ValueError(f"replay_routing: experts_TLK holds T={data_TX.shape[0]} tokens but MoE layer {name!r} "
                             f"got an input of {num_tokens} tokens; one block replays one forward (micro-batch)")
        sel = data_TX.to(device, non_blocking=True)
        mask = None if mask_T is None else mask_T.to(device, non_blocking=True)
        if variable_k:  # a routing map; rows to route natively hold -1
            sel = sel.to(torch.int8)
            return sel if mask is None else sel.masked_fill(~mask[:, None], -1)
        if sel.dtype == torch.bool:  # a fixed-k layer replayed from a map: its K experts, in id order
            sel = sel.float().topk(top_k, dim=1, sorted=False).indices
        sel = sel.long()
        if mask is not None:
            sel = sel.masked_fill(~mask[:, None], -1)
        # canonical column order: the same expert set gives bitwise the same gates, dispatch and output
        return sel.sort(dim=1).values
    return forced


@contextmanager
def replay_routing(model: nn.Module, experts_TLK: Union[Tensor, RoutingRecord],
                   token_mask_T: Optional[Tensor] = None) -> Iterator[None]:
    """Inside the block MoE layer l routes its tokens to ``experts_TLK[:, l]`` (R3: a rollout engine's routing;
    R2: the old policy's, recorded by `record_routing`).

    One block wraps one model forward (a micro-batch), whether the layers are called through the model or one
    by one; each layer's input must hold T tokens (ValueError naming both otherwise). ``experts_TLK``: any
    integer dtype [T, L, K] (column order free: each token's experts are sorted, so the same set gives bitwise
    the same output and gradients); a bool routing map [T, L, E] (needed for variable-k routers such as ReLU);
    or a `RoutingRecord` (checked against the model first). Tokens where ``token_mask_T`` (bool [T]) is False,
    or whose row holds -1, route natively. Gates come from the current router's scores at the replayed experts,
    so the router keeps its gradient. A layer recomputed by activation checkpointing after the block uses the
    selection of its original forward (`moe_routing.selection`). Expert-choice routers cannot replay (they raise).
    """
    names, experts, top_k, _, _ = model_layout(model)
    from ..control import routing_layers

    layers = [layer for _, layer in routing_layers(model)]
    if isinstance(experts_TLK, RoutingRecord):
        experts_TLK.check_model(model)
        experts_TLK = experts_TLK.selection
    _check_replay_data(experts_TLK, names, experts, top_k, layers)
    if token_mask_T is not None:
        if not isinstance(token_mask_T, Tensor) or token_mask_T.dtype != torch.bool:
            raise TypeError(f"token_mask_T must be a bool tensor [T] (True = replay), got "
                            f"{getattr(token_mask_T, 'dtype', type(token_mask_T).__name__)}")
        if token_mask_T.shape != (experts_TLK.shape[0],):
            raise ValueError(f"token_mask_T must have shape [{experts_TLK.shape[0]}] (T of experts_TLK), got "
                             f"{tuple(token_mask_T.shape)}")
    previous = [layer._routing.replay for layer in layers]
    for l, (name, layer) in enumerate(zip(names, layers)):
        data = experts_TLK[:, l]
        if data.dtype == torch.bool:
            data = data[:, :layer.num_experts]
        layer._routing.replay = _layer_replay(data, token_mask_T, name, layer.top_k, layer.router.variable_k)
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer._routing.replay = old
