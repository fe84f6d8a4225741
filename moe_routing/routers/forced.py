"""Routing replay input checks: the forced selection a router reads from ``RoutingContext.forced_experts``.

Fixed-k routers take int [T, K] expert ids (`forced_selection`), variable-k routers that can replay a bool
routing map [T, E] (`forced_routing_map`); rows holding -1 route natively in both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..decision import RoutingContext
from ..settings import debug_checks


def reject_forced_experts(router: object, ctx: Optional[RoutingContext], layer_key: object) -> None:
    """Variable-k routers cannot replay a [T, K] choice: say so instead of silently ignoring it."""
    if ctx is not None and layer_key in ctx.forced_experts:
        raise ValueError(f"{type(router).__name__} does not support forced_experts (routing replay): it gives "
                         "each token a variable number of experts, so there is no per-token [T, K] choice to "
                         "replay")


def forced_selection(ctx: Optional[RoutingContext], layer_key: object, num_tokens: int, top_k: int,
                     num_experts: int, device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(forced_TK, native_T)`` from ``ctx.forced_experts[layer_key]`` (routing replay), or ``(None, None)``.

    ``forced_TK``: int64 [T, K] on ``device``, ids in [0, E) with distinct experts per token, except rows holding
    the sentinel -1 (in any column), which route natively: ``native_T`` bool [T] marks them (None when there are
    none). The id range is always checked (outside the compiler; one host sync on accelerators, which also tells
    whether any row is a sentinel row); repeated experts within a token on the host for CPU tensors, and on
    accelerators only with ``MOE_ROUTING_DEBUG=1`` (a second sync per forward).
    """
    if ctx is None or layer_key not in ctx.forced_experts:
        return None, None
    idx = ctx.forced_experts[layer_key]
    if (not isinstance(idx, Tensor) or idx.shape != (num_tokens, top_k) or idx.is_floating_point()
            or idx.is_complex() or idx.dtype == torch.bool):
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"forced_experts[{layer_key!r}] must be an integer tensor of shape [{num_tokens}, {top_k}], "
                         f"got {got}")
    if not num_tokens:
        return idx.long().to(device), None
    if torch.compiler.is_compiling():  # no data-dependent branch: sentinel rows are looked for every time
        idx = idx.long().to(device)
        native_T = (idx < 0).any(1)
        return idx.masked_fill(native_T[:, None], 0), native_T
    # an out-of-range id would index out of bounds in dispatch: always checked, a sync on accelerators
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(idx.long())).tolist())
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"forced_experts[{layer_key!r}] has ids outside [0, {num_experts}) (-1 marks a row that "
                         f"routes natively), got ids in [{lo}, {hi}]")
    native_T = (idx < 0).any(1) if lo == -1 else None
    if top_k > 1 and (idx.device.type == "cpu" or debug_checks()):
        s = idx.sort(dim=1).values
        repeated = (s[:, 1:] == s[:, :-1]).any(1)
        if native_T is not None:
            repeated &= ~native_T.to(repeated.device)
        if bool(repeated.any()):
            raise ValueError(f"forced_experts[{layer_key!r}] repeats an expert within a token; each row must "
                             f"hold {top_k} distinct experts")
    idx = idx.long().to(device)
    if native_T is None:
        return idx, None
    native_T = native_T.to(device)
    return idx.masked_fill(native_T[:, None], 0), native_T


def forced_routing_map(ctx: Optional[RoutingContext], layer_key: object, num_tokens: int, num_experts: int,
                       device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(chosen_TE, native_T)`` from ``ctx.forced_experts[layer_key]`` holding a routing map for a variable-k
    router: bool [T, E] (every row replayed), or an integer [T, E] of 0/1 where rows holding -1 route natively
    (``native_T``, None when there are none). ``(None, None)`` without replay."""
    if ctx is None or layer_key not in ctx.forced_experts:
        return None, None
    m = ctx.forced_experts[layer_key]
    if (not isinstance(m, Tensor) or m.shape != (num_tokens, num_experts) or m.is_floating_point()
            or m.is_complex()):
        got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"forced_experts[{layer_key!r}] must be a routing map, a bool (or 0/1/-1 integer) tensor "
                         f"of shape [{num_tokens}, {num_experts}], got {got}")
    if m.dtype == torch.bool:
        return m.to(device), None
    if num_tokens and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(m.long())).tolist())
        if lo < -1 or hi > 1:
            raise ValueError(f"forced_experts[{layer_key!r}] routing map must hold 0/1 (-1 marks a row that routes "
                             f"natively), got values in [{lo}, {hi}]")
    m = m.to(device)
    native_T = (m < 0).any(1)
    return m > 0, native_T


def forced_experts_TK(ctx: Optional[RoutingContext], layer_key: object, num_tokens: int, top_k: int,
                      num_experts: int, device: torch.device) -> Optional[Tensor]:
    """``ctx.forced_experts[layer_key]`` checked to be int [T, K] in [0, E) with distinct experts per token,
    or None (routing replay without sentinel rows; see `forced_selection`, which also accepts them)."""
    forced, native_T = forced_selection(ctx, layer_key, num_tokens, top_k, num_experts, device)
    if native_T is not None:
        raise ValueError(f"forced_experts[{layer_key!r}] has ids outside [0, {num_experts})")
    return forced
