"""Megatron-Core ``RouterReplay`` interop: our ``experts_TLK`` record <-> mcore's per-layer ``[T, K]`` indices.

Megatron-Core (>= 0.16, `megatron/core/transformer/moe/router_replay.py`) gives every ``TopKRouter`` built with
``moe_enable_routing_replay=True`` a ``RouterReplay`` instance, registered in creation order in
``RouterReplay.global_router_replay_instances``. ``topk_routing_with_score_function``
(`transformer/moe/moe_utils.py`) asks it for the top-k: under ``RouterReplayAction.RECORD`` it computes and keeps
the int64 ``[T, K]`` indices (``get_recorded_data()`` returns one per layer); under ``REPLAY_FORWARD`` it uses
the target indices set by ``set_replay_data(list_of_L_tensors)`` and gathers the scores at them; under
``REPLAY_BACKWARD`` (activation recompute) it pops the indices queued by each ``set_replay_data`` call in order.

Token order: mcore routers see hidden states ``[S, B, H]`` and flatten the logits sequence-first (token
``s * B + b``); our layer flattens a ``[B, S, D]`` input batch-first (token ``b * S + s``). Pass ``batch_size=B``
to convert between the two; leave it None for packed (THD, ``B = 1``) input, where both orders agree.

mcore has no sentinel for "route natively": rows marked -1 (the last token of an engine record, padding) must
be filled before replay in mcore, from ``fill_TLK`` (e.g. the trainer's own routing of the same micro-batch from
a RECORD pass, or any K distinct experts for rows whose output never reaches the loss).

Nothing here imports megatron unless a function that talks to ``RouterReplay`` is called.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..validation import check_int


def _reorder(x_T: Tensor, batch_size: Optional[int], to_sequence_first: bool) -> Tensor:
    """``x`` ([T, ...]) re-ordered between batch-first (``b * S + s``) and sequence-first (``s * B + b``) tokens."""
    if batch_size is None:
        return x_T
    check_int("batch_size", batch_size, 1)
    T = x_T.shape[0]
    if T % batch_size:
        raise ValueError(f"the record has {T} tokens, not a multiple of batch_size={batch_size}")
    rest = x_T.shape[1:]
    outer, inner = (batch_size, T // batch_size) if to_sequence_first else (T // batch_size, batch_size)
    return x_T.reshape(outer, inner, *rest).transpose(0, 1).reshape(T, *rest)


def _check_record(name: str, ids: Tensor) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 3:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a [T, L, K] tensor of expert ids, got {got}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer expert ids, got dtype {ids.dtype}")


def to_megatron(experts_TLK: Tensor, *, batch_size: Optional[int] = None, fill_TLK: Optional[Tensor] = None,
                device=None) -> list[Tensor]:
    """Our record ``[T, L, K]`` (any integer dtype) as the list of L int64 ``[T, K]`` tensors
    ``RouterReplay.set_replay_data`` takes, in mcore's token order.

    Args:
        experts_TLK: the record, tokens in our order (batch-first for a ``[B, S, D]`` batch).
        batch_size: B of a ``[B, S, D]`` batch (mcore sees ``[S, B, H]``); None keeps the token order.
        fill_TLK: same shape; supplies the rows ``experts_TLK`` marks -1 (mcore cannot route them natively).
        device: where the tensors go (default: the record's device; mcore moves them to the scores' device).
    """
    _check_record("experts_TLK", experts_TLK)
    ids = experts_TLK.long()
    missing_TL = (ids < 0).any(-1)
    if bool(missing_TL.any()):
        if fill_TLK is None:
            t, l = (int(i[0]) for i in missing_TL.nonzero(as_tuple=True))
            raise ValueError(f"experts_TLK marks {int(missing_TL.sum())} (token, layer) rows -1 (first: token {t}, "
                             f"layer {l}); Megatron-Core's RouterReplay cannot route them natively: pass fill_TLK "
                             "(e.g. the trainer's own routing from a RECORD pass of the same micro-batch)")
        _check_record("fill_TLK", fill_TLK)
        if fill_TLK.shape != ids.shape:
            raise ValueError(f"fill_TLK has shape {tuple(fill_TLK.shape)} but experts_TLK has {tuple(ids.shape)}")
        fill = fill_TLK.to(device=ids.device, dtype=torch.long)
        ids = torch.where(missing_TL.unsqueeze(-1), fill, ids)
        if bool((ids < 0).any()):
            raise ValueError("fill_TLK has -1 in a row experts_TLK leaves unreported")
    ids = _reorder(ids, batch_size, to_sequence_first=True)
    if device is not None:
        ids = ids.to(device)
    return [ids[:, l].contiguous() for l in range(ids.shape[1])]


def from_megatron(per_layer_TK: Sequence[Optional[Tensor]], *, batch_size: Optional[int] = None) -> Tensor:
    """mcore's per-layer ``[T, K]`` indices (``RouterReplay.get_recorded_data()``) as our int16 ``[T, L, K]``
    record on the CPU, in our token order (``batch_size``: see `to_megatron`)."""
    layers = list(per_layer_TK)
    if not layers:
        raise ValueError("per_layer_TK is empty: no RouterReplay instance recorded anything (build the routers "
                         "with moe_enable_routing_replay=True)")
    for l, t in enumerate(layers):
        if t is None:
            raise ValueError(f"per_layer_TK[{l}] is None: that layer recorded nothing (set "
                             "RouterReplayAction.RECORD before the forward, and call this before clear_indices)")
        if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"per_layer_TK[{l}] must be an integer [T, K] tensor, got {got}")
        if t.shape != layers[0].shape:
            raise ValueError(f"per_layer_TK[{l}] has shape {tuple(t.shape)} but per_layer_TK[0] has "
                             f"{tuple(layers[0].shape)}")
    ids = torch.stack([t.detach().cpu().long() for t in layers], dim=1)
    if ids.numel() and bool(((ids < 0) | (ids > torch.iinfo(torch.int16).max)).any()):
        raise ValueError("per_layer_TK has expert ids outside [0, 32767]")
    return _reorder(ids, batch_size, to_sequence_first=False).to(torch.int16)


def _router_replay():
    try:
        from megatron.core.transformer.moe.router_replay import RouterReplay
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("Megatron-Core routing replay needs megatron-core >= 0.16 (pip install "
                          "'moe_routing[megatron]')") from exc
    return RouterReplay


def set_megatron_replay(experts_TLK: Tensor, *, batch_size: Optional[int] = None,
                        fill_TLK: Optional[Tensor] = None, device=None) -> None:
    """``RouterReplay.set_replay_data(to_megatron(...))``: queue one micro-batch's routing for every mcore router
    (one call per micro-batch forward; ``REPLAY_BACKWARD`` recomputes consume the calls in order)."""
    RouterReplay = _router_replay()
    data = to_megatron(experts_TLK, batch_size=batch_size, fill_TLK=fill_TLK, device=device)
    RouterReplay.set_replay_data(data)


def get_megatron_record(*, batch_size: Optional[int] = None) -> Tensor:
    """``from_megatron(RouterReplay.get_recorded_data())``: what every mcore router recorded in its last
    ``RECORD`` forward, as our int16 ``[T, L, K]``."""
    return from_megatron(_router_replay().get_recorded_data(), batch_size=batch_size)
