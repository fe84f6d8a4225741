"""`RoutingRecord`: the routing of every MoE layer of a model over a run of tokens, in the engine layout, on the host.

Layouts (T tokens in call order, L MoE layers in model order, K = top_k, E experts):
    experts_TLK      uint8 (E <= 256) or int16 [T, L, K] expert ids, when every layer routes a fixed k
    routing_map_TLE  bool [T, L, E], when a layer routes a variable number of experts (ReLU); every layer then
                     records a map (a fixed-k layer's map has K True per row)
    scores_TLE       float32 [T, L, E] router scores, when recorded with ``keep_scores=True``
Tensors live on the CPU, pinned when CUDA is available (a long rollout costs no accelerator memory, and the copy
back to the accelerator for replay is asynchronous). Files are safetensors with the metadata needed to check a
record against a model before replaying it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

FORMAT = "moe_routing.RoutingRecord/1"
_TENSORS = ("experts_TLK", "routing_map_TLE", "scores_TLE")


def ids_dtype(num_experts: int) -> torch.dtype:
    """The storage dtype of expert ids: uint8 when E <= 256, else int16."""
    return torch.uint8 if num_experts <= 256 else torch.int16


def host_tensor(t: Tensor) -> Tensor:
    """``t`` on the CPU, pinned when CUDA is available."""
    t = t.cpu()
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


def model_layout(model: nn.Module) -> tuple[list[str], list[int], int, list[str], bool]:
    """``(layer_names, num_experts per layer, top_k, router kinds, any variable-k)`` of ``model``'s MoE layers."""
    from ..control import routing_layers  # the package root imports this module

    layers = routing_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer (nor an HF sparse block after "
                         "swap_routers): nothing to record or replay")
    ks = {layer.top_k for _, layer in layers}
    if len(ks) != 1:
        raise ValueError(f"routing records need one top_k for all MoE layers, the model has {sorted(ks)}")
    return ([name for name, _ in layers], [layer.num_experts for _, layer in layers], ks.pop(),
            [type(layer.router).__name__ for _, layer in layers],
            any(layer.router.variable_k for _, layer in layers))


@dataclass
class RoutingRecord:
    """Recorded routing (see the module docstring for the layouts).

    Attributes:
        layer_names: the MoE layers' module names, in model order (L).
        num_experts: E of each layer.   top_k: K (nominal for variable-k routers).
        router_kinds: each layer's router class name.
        experts_TLK / routing_map_TLE / scores_TLE: the tensors (None when not recorded).
        version: the moe_routing version that recorded it.
    """

    layer_names: list[str]
    num_experts: list[int]
    top_k: int
    router_kinds: list[str]
    experts_TLK: Optional[Tensor] = None
    routing_map_TLE: Optional[Tensor] = None
    scores_TLE: Optional[Tensor] = None
    version: str = field(default_factory=lambda: _library_version())

    def __post_init__(self) -> None:
        L = len(self.layer_names)
        if len(self.num_experts) != L or len(self.router_kinds) != L:
            raise ValueError(f"layer_names, num_experts and router_kinds must have one entry per layer, got "
                             f"{L}, {len(self.num_experts)}, {len(self.router_kinds)}")
        if (self.experts_TLK is None) == (self.routing_map_TLE is None):
            raise ValueError("a RoutingRecord holds exactly one of experts_TLK and routing_map_TLE")
        data = self.selection
        expect_last = self.top_k if self.experts_TLK is not None else max(self.num_experts, default=0)
        if data.dim() != 3 or data.shape[1] != L or data.shape[2] != expect_last:
            name = "experts_TLK" if self.experts_TLK is not None else "routing_map_TLE"
            raise ValueError(f"{name} must have shape [T, {L}, {expect_last}] (T, layers, "
                             f"{'top_k' if self.experts_TLK is not None else 'num_experts'}), got "
                             f"{tuple(data.shape)}")
        if self.experts_TLK is not None and self.experts_TLK.dtype != ids_dtype(max(self.num_experts)):
            raise ValueError(f"experts_TLK must be stored as {ids_dtype(max(self.num_experts))} for "
                             f"E={max(self.num_experts)}, got {self.experts_TLK.dtype}")
        if self.routing_map_TLE is not None and self.routing_map_TLE.dtype != torch.bool:
            raise ValueError(f"routing_map_TLE must be bool, got {self.routing_map_TLE.dtype}")
        if self.scores_TLE is not None and self.scores_TLE.shape != (data.shape[0], L, max(self.num_experts)):
            raise ValueError(f"scores_TLE must have shape [{data.shape[0]}, {L}, {max(self.num_experts)}], got "
                             f"{tuple(self.scores_TLE.shape)}")

    @property
    def selection(self) -> Tensor:
        """``experts_TLK`` when recorded, else ``routing_map_TLE``."""
        return self.experts_TLK if self.experts_TLK is not None else self.routing_map_TLE

    @property
    def num_tokens(self) -> int:
        return self.selection.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def nbytes(self) -> int:
        """Host memory held by the record's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.experts_TLK, self.routing_map_TLE, self.scores_TLE)
                   if t is not None)

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError naming the first difference between this record's layers and ``model``'s."""
        names, experts, top_k, kinds, _ = model_layout(model)
        if len(names) != self.num_layers:
            raise ValueError(f"the routing record has {self.num_layers} MoE layers but the model has {len(names)} "
                             "(a record from another model, or dense layers counted?)")
        for what, ours, theirs in (("layer names", self.layer_names, names), ("num_experts", self.num_experts,
                                   experts), ("router kinds", self.router_kinds, kinds)):
            if list(ours) != list(theirs):
                bad = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                raise ValueError(f"the routing record's {what} differ from the model's at MoE layer {bad}: "
                                 f"{ours[bad]!r} recorded, {theirs[bad]!r} in the model")
        if top_k != self.top_k:
            raise ValueError(f"the routing record has top_k={self.top_k} but the model's MoE layers have {top_k}")

    def save(self, path: Union[str, Path]) -> None:
        """Write the record to ``path`` (safetensors, with the layout metadata)."""
        from safetensors.torch import save_file

        tensors = {n: getattr(self, n).contiguous() for n in _TENSORS if getattr(self, n) is not None}
        meta = {"format": FORMAT, "version": self.version, "layer_names": json.dumps(self.layer_names),
                "num_experts": json.dumps(self.num_experts), "top_k": str(self.top_k),
                "router_kinds": json.dumps(self.router_kinds), "num_tokens": str(self.num_tokens)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Union[str, Path], model: Optional[nn.Module] = None) -> "RoutingRecord":
        """Read a record written by `save`; with ``model``, also check it matches (`check_model`).

        A truncated or corrupt file, or metadata that does not describe the tensors, raises ValueError.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {n: f.get_tensor(n) for n in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path} is not a readable routing record (truncated or corrupt safetensors file): "
                             f"{e}") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a moe_routing routing record (metadata format={meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        try:
            record = cls(layer_names=json.loads(meta["layer_names"]), num_experts=json.loads(meta["num_experts"]),
                         top_k=int(meta["top_k"]), router_kinds=json.loads(meta["router_kinds"]),
                         version=meta["version"], **{n: host_tensor(tensors[n]) for n in _TENSORS if n in tensors})
            if record.num_tokens != int(meta["num_tokens"]):
                raise ValueError(f"metadata says {meta['num_tokens']} tokens, the tensors hold {record.num_tokens}")
        except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: the routing record's metadata does not match its tensors: {e}") from e
        if model is not None:
            record.check_model(model)
        return record


def _library_version() -> str:
    from .. import __version__

    return __version__
