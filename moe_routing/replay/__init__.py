"""Routing replay for RL on MoE models: record a forward's routing, replay it in another (R2/R3).

`record_routing` / `replay_routing` (context managers over a model's `MoELayer`s) and `RoutingRecord` (the engine
layout [T, L, K] on the host, saved as safetensors). Recompute safety (a checkpointed layer re-routes exactly as
its forward) lives in `moe_routing.selection`, used by every `MoELayer`.
"""
from .context import record_routing, replay_routing
from .record import RoutingRecord, ids_dtype

__all__ = ["RoutingRecord", "record_routing", "replay_routing", "ids_dtype"]
