"""Expert shards and their checkpoints: `ShardedExperts` (a contiguous range of the global experts) and
`reshard_expert_state_dicts` (a checkpoint written at one expert-parallel size, loaded at another).

A shard's state-dict keys name the global experts they hold: ``experts.w_up@4:8`` is ``w_up`` of global experts
4..7 ([4, 8)). A single-device layer writes the plain key (``experts.w_up``, all E experts). So the union of every
rank's state dict is a complete, self-describing checkpoint, and re-sharding is concatenating ranges and
splitting them again.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..experts import GroupedExperts
from ..validation import check_int

_WEIGHTS = ("w_gate", "w_up", "w_down")
#: a sharded expert weight's key: ``<module path>.<weight>@<first>:<end>``
_SHARD_KEY = re.compile(r"^(?P<base>(?:.*\.)?(?:w_gate|w_up|w_down))@(?P<lo>\d+):(?P<hi>\d+)$")
#: a full (unsharded) grouped-experts weight: ``[...].experts.w_up``; ``shared_experts.w_up`` does not match
DEFAULT_EXPERT_KEY = r"(?:^|\.)experts\.(?:w_gate|w_up|w_down)$"


def shard_key(name: str, first: int, end: int) -> str:
    """The state-dict key of weight ``name`` for global experts ``[first, end)``."""
    return f"{name}@{first}:{end}"


class ShardedExperts(GroupedExperts):
    """Global experts ``[first_expert, first_expert + num_local)`` of a layer with ``total_experts`` experts.

    Computes like a `GroupedExperts` of ``num_local`` experts (rows sorted by local expert); its state-dict keys
    carry the global range (``w_up@4:8``). Loading accepts that exact range, or a full checkpoint's plain key
    with all ``total_experts`` experts (the shard is sliced out); any other range is an error that points to
    `reshard_expert_state_dicts`.
    """

    def __init__(self, num_local: int, first_expert: int, total_experts: int, hidden_size: int,
                 ffn_hidden_size: int, activation: str = "swiglu", expert_impl: str = "auto", device=None,
                 dtype=None) -> None:
        super().__init__(num_local, hidden_size, ffn_hidden_size, activation, expert_impl, device=device,
                         dtype=dtype)
        check_int("total_experts", total_experts, 1)
        check_int("first_expert", first_expert, 0, total_experts - num_local)
        self.first_expert, self.total_experts = first_expert, total_experts
        self.register_state_dict_post_hook(_name_shard_keys)
        self.register_load_state_dict_pre_hook(_read_shard_keys)

    @property
    def expert_range(self) -> tuple[int, int]:
        """``(first, end)``: the global experts ``[first, end)`` this shard holds."""
        return self.first_expert, self.first_expert + self.num_experts

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        return f"global experts [{lo}, {hi}) of {self.total_experts}"


def _name_shard_keys(module: ShardedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    lo, hi = module.expert_range
    for name in _WEIGHTS:
        if prefix + name in state_dict:
            state_dict[prefix + shard_key(name, lo, hi)] = state_dict.pop(prefix + name)


def _read_shard_keys(module: ShardedExperts, state_dict: dict, prefix: str, local_metadata, strict,
                     missing_keys, unexpected_keys, error_msgs) -> None:
    lo, hi = module.expert_range
    for name in _WEIGHTS:
        if getattr(module, name) is None:
            continue
        own, full = prefix + shard_key(name, lo, hi), prefix + name
        if own in state_dict:
            state_dict[full] = state_dict.pop(own)
        elif full in state_dict and state_dict[full].shape[0] == module.total_experts:
            state_dict[full] = state_dict[full][lo:hi]
        else:
            others = sorted(k for k in state_dict if k.startswith(full + "@"))
            if others:
                raise ValueError(f"checkpoint holds {', '.join(others)} but this rank holds global experts "
                                 f"[{lo}, {hi}) ({own}); re-shard it with "
                                 "moe_routing.dispatch.reshard_expert_state_dicts")


def reshard_expert_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]], ep_size: int,
                               expert_key: str = DEFAULT_EXPERT_KEY) -> list[dict[str, Tensor]]:
    """Re-shard a checkpoint to ``ep_size`` expert-parallel ranks.

    Args:
        state_dicts: the checkpoint: every rank's state dict of an expert-parallel run (in any order; sharded
            keys ``...w_up@lo:hi`` say where they belong), or one single-device state dict (plain keys).
            Other keys (routers, shared experts, ...) are replicated: they are taken from the first dict.
        ep_size: the new expert-parallel size; 1 gives one single-device state dict (plain keys).
        expert_key: regex matching an unsharded grouped-experts weight key (default: ``[...].experts.w_*``).
    Returns:
        ``ep_size`` state dicts; rank r's holds global experts ``[r*E/ep_size, (r+1)*E/ep_size)`` of each layer.
    """
    check_int("ep_size", ep_size, 1)
    if not state_dicts:
        raise ValueError("state_dicts must hold at least one state dict")
    pattern = re.compile(expert_key)
    pieces: dict[str, list[tuple[int, int, Tensor]]] = {}
    replicated: dict[str, Tensor] = {}
    for i, sd in enumerate(state_dicts):
        for key, value in sd.items():
            m = _SHARD_KEY.match(key)
            if m is not None:
                pieces.setdefault(m["base"], []).append((int(m["lo"]), int(m["hi"]), value))
            elif pattern.search(key) is not None:
                pieces.setdefault(key, []).append((0, value.shape[0], value))
            elif i == 0:
                replicated[key] = value
    out: list[dict[str, Tensor]] = [dict(replicated) for _ in range(ep_size)]
    for base, parts in pieces.items():
        full = _join(base, parts)
        E = full.shape[0]
        if E % ep_size:
            raise ValueError(f"{base} has {E} experts, not divisible by ep_size={ep_size}")
        per = E // ep_size
        for r in range(ep_size):
            key = base if ep_size == 1 else shard_key(base, r * per, (r + 1) * per)
            out[r][key] = full[r * per:(r + 1) * per].clone()
    return out


def _join(base: str, parts: list[tuple[int, int, Tensor]]) -> Tensor:
    """The full [E, ...] weight from its ranges; they must tile [0, E) exactly (duplicates must agree)."""
    by_range: dict[tuple[int, int], Tensor] = {}
    for lo, hi, value in parts:
        if value.shape[0] != hi - lo:
            raise ValueError(f"{base}@{lo}:{hi} has {value.shape[0]} experts, not {hi - lo}")
        prev = by_range.setdefault((lo, hi), value)
        if prev is not value and not torch.equal(prev, value):
            raise ValueError(f"two different tensors for {base}@{lo}:{hi}")
    end = 0
    tiles = []
    for (lo, hi), value in sorted(by_range.items()):
        if lo != end:
            raise ValueError(f"{base}: the checkpoint's expert ranges {sorted(by_range)} do not tile [0, E) "
                             f"(gap or overlap at expert {end})")
        tiles.append(value)
        end = hi
    return torch.cat(tiles)
